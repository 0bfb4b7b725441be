//! OTLP trace export (gRPC or HTTP/protobuf) with the opentelemetry-otlp
//! exporter. Spans keep the kernel-observed times and the ids the
//! correlator assigned, so they are turned into `SpanData` directly rather
//! than going through a tracer. The queue in front is bounded: while the
//! collector is away new spans are dropped and counted, memory stays flat,
//! and export resumes by itself when the collector is back.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use opentelemetry::{
    trace::{SpanContext, SpanKind as OtelKind, Status, TraceFlags, TraceState},
    InstrumentationScope, KeyValue, Value as OtelValue,
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::{sync::mpsc, time};
use tracing::{debug, warn};

use super::{
    attributes::{self, Value},
    resource::{self, Resources, WorkloadKey},
};
use crate::{
    config::otel::{OtlpTarget, Protocol},
    span::{Span, SpanKind},
    stats::Stats,
};

/// Spans sent per export request.
const BATCH: usize = 512;
/// Longest a span waits in the queue before a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("building the OTLP exporter for {endpoint}: {reason}")]
    Build { endpoint: String, reason: String },
}

pub fn build_span_exporter(t: &OtlpTarget) -> Result<opentelemetry_otlp::SpanExporter, OtlpError> {
    let built = match t.protocol {
        Protocol::Grpc => grpc_config(opentelemetry_otlp::SpanExporter::builder().with_tonic(), t)?.build(),
        Protocol::HttpProtobuf => http_config(opentelemetry_otlp::SpanExporter::builder().with_http(), t).build(),
    };
    built.map_err(|e| build_error(t, e.to_string()))
}

pub fn build_error(t: &OtlpTarget, reason: String) -> OtlpError {
    OtlpError::Build {
        endpoint: t.endpoint.clone(),
        reason,
    }
}

/// Endpoint, timeout, metadata and TLS of a gRPC exporter builder (traces or metrics).
pub fn grpc_config<B: WithExportConfig + WithTonicConfig>(b: B, t: &OtlpTarget) -> Result<B, OtlpError> {
    let meta = metadata(&t.headers).map_err(|e| build_error(t, e))?;
    let b = b
        .with_endpoint(t.endpoint.clone())
        .with_timeout(t.timeout)
        .with_metadata(meta);
    Ok(match tls(t).map_err(|e| build_error(t, e))? {
        Some(tls) => b.with_tls_config(tls),
        None => b,
    })
}

/// Endpoint, timeout and headers of an HTTP/protobuf exporter builder.
pub fn http_config<B: WithExportConfig + WithHttpConfig>(b: B, t: &OtlpTarget) -> B {
    b.with_endpoint(t.endpoint.clone())
        .with_timeout(t.timeout)
        .with_headers(t.headers.iter().cloned().collect())
}

fn metadata(headers: &[(String, String)]) -> Result<tonic::metadata::MetadataMap, String> {
    let mut map = tonic::metadata::MetadataMap::new();
    for (k, v) in headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("header name `{k}` is not valid for gRPC metadata"))?;
        let value = v
            .parse()
            .map_err(|_| format!("header `{k}` has a value gRPC cannot carry"))?;
        map.insert(key, value);
    }
    Ok(map)
}

fn tls(t: &OtlpTarget) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    if t.insecure || !t.endpoint.starts_with("https://") {
        return Ok(None);
    }
    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    if let Some(ca) = &t.ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("reading {}: {e}", ca.display()))?;
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    Ok(Some(tls))
}

/// The OTLP trace export stage.
pub struct OtlpTraces {
    exporter: opentelemetry_otlp::SpanExporter,
    endpoint: String,
    resources: Resources,
    opts: attributes::Options,
    queue: VecDeque<Span>,
    capacity: usize,
    stats: Arc<Stats>,
    failing: bool,
}

