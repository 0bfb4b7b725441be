//! RED metrics from every request (before sampling): OTel semantic-
//! convention histograms, Istio-compatible series for Kiali and the Istio
//! Grafana dashboards, and the agent's self-metrics. Exposed on the admin
//! server's `/metrics` (prometheus-client) and optionally pushed over OTLP.
mod bounded;
mod otlp;
mod prom;

pub use bounded::{SeriesLimits, MAX_SERIES_PER_FAMILY, SERIES_EXPIRY_SECS};
pub use otlp::OtlpMetrics;
pub use prom::Prometheus;

use crate::span::{Span, SpanKind};

/// Who a span's two ends are, in the terms dashboards use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_service: String,
    pub source: IstioSide,
    pub destination: IstioSide,
    /// `destination_service_name` / `_namespace`: the Service's own, else unknown.
    pub destination_service_name: String,
    pub destination_service_namespace: String,
}

/// The rest of Istio's standard labels for one end (`source_*` or
/// `destination_*`), with Istio's placeholders when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioSide {
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// Istio's default cluster name when the end is a known pod.
    pub cluster: String,
}

/// Placeholder Istio uses for what it does not know.
pub const UNKNOWN: &str = "unknown";
/// The cluster name Istio reports unless configured otherwise.
pub const ISTIO_CLUSTER: &str = "Kubernetes";

impl IstioSide {
    fn unknown() -> Self {
        IstioSide {
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    fn own(span: &Span) -> Self {
        match &span.k8s {
            Some(k) => IstioSide {
                app: k.pod.istio.app.clone().unwrap_or_else(|| UNKNOWN.into()),
                version: k.pod.istio.version.clone().unwrap_or_else(|| UNKNOWN.into()),
                canonical_service: k.pod.canonical_service(),
                canonical_revision: k.pod.canonical_revision(),
                cluster: ISTIO_CLUSTER.into(),
            },
            None => Self::unknown(),
        }
    }

    fn peer(span: &Span, workload: &str) -> Self {
        let peer = span.peer_k8s.as_ref();
        match peer.and_then(|p| p.istio.as_ref()) {
            Some(l) => IstioSide {
                app: l.app.clone().unwrap_or_else(|| UNKNOWN.into()),
                version: l.version.clone().unwrap_or_else(|| UNKNOWN.into()),
                canonical_service: l.canonical_service.clone().unwrap_or_else(|| workload.into()),
                canonical_revision: l.canonical_revision.clone().unwrap_or_else(|| "latest".into()),
                cluster: ISTIO_CLUSTER.into(),
            },
            // A pod elsewhere in the cluster: named by its workload only.
            None if peer.is_some_and(|p| p.workload.is_some()) => IstioSide {
                canonical_service: workload.into(),
                canonical_revision: "latest".into(),
                cluster: ISTIO_CLUSTER.into(),
                ..Self::unknown()
            },
            None => Self::unknown(),
        }
    }
}

impl Peers {
    /// Both ends of a span in dashboard terms. In Kubernetes the workloads
    /// and namespaces come from pod metadata; elsewhere a workload is the
    /// service name of a process, and the other end is named only when the
    /// call was linked on this node. A raw `ip:port` is never a name: pod
    /// IPs churn, and each would be a new series.
    pub fn of(span: &Span, service_name: &str, service_of: impl Fn(&str) -> String) -> Self {
        let unknown = || UNKNOWN.to_owned();
        let (own_workload, own_ns) = match &span.k8s {
            Some(k) => (k.pod.workload_name(), k.pod.namespace.clone()),
            None => (service_name.to_owned(), unknown()),
        };
        let peer = span.peer_k8s.as_ref();
        let peer_workload = peer
            .and_then(|p| p.workload.clone())
            .or_else(|| span.peer_comm.as_deref().map(&service_of))
            .unwrap_or_else(unknown);
        let peer_ns = peer.and_then(|p| p.namespace.clone()).unwrap_or_else(unknown);
        let (own, other) = (IstioSide::own(span), IstioSide::peer(span, &peer_workload));
        let service = match span.kind {
            SpanKind::Server => span.k8s.as_ref().and_then(|k| k.service_fqdn.clone()),
            SpanKind::Client => peer.and_then(|p| p.service_fqdn.clone()),
        };
        let (service_name, service_ns) = service
            .as_deref()
            .and_then(crate::k8s::split_fqdn)
            .map_or_else(|| (unknown(), unknown()), |(n, ns)| (n.to_owned(), ns.to_owned()));
        let destination_service = service.unwrap_or_else(unknown);
        match span.kind {
            SpanKind::Server => Peers {
                source_workload: peer_workload,
                source_namespace: peer_ns,
                destination_workload: own_workload,
                destination_namespace: own_ns,
                destination_service,
                source: other,
                destination: own,
                destination_service_name: service_name,
                destination_service_namespace: service_ns,
            },
            SpanKind::Client => Peers {
                source_workload: own_workload,
                source_namespace: own_ns,
                destination_workload: peer_workload,
                destination_namespace: peer_ns,
                destination_service,
                source: own,
                destination: other,
                destination_service_name: service_name,
                destination_service_namespace: service_ns,
            },
        }
    }
}

/// Request duration in seconds.
pub fn duration_secs(span: &Span) -> f64 {
    span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e9
}

/// OTel semconv histogram boundaries for HTTP durations (seconds).
pub const SEMCONV_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Istio's default buckets for `istio_request_duration_milliseconds`.
pub const ISTIO_BUCKETS: [f64; 19] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];
