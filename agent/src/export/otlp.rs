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
    budget::{self, Charged, Reason, Share},
    config::otel::{OtlpTarget, Protocol},
    health::Heartbeat,
    span::{Span, SpanKind},
    stats::Stats,
};

/// Spans taken from the queue per flush.
const BATCH: usize = 512;
/// Largest export request (estimated encoded bytes): under the 4 MiB that
/// gRPC servers, the OTel Collector included, accept by default, with
/// room for the resource and scope envelopes.
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;
/// Longest a span waits in the queue before a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Spans on their way to an exporter, their bytes held against the
/// [`Share::Spans`] budget until the batch is dropped.
pub type SpanBatch = Charged<Vec<Span>>;

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
        .with_metadata(meta)
        .with_retry_policy(retry_policy());
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
        .with_retry_policy(retry_policy())
}

/// Retries of one export request, as the OTel exporters do: the exporter
/// classifies failures by the OTLP spec (gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
/// RESOURCE_EXHAUSTED with RetryInfo...; HTTP 429/502/503/504, honouring
/// Retry-After) and backs off exponentially with jitter. All attempts
/// together stay within the export timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`);
/// then the request's spans are dropped and counted. The stage keeps
/// taking in spans meanwhile, within the export share of the memory budget.
pub fn retry_policy() -> opentelemetry_otlp::RetryPolicy {
    opentelemetry_otlp::RetryPolicy::default()
        .with_max_retries(8)
        .with_initial_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_jitter(Duration::from_millis(200))
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
    queue: Queue,
    stats: Arc<Stats>,
    failing: bool,
}

/// One export request: spans of one workload, under the size limit.
struct Request {
    resource: opentelemetry_sdk::Resource,
    spans: Vec<SpanData>,
    /// Bytes the spans hold against the export budget until the request ends.
    held: u64,
    /// Estimated encoded size.
    size: usize,
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
            queue: Queue::new(capacity, stats.clone()),
            stats,
            failing: false,
        }
    }

    /// Exports until `spans_rx` closes, then flushes what is queued. New
    /// spans are taken in (or shed, counted) while a request is in flight,
    /// so a slow collector never backs up into the pipeline.
    pub async fn run(mut self, mut spans_rx: mpsc::Receiver<SpanBatch>, heartbeat: Heartbeat) {
        let mut tick = time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
        let mut open = true;
        while open {
            heartbeat.beat();
            let ticked = tokio::select! {
                batch = spans_rx.recv() => match batch {
                    Some(batch) => {
                        self.queue.push(batch);
                        false
                    }
                    None => break,
                },
                _ = tick.tick() => true,
            };
            while open && (self.queue.len() >= BATCH || (ticked && !self.queue.is_empty())) {
                let before = self.queue.len();
                for request in self.next_requests() {
                    open &= self.export(request, &mut spans_rx, &heartbeat).await;
                }
                if self.queue.len() >= before {
                    break; // refilled while exporting: wait for the next tick or batch
                }
            }
        }
        while !self.queue.is_empty() {
            for request in self.next_requests() {
                self.export(request, &mut spans_rx, &heartbeat).await;
            }
        }
        let _ = self.exporter.shutdown();
        heartbeat.finish();
    }

    /// Takes up to [`BATCH`] queued spans as requests, one per workload,
    /// each under [`MAX_REQUEST_BYTES`] encoded.
    fn next_requests(&mut self) -> Vec<Request> {
        let mut groups: HashMap<WorkloadKey, Request> = HashMap::new();
        let mut order = Vec::new();
        let mut requests = Vec::new();
        for (span, held) in self.queue.take(BATCH) {
            let key = resource::key_of(&span);
            let data = span_data(&span, self.opts);
            let size = encoded_len_estimate(&data);
            if size > MAX_REQUEST_BYTES {
                self.queue.release(held);
                self.stats.budget.shed(Reason::ExportOversize, 1);
                Stats::inc(&self.stats.otlp_spans_dropped);
                continue;
            }
            let group = groups.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                Request {
                    resource: self.resources.get(&span),
                    spans: Vec::new(),
                    held: 0,
                    size: 0,
                }
            });
            if group.size + size > MAX_REQUEST_BYTES {
                requests.push(Request {
                    resource: group.resource.clone(),
                    spans: std::mem::take(&mut group.spans),
                    held: std::mem::take(&mut group.held),
                    size: std::mem::take(&mut group.size),
                });
            }
            group.spans.push(data);
            group.held += held;
            group.size += size;
        }
        requests.extend(order.into_iter().filter_map(|k| groups.remove(&k)));
        requests
    }

    /// Sends one request (the exporter retries retryable failures with
    /// backoff, see [`retry_policy`]) while still taking in new spans;
    /// false when `spans_rx` closed meanwhile.
    async fn export(
        &mut self,
        request: Request,
        spans_rx: &mut mpsc::Receiver<SpanBatch>,
        heartbeat: &Heartbeat,
    ) -> bool {
        let count = request.spans.len() as u64;
        self.exporter.set_resource(&request.resource);
        let (exporter, queue) = (&self.exporter, &mut self.queue);
        let sent = exporter.export(request.spans);
        tokio::pin!(sent);
        let mut beat = time::interval(Duration::from_secs(1));
        let mut open = true;
        let result = loop {
            tokio::select! {
                result = &mut sent => break result,
                batch = spans_rx.recv(), if open => match batch {
                    Some(batch) => queue.push(batch),
                    None => open = false,
                },
                _ = beat.tick() => heartbeat.beat(),
            }
        };
        self.queue.release(request.held);
        match result {
            Ok(()) => {
                Stats::add(&self.stats.otlp_spans_exported, count);
                if std::mem::replace(&mut self.failing, false) {
                    warn!(endpoint = %self.endpoint, "OTLP export recovered");
                }
            }
            Err(error) => {
                Stats::inc(&self.stats.otlp_export_errors);
                Stats::add(&self.stats.otlp_spans_dropped, count);
                self.stats.budget.shed(Reason::ExportFailed, count);
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(endpoint = %self.endpoint, %error, "OTLP export failing after retries; spans are dropped and counted until it recovers");
                } else {
                    debug!(%error, "OTLP export failed again");
                }
            }
        }
        open
    }
}

