//! RED metrics pushed over OTLP with the OpenTelemetry SDK: the stable
//! `http.server.request.duration` / `http.client.request.duration`
//! histograms (seconds, semconv boundaries and attributes). The SDK's meter
//! provider has one resource, the agent's; the workload is an attribute.
use opentelemetry::{
    metrics::{Histogram, MeterProvider as _},
    KeyValue,
};
use opentelemetry_sdk::{
    metrics::{periodic_reader_with_async_runtime::PeriodicReader, SdkMeterProvider},
    runtime, Resource,
};

use super::{duration_secs, SEMCONV_BUCKETS};
use crate::{
    config::otel::{OtlpTarget, Protocol},
    export::otlp::{build_error, grpc_config, http_config, OtlpError},
    span::{Span, SpanKind},
};

pub struct OtlpMetrics {
    provider: SdkMeterProvider,
    server: Histogram<f64>,
    client: Histogram<f64>,
}

impl OtlpMetrics {
    /// Starts periodic export (needs a Tokio runtime).
    pub fn start(t: &OtlpTarget, interval: std::time::Duration, resource: Resource) -> Result<Self, OtlpError> {
        let exporter = match t.protocol {
            Protocol::Grpc => grpc_config(opentelemetry_otlp::MetricExporter::builder().with_tonic(), t)?.build(),
            Protocol::HttpProtobuf => http_config(opentelemetry_otlp::MetricExporter::builder().with_http(), t).build(),
        }
        .map_err(|e| build_error(t, e.to_string()))?;
        let reader = PeriodicReader::builder(exporter, runtime::Tokio)
            .with_interval(interval)
            .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let meter = provider.meter("meshless");
        let hist = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(SEMCONV_BUCKETS.to_vec())
                .build()
        };
        Ok(Self {
            server: hist("http.server.request.duration", "Duration of HTTP server requests."),
            client: hist("http.client.request.duration", "Duration of HTTP client requests."),
            provider,
        })
    }

    pub fn record(&self, span: &Span, service_name: &str) {
        let mut attrs = vec![
            KeyValue::new("http.request.method", span.method_label().to_owned()),
            KeyValue::new("url.scheme", if span.tls { "https" } else { "http" }),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", span.protocol_version),
            KeyValue::new("service.name", service_name.to_owned()),
        ];
        if let Some(code) = span.status_code {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(code)));
        }
        if let Some(error_type) = span.error_type() {
            attrs.push(KeyValue::new("error.type", error_type));
        }
        if let Some(rpc) = &span.rpc {
            attrs.push(KeyValue::new("rpc.system", "grpc"));
            if let Some(code) = rpc.grpc_status {
                attrs.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            }
        }
        match span.kind {
            SpanKind::Server => self.server.record(duration_secs(span), &attrs),
            SpanKind::Client => {
                if let Some(s) = span.server {
                    attrs.push(KeyValue::new(
                        "server.address",
                        super::prom::client_server_address(span).to_string(),
                    ));
                    attrs.push(KeyValue::new("server.port", i64::from(s.port())));
                }
                self.client.record(duration_secs(span), &attrs)
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}
