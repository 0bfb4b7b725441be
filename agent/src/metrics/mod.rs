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

use std::sync::Arc;

use crate::{
    k8s::{PeerK8s, PodMeta},
    span::{Span, SpanKind},
};

/// Who a span's two ends are, in the terms dashboards use. Every name is
/// borrowed from the span, its metadata or the configuration: built for
/// every span, so it must not allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peers<'a> {
    pub source_workload: &'a str,
    pub source_namespace: &'a str,
    pub destination_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_service: &'a str,
    pub source: IstioSide<'a>,
    pub destination: IstioSide<'a>,
    /// `destination_service_name` / `_namespace`: the Service's own, else unknown.
    pub destination_service_name: &'a str,
    pub destination_service_namespace: &'a str,
    /// What all of the above was made from.
    pub sources: PeerSources<'a>,
}

/// Everything [`Peers`] is made from, and nothing else: [`Peers::of`]
/// reads the span only to take these. The metadata is held by `Arc` and
/// never changed in place, so spans whose sources are the same objects
/// (by address) and equal names have equal peers; the Istio series cache
/// in [`Prometheus`] keys on that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSources<'a> {
    pub kind: SpanKind,
    /// This end's pod.
    pub pod: Option<&'a Arc<PodMeta>>,
    /// The Service this end serves behind (server spans only; a client
    /// span's Service is the peer's).
    pub own_service: Option<&'a Arc<str>>,
    /// What the cluster knows about the other end.
    pub peer: Option<&'a Arc<PeerK8s>>,
    /// This end's service name (a process outside Kubernetes is named by it).
    pub service_name: &'a str,
    /// The other end's workload: from the cluster, else the service name of
    /// the local process at the other end, else unknown.
    pub peer_workload: &'a str,
}

impl<'a> PeerSources<'a> {
    pub fn of(span: &'a Span, service_name: &'a str, service_of: impl Fn(&'a str) -> &'a str) -> Self {
        let peer = span.peer_k8s.as_ref();
        let peer_workload = peer
            .and_then(|p| p.workload.as_deref())
            .or_else(|| span.peer_comm.as_deref().map(&service_of))
            .unwrap_or(UNKNOWN);
        Self {
            kind: span.kind,
            pod: span.k8s.as_ref().map(|k| &k.pod),
            own_service: match span.kind {
                SpanKind::Server => span.k8s.as_ref().and_then(|k| k.service_fqdn.as_ref()),
                SpanKind::Client => None,
            },
            peer,
            service_name,
            peer_workload,
        }
    }
}

/// The rest of Istio's standard labels for one end (`source_*` or
/// `destination_*`), with Istio's placeholders when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IstioSide<'a> {
    pub app: &'a str,
    pub version: &'a str,
    pub canonical_service: &'a str,
    pub canonical_revision: &'a str,
    /// Istio's default cluster name when the end is a known pod.
    pub cluster: &'a str,
}

/// Placeholder Istio uses for what it does not know.
pub const UNKNOWN: &str = "unknown";
/// The cluster name Istio reports unless configured otherwise.
pub const ISTIO_CLUSTER: &str = "Kubernetes";
/// Istio's canonical revision when no label names one.
const LATEST: &str = "latest";

/// The workload name as Istio labels use it ([`crate::k8s::PodMeta::workload_name`], borrowed).
fn workload_name(pod: &PodMeta) -> &str {
    pod.workload.as_ref().map_or(pod.name.as_str(), |(_, n)| n.as_str())
}

impl<'a> IstioSide<'a> {
    const UNKNOWN: IstioSide<'static> = IstioSide {
        app: UNKNOWN,
        version: UNKNOWN,
        canonical_service: UNKNOWN,
        canonical_revision: UNKNOWN,
        cluster: UNKNOWN,
    };

    fn own(pod: Option<&'a PodMeta>) -> Self {
        match pod {
            Some(pod) => {
                let istio = &pod.istio;
                IstioSide {
                    app: istio.app.as_deref().unwrap_or(UNKNOWN),
                    version: istio.version.as_deref().unwrap_or(UNKNOWN),
                    canonical_service: istio.canonical_service.as_deref().unwrap_or_else(|| workload_name(pod)),
                    canonical_revision: istio.canonical_revision.as_deref().unwrap_or(LATEST),
                    cluster: ISTIO_CLUSTER,
                }
            }
            None => Self::UNKNOWN,
        }
    }

    fn peer(peer: Option<&'a PeerK8s>, workload: &'a str) -> Self {
        match peer.and_then(|p| p.istio.as_ref()) {
            Some(l) => IstioSide {
                app: l.app.as_deref().unwrap_or(UNKNOWN),
                version: l.version.as_deref().unwrap_or(UNKNOWN),
                canonical_service: l.canonical_service.as_deref().unwrap_or(workload),
                canonical_revision: l.canonical_revision.as_deref().unwrap_or(LATEST),
                cluster: ISTIO_CLUSTER,
            },
            // A pod elsewhere in the cluster: named by its workload only.
            None if peer.is_some_and(|p| p.workload.is_some()) => IstioSide {
                canonical_service: workload,
                canonical_revision: LATEST,
                cluster: ISTIO_CLUSTER,
                ..Self::UNKNOWN
            },
            None => Self::UNKNOWN,
        }
    }
}

impl<'a> Peers<'a> {
    /// Both ends of a span in dashboard terms. In Kubernetes the workloads
    /// and namespaces come from pod metadata; elsewhere a workload is the
    /// service name of a process, and the other end is named only when the
    /// call was linked on this node. A raw `ip:port` is never a name: pod
    /// IPs churn, and each would be a new series.
    pub fn of(span: &'a Span, service_name: &'a str, service_of: impl Fn(&'a str) -> &'a str) -> Self {
        Self::from_sources(PeerSources::of(span, service_name, service_of))
    }

    /// The peers made from `sources` alone (see [`PeerSources`]).
    pub fn from_sources(sources: PeerSources<'a>) -> Self {
        let pod = sources.pod.map(|p| &**p);
        let peer = sources.peer.map(|p| &**p);
        let (own_workload, own_ns) = match pod {
            Some(pod) => (workload_name(pod), pod.namespace.as_str()),
            None => (sources.service_name, UNKNOWN),
        };
        let peer_workload = sources.peer_workload;
        let peer_ns = peer.and_then(|p| p.namespace.as_deref()).unwrap_or(UNKNOWN);
        let (own, other) = (IstioSide::own(pod), IstioSide::peer(peer, peer_workload));
        let service = match sources.kind {
            SpanKind::Server => sources.own_service.map(|s| &**s),
            SpanKind::Client => peer.and_then(|p| p.service_fqdn.as_deref()),
        };
        let (service_name, service_ns) = service.and_then(crate::k8s::split_fqdn).unwrap_or((UNKNOWN, UNKNOWN));
        let destination_service = service.unwrap_or(UNKNOWN);
        let own_end = (own_workload, own_ns, own);
        let peer_end = (peer_workload, peer_ns, other);
        let (source_end, destination_end) = match sources.kind {
            SpanKind::Server => (peer_end, own_end),
            SpanKind::Client => (own_end, peer_end),
        };
        Peers {
            source_workload: source_end.0,
            source_namespace: source_end.1,
            destination_workload: destination_end.0,
            destination_namespace: destination_end.1,
            destination_service,
            source: source_end.2,
            destination: destination_end.2,
            destination_service_name: service_name,
            destination_service_namespace: service_ns,
            sources,
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
