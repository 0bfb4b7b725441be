//! Prometheus series (text exposition via prometheus-client).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{duration_secs, Peers, ISTIO_BUCKETS, SEMCONV_BUCKETS};
use crate::{
    span::{Span, SpanKind},
    stats::Stats,
};

/// Labels of the OTel-named HTTP duration histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    service_name: String,
    http_request_method: String,
    http_response_status_code: String,
    network_protocol_version: String,
    server_address: String,
    server_port: String,
}

/// Labels of the Istio standard metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IstioLabels {
    reporter: String,
    source_workload: String,
    source_workload_namespace: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_service: String,
    request_protocol: String,
    response_code: String,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

/// All Prometheus series of the agent.
#[derive(Debug)]
pub struct Prometheus {
    registry: Registry,
    server_duration: Hist<HttpLabels>,
    client_duration: Hist<HttpLabels>,
    istio_requests: Family<IstioLabels, Counter>,
    istio_duration: Hist<IstioLabels>,
}

fn semconv_hist() -> Histogram {
    Histogram::new(SEMCONV_BUCKETS)
}

fn istio_hist() -> Histogram {
    Histogram::new(ISTIO_BUCKETS)
}

impl Prometheus {
    pub fn new(stats: Arc<Stats>) -> Self {
        let mut registry = Registry::default();
        let server_duration: Hist<HttpLabels> = Family::new_with_constructor(semconv_hist);
        let client_duration: Hist<HttpLabels> = Family::new_with_constructor(semconv_hist);
        let istio_requests = Family::<IstioLabels, Counter>::default();
        let istio_duration: Hist<IstioLabels> = Family::new_with_constructor(istio_hist);
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests (OTel http.server.request.duration)",
            Unit::Seconds,
            server_duration.clone(),
        );
        registry.register_with_unit(
            "http_client_request_duration",
            "Duration of HTTP client requests (OTel http.client.request.duration)",
            Unit::Seconds,
            client_duration.clone(),
        );
        registry.register(
            "istio_requests",
            "Requests, Istio standard metric",
            istio_requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, Istio standard metric",
            istio_duration.clone(),
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
        let status = span.status_code.map_or_else(|| "0".to_owned(), |c| c.to_string());
        let (addr, port) = match span.server {
            Some(s) => (s.ip().to_string(), s.port().to_string()),
            None => (String::new(), String::new()),
        };
        let labels = HttpLabels {
            service_name: service_name.to_owned(),
            http_request_method: span.method.clone(),
            http_response_status_code: status.clone(),
            network_protocol_version: span.protocol_version.to_owned(),
            server_address: if span.kind == SpanKind::Client {
                addr
            } else {
                String::new()
            },
            server_port: port,
        };
        let secs = duration_secs(span);
        match span.kind {
            SpanKind::Server => self.server_duration.get_or_create(&labels).observe(secs),
            SpanKind::Client => self.client_duration.get_or_create(&labels).observe(secs),
        }
        let istio = IstioLabels {
            reporter: match span.kind {
                SpanKind::Server => "destination",
                SpanKind::Client => "source",
            }
            .to_owned(),
            source_workload: peers.source_workload.clone(),
            source_workload_namespace: peers.source_namespace.clone(),
            destination_workload: peers.destination_workload.clone(),
            destination_workload_namespace: peers.destination_namespace.clone(),
            destination_service: peers.destination_service.clone(),
            request_protocol: "http".to_owned(),
            response_code: status,
        };
        self.istio_requests.get_or_create(&istio).inc();
        self.istio_duration.get_or_create(&istio).observe(secs * 1000.0);
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Self-metrics that are levels, not totals.
const GAUGES: [&str; 3] = [
    "conns_tracked",
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
