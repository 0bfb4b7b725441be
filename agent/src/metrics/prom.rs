//! Prometheus series (text exposition via prometheus-client).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, gauge::ConstGauge, histogram::Histogram, MetricType},
    registry::{Registry, Unit},
};

use super::{
    bounded::{Bounded, BoundedPair, SeriesLimits},
    duration_secs, Peers, ISTIO_BUCKETS, SEMCONV_BUCKETS, UNKNOWN,
};
use crate::{
    span::{Span, SpanKind},
    stats::Stats,
    text::{StackText, Text},
};

/// All Prometheus series of the agent; every traffic-labelled family is
/// [`Bounded`] (series cap with an overflow series, stale series expire).
#[derive(Debug)]
pub struct Prometheus {
    registry: Registry,
    server_duration: Bounded<Histogram>,
    client_duration: Bounded<Histogram>,
    /// Istio's request count and duration: the same 25 labels, one lookup.
    istio: BoundedPair<Counter, Histogram>,
    /// Series times are seconds since this (see [`Bounded::with_at`]).
    epoch: std::time::Instant,
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
        let istio = BoundedPair::pair(
            Counter::default as fn() -> Counter,
            istio_hist as fn() -> Histogram,
            limits,
            stats.clone(),
        );
        let (istio_requests, istio_duration) = istio.families();
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
        registry.register("istio_requests", "Requests, Istio standard metric", istio_requests);
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, Istio standard metric",
            istio_duration,
        );
        registry.register_collector(Box::new(SelfMetrics(stats)));
        Self {
            registry,
            server_duration,
            client_duration,
            istio,
            epoch: std::time::Instant::now(),
        }
    }

    /// Records one request. Label values are borrowed or formatted on the
    /// stack: an existing series is written without allocating.
    pub fn record(&self, span: &Span, service_name: &str, peers: &Peers) {
        // One clock read for both families (each read was a vDSO call).
        let now_secs = self.epoch.elapsed().as_secs();
        // Istio reports "0" for requests that got no response.
        let status = StackText::<8>::number(u64::from(span.status_code.unwrap_or(0)));
        let port = match span.server {
            Some(s) => StackText::<8>::number(u64::from(s.port())),
            None => StackText::default(),
        };
        let ip;
        let server_address = match span.kind {
            SpanKind::Client => match client_server_address(span) {
                ServerAddress::Host(host) => host,
                ServerAddress::Ip(addr) => {
                    ip = Text::ip(addr);
                    ip.as_str()
                }
                ServerAddress::Unknown => "",
            },
            SpanKind::Server => "",
        };
        let error_type = match span.error_kind() {
            Some(e) => StackText::<32>::of(e),
            None => StackText::default(),
        };
        let http = [
            ("service_name", service_name),
            ("http_request_method", span.method_label()),
            ("http_response_status_code", status.as_str()),
            ("network_protocol_version", span.protocol_version),
            ("server_address", server_address),
            ("server_port", port.as_str()),
            ("error_type", error_type.as_str()),
        ];
        let secs = duration_secs(span);
        let durations = match span.kind {
            SpanKind::Server => &self.server_duration,
            SpanKind::Client => &self.client_duration,
        };
        durations.with_at(&http, now_secs, |h| h.observe(secs));
        let reporter = match span.kind {
            SpanKind::Server => "destination",
            SpanKind::Client => "source",
        };
        let flags = span.unanswered.map_or("-", |u| u.response_flags(span.kind));
        let grpc_status = match span.grpc_status() {
            Some(code) => StackText::<12>::number(u64::from(code)),
            None => StackText::default(),
        };
        let (src, dst) = (&peers.source, &peers.destination);
        // Istio's standard label set, in its order and with its placeholders
        // (no mTLS identity here: principals are unknown, and the
        // destination reports its connection security policy as none).
        let istio = [
            ("reporter", reporter),
            ("source_workload", peers.source_workload),
            ("source_workload_namespace", peers.source_namespace),
            ("source_principal", UNKNOWN),
            ("source_app", src.app),
            ("source_version", src.version),
            ("source_cluster", src.cluster),
            ("source_canonical_service", src.canonical_service),
            ("source_canonical_revision", src.canonical_revision),
            ("destination_workload", peers.destination_workload),
            ("destination_workload_namespace", peers.destination_namespace),
            ("destination_principal", UNKNOWN),
            ("destination_app", dst.app),
            ("destination_version", dst.version),
            ("destination_service", peers.destination_service),
            ("destination_service_name", peers.destination_service_name),
            ("destination_service_namespace", peers.destination_service_namespace),
            ("destination_cluster", dst.cluster),
            ("destination_canonical_service", dst.canonical_service),
            ("destination_canonical_revision", dst.canonical_revision),
            ("request_protocol", if span.rpc.is_some() { "grpc" } else { "http" }),
            ("response_code", status.as_str()),
            ("grpc_response_status", grpc_status.as_str()),
            ("response_flags", flags),
            (
                "connection_security_policy",
                match span.kind {
                    SpanKind::Server => "none",
                    SpanKind::Client => UNKNOWN,
                },
            ),
        ];
        self.istio.with_at(&istio, now_secs, |(requests, duration)| {
            requests.inc();
            duration.observe(secs * 1000.0);
        });
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerAddress<'a> {
    Host(&'a str),
    Ip(std::net::IpAddr),
    Unknown,
}

impl std::fmt::Display for ServerAddress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddress::Host(h) => f.write_str(h),
            ServerAddress::Ip(ip) => write!(f, "{ip}"),
            ServerAddress::Unknown => Ok(()),
        }
    }
}

pub(super) fn client_server_address(span: &Span) -> ServerAddress<'_> {
    match span.target_authority() {
        Some((host, _)) => ServerAddress::Host(crate::http::cut(host, 256)),
        None => span
            .server
            .map_or(ServerAddress::Unknown, |s| ServerAddress::Ip(s.ip())),
    }
}

/// Each kernel program's runs and time (`--kernel-stats`; nothing without it).
fn encode_program_times(stats: &Stats, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let programs = stats.kernel_programs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if programs.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(
        "meshless_kernel_program_runs",
        "Runs of each kernel program (--kernel-stats; a tail-called program counts under its caller).",
        None,
        MetricType::Counter,
    )?;
    for p in &programs {
        ConstCounter::new(p.runs).encode(metric.encode_family(&[("program", p.program.as_str())])?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "meshless_kernel_program_seconds",
        "Time each kernel program took inside the traced applications' syscalls (--kernel-stats).",
        None,
        MetricType::Counter,
    )?;
    for p in &programs {
        let secs = p.nanos as f64 / 1e9;
        ConstCounter::new(secs).encode(metric.encode_family(&[("program", p.program.as_str())])?)?;
    }
    Ok(())
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
        encode_program_times(&self.0, &mut encoder)?;
        crate::budget::encode_prometheus(&self.0.budget, &mut encoder)
    }
}