/// Spans waiting for export, bounded by count and by the export share of
/// the memory budget (spans in flight stay charged until their request ends).
struct Queue {
    spans: VecDeque<(Span, u64)>,
    capacity: usize,
    stats: Arc<Stats>,
}

impl Queue {
    fn new(capacity: usize, stats: Arc<Stats>) -> Self {
        Self {
            spans: VecDeque::new(),
            capacity,
            stats,
        }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn push(&mut self, batch: SpanBatch) {
        let mut shed = 0u64;
        for span in batch.items {
            let bytes = budget::span_bytes(&span);
            if self.spans.len() >= self.capacity || !self.stats.budget.try_reserve(Share::Export, bytes) {
                shed += 1;
                continue;
            }
            self.spans.push_back((span, bytes));
        }
        if shed > 0 {
            Stats::add(&self.stats.otlp_spans_dropped, shed);
            self.stats.budget.shed(Reason::ExportBudget, shed);
        }
    }

    fn take(&mut self, n: usize) -> Vec<(Span, u64)> {
        let n = n.min(self.spans.len());
        self.spans.drain(..n).collect()
    }

    fn release(&self, bytes: u64) {
        self.stats.budget.release(Share::Export, bytes);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.release(self.spans.iter().map(|(_, b)| b).sum());
    }
}

/// An upper bound of a span's protobuf size in an export request: fixed
/// fields, strings with their tags and length prefixes, and every
/// attribute with its KeyValue/AnyValue envelopes. Estimated rather than
/// encoded because the exporter encodes the request itself.
pub fn encoded_len_estimate(span: &SpanData) -> usize {
    const FIXED: usize = 128; // ids, times, kind, flags, status code, envelopes
    const PER_ATTRIBUTE: usize = 20; // tags, length prefixes, AnyValue envelope
    let attributes: usize = span
        .attributes
        .iter()
        .map(|kv| {
            let value = match &kv.value {
                OtelValue::String(s) => s.as_str().len(),
                OtelValue::Array(opentelemetry::Array::String(a)) => {
                    a.iter().map(|s| s.as_str().len() + PER_ATTRIBUTE).sum()
                }
                _ => 16,
            };
            kv.key.as_str().len() + value + PER_ATTRIBUTE
        })
        .sum();
    let status = match &span.status {
        Status::Error { description } => description.len(),
        _ => 0,
    };
    FIXED + span.name.len() + span.span_context.trace_state().header().len() + status + attributes
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
