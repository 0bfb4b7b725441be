//! Prometheus series (text exposition via prometheus-client).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, gauge::ConstGauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{
    bounded::{Bounded, SeriesLimits},
    duration_secs, Peers, ISTIO_BUCKETS, SEMCONV_BUCKETS, UNKNOWN,
};
use crate::{
    span::{Span, SpanKind},
    stats::Stats,
};

/// All Prometheus series of the agent; every traffic-labelled family is
/// [`Bounded`] (series cap with an overflow series, stale series expire).
#[derive(Debug)]
pub struct Prometheus {
    registry: Registry,
    server_duration: Bounded<Histogram>,
    client_duration: Bounded<Histogram>,
    istio_requests: Bounded<Counter>,
    istio_duration: Bounded<Histogram>,
}

fn semconv_hist() -> Histogram {
    Histogram::new(SEMCONV_BUCKETS)
}

fn istio_hist() -> Histogram {
    Histogram::new(ISTIO_BUCKETS)
}

impl Prometheus {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self::with_limits(stats, SeriesLimits::default())
    }

    pub fn with_limits(stats: Arc<Stats>, limits: SeriesLimits) -> Self {
        let mut registry = Registry::default();
        let server_duration = Bounded::new(semconv_hist as fn() -> Histogram, limits, stats.clone());
        let client_duration = Bounded::new(semconv_hist as fn() -> Histogram, limits, stats.clone());
        let istio_requests = Bounded::new(Counter::default as fn() -> Counter, limits, stats.clone());
        let istio_duration = Bounded::new(istio_hist as fn() -> Histogram, limits, stats.clone());
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests (OTel http.server.request.duration)",
            Unit::Seconds,
            server_duration.family(),
        );
        registry.register_with_unit(
            "http_client_request_duration",
            "Duration of HTTP client requests (OTel http.client.request.duration)",
            Unit::Seconds,
            client_duration.family(),
        );
        registry.register(
            "istio_requests",
            "Requests, Istio standard metric",
            istio_requests.family(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, Istio standard metric",
            istio_duration.family(),
        );
        registry.register_collector(Box::new(SelfMetrics(stats)));
        Self {
            registry,
            server_duration,
            client_duration,
            istio_requests,
            istio_duration,
        }
    }

    /// Records one request.
    pub fn record(&self, span: &Span, service_name: &str, peers: &Peers) {
        // Istio reports "0" for requests that got no response.
        let status = span.status_code.map_or_else(|| "0".to_owned(), |c| c.to_string());
        let port = span.server.map(|s| s.port().to_string()).unwrap_or_default();
        let server_address = match span.kind {
            SpanKind::Client => client_server_address(span),
            SpanKind::Server => String::new(),
        };
        let http = vec![
            ("service_name", service_name.to_owned()),
            ("http_request_method", span.method_label().to_owned()),
            ("http_response_status_code", status.clone()),
            ("network_protocol_version", span.protocol_version.to_owned()),
            ("server_address", server_address),
            ("server_port", port),
            ("error_type", span.error_type().unwrap_or_default()),
        ];
        let secs = duration_secs(span);
        let durations = match span.kind {
            SpanKind::Server => &self.server_duration,
            SpanKind::Client => &self.client_duration,
        };
        durations.with(&http, |h| h.observe(secs));
        let reporter = match span.kind {
            SpanKind::Server => "destination",
            SpanKind::Client => "source",
        };
        let flags = span.unanswered.map_or("-", |u| u.response_flags(span.kind));
        let (src, dst) = (&peers.source, &peers.destination);
        // Istio's standard label set, in its order and with its placeholders
        // (no mTLS identity here: principals are unknown, and the
        // destination reports its connection security policy as none).
        let istio = vec![
            ("reporter", reporter.to_owned()),
            ("source_workload", peers.source_workload.clone()),
            ("source_workload_namespace", peers.source_namespace.clone()),
            ("source_principal", UNKNOWN.to_owned()),
            ("source_app", src.app.clone()),
            ("source_version", src.version.clone()),
            ("source_cluster", src.cluster.clone()),
            ("source_canonical_service", src.canonical_service.clone()),
            ("source_canonical_revision", src.canonical_revision.clone()),
            ("destination_workload", peers.destination_workload.clone()),
            ("destination_workload_namespace", peers.destination_namespace.clone()),
            ("destination_principal", UNKNOWN.to_owned()),
            ("destination_app", dst.app.clone()),
            ("destination_version", dst.version.clone()),
            ("destination_service", peers.destination_service.clone()),
            ("destination_service_name", peers.destination_service_name.clone()),
            (
                "destination_service_namespace",
                peers.destination_service_namespace.clone(),
            ),
            ("destination_cluster", dst.cluster.clone()),
            ("destination_canonical_service", dst.canonical_service.clone()),
            ("destination_canonical_revision", dst.canonical_revision.clone()),
            (
                "request_protocol",
                if span.rpc.is_some() { "grpc" } else { "http" }.to_owned(),
            ),
            ("response_code", status),
            (
                "grpc_response_status",
                span.grpc_status().map(|c| c.to_string()).unwrap_or_default(),
            ),
            ("response_flags", flags.to_owned()),
            (
                "connection_security_policy",
                match span.kind {
                    SpanKind::Server => "none",
                    SpanKind::Client => UNKNOWN,
                }
                .to_owned(),
            ),
        ];
        self.istio_requests.with(&istio, |c| {
            c.inc();
        });
        self.istio_duration.with(&istio, |h| h.observe(secs * 1000.0));
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `server.address` of a client request: the host its target names
/// (absolute or authority form), else the peer's IP.
pub(super) fn client_server_address(span: &Span) -> String {
    match span.target_authority() {
        Some((host, _)) => crate::http::cut(host, 256).to_owned(),
        None => span.server.map(|s| s.ip().to_string()).unwrap_or_default(),
    }
}

/// Self-metrics that are levels, not totals.
const GAUGES: [&str; 6] = [
    "correlator_state_bytes",
    "conns_tracked",
    "kernel_conn_entries",
    "kernel_addr_entries",
    "kernel_ringbuf_used_bytes",
    "kernel_ringbuf_size_bytes",
];

/// The agent's own counters, read from [`Stats`] at scrape time.
#[derive(Debug)]
struct SelfMetrics(Arc<Stats>);

impl Collector for SelfMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in self.0.described() {
            let full_name = format!("meshless_{name}");
            if GAUGES.contains(&name) {
                let gauge = ConstGauge::new(value as i64);
                let metric = encoder.encode_descriptor(&full_name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            } else {
                let counter = ConstCounter::new(value);
                let metric = encoder.encode_descriptor(&full_name, help, None, counter.metric_type())?;
                counter.encode(metric)?;
            }
        }
        crate::budget::encode_prometheus(&self.0.budget, &mut encoder)
    }
}