impl OtlpTraces {
    pub fn new(
        exporter: opentelemetry_otlp::SpanExporter,
        endpoint: String,
        resources: Resources,
        capture_query: bool,
        capacity: usize,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            exporter,
            endpoint,
            resources,
            opts: attributes::Options {
                capture_query,
                process: false,
            },
            queue: VecDeque::new(),
            capacity,
            stats,
            failing: false,
        }
    }

    /// Exports until `spans_rx` closes, then flushes what is queued.
    pub async fn run(mut self, mut spans_rx: mpsc::Receiver<Vec<Span>>) {
        let mut tick = time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
        loop {
            let ticked = tokio::select! {
                batch = spans_rx.recv() => match batch {
                    Some(batch) => {
                        self.enqueue(batch);
                        false
                    }
                    None => break,
                },
                _ = tick.tick() => true,
            };
            while self.queue.len() >= BATCH {
                self.flush().await;
            }
            if ticked && !self.queue.is_empty() {
                self.flush().await;
            }
        }
        while !self.queue.is_empty() {
            self.flush().await;
        }
        let _ = self.exporter.shutdown();
    }

    fn enqueue(&mut self, batch: Vec<Span>) {
        let room = self.capacity.saturating_sub(self.queue.len());
        let dropped = batch.len().saturating_sub(room);
        self.queue.extend(batch.into_iter().take(room));
        if dropped > 0 {
            Stats::add(&self.stats.otlp_spans_dropped, dropped as u64);
        }
    }

    async fn flush(&mut self) {
        let n = self.queue.len().min(BATCH);
        let batch: Vec<Span> = self.queue.drain(..n).collect();
        let mut groups: HashMap<WorkloadKey, Vec<SpanData>> = HashMap::new();
        let mut resources = HashMap::new();
        for span in batch {
            let key = resource::key_of(&span);
            resources
                .entry(key.clone())
                .or_insert_with(|| self.resources.get(&span));
            groups.entry(key).or_default().push(span_data(&span, self.opts));
        }
        for (key, spans) in groups {
            let count = spans.len() as u64;
            if let Some(resource) = resources.get(&key) {
                self.exporter.set_resource(resource);
            }
            match self.exporter.export(spans).await {
                Ok(()) => {
                    Stats::add(&self.stats.otlp_spans_exported, count);
                    if std::mem::replace(&mut self.failing, false) {
                        warn!(endpoint = %self.endpoint, "OTLP export recovered");
                    }
                }
                Err(error) => {
                    Stats::inc(&self.stats.otlp_export_errors);
                    Stats::add(&self.stats.otlp_spans_dropped, count);
                    if !std::mem::replace(&mut self.failing, true) {
                        warn!(endpoint = %self.endpoint, %error, "OTLP export failing; spans are dropped and counted until it recovers");
                    } else {
                        debug!(%error, "OTLP export failed again");
                    }
                }
            }
        }
    }
}

fn otel_value(v: Value) -> OtelValue {
    match v {
        Value::Str(s) => OtelValue::from(s),
        Value::Int(i) => OtelValue::from(i),
        Value::Bool(b) => OtelValue::from(b),
        Value::StrArray(a) => OtelValue::Array(opentelemetry::Array::String(a.into_iter().map(Into::into).collect())),
    }
}

fn unix(nanos: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// Our span as the SDK's exportable span data.
pub fn span_data(span: &Span, opts: attributes::Options) -> SpanData {
    let flags = if span.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = span
        .trace_state
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let ctx = SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(span.trace_id.0),
        opentelemetry::trace::SpanId::from_bytes(span.span_id.0),
        flags,
        false,
        state,
    );
    let status = if span.is_error() {
        Status::error(
            span.status_code
                .map_or_else(|| "no response".to_owned(), |c| format!("HTTP {c}")),
        )
    } else {
        Status::Unset
    };
    SpanData {
        span_context: ctx,
        parent_span_id: span.parent_span_id.map_or(opentelemetry::trace::SpanId::INVALID, |p| {
            opentelemetry::trace::SpanId::from_bytes(p.0)
        }),
        parent_span_is_remote: span.parent_is_remote,
        span_kind: match span.kind {
            SpanKind::Server => OtelKind::Server,
            SpanKind::Client => OtelKind::Client,
        },
        name: span.name().into(),
        start_time: unix(span.start_unix_nano),
        end_time: unix(span.end_unix_nano),
        attributes: attributes::of(span, opts)
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, otel_value(v)))
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: InstrumentationScope::builder("meshless")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }
}
