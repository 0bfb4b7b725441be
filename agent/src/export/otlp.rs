//! OTLP trace export (gRPC or HTTP/protobuf). Spans keep the
//! kernel-observed times and the ids the correlator assigned; they are
//! encoded as protobuf directly ([`super::encode`]), one request per batch
//! with every workload in it, and sent by [`super::transport`]. The queue
//! in front is bounded: while the collector is away new spans are dropped
//! and counted, memory stays flat, and export resumes by itself when the
//! collector is back.
use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::Bytes;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use tokio::{sync::mpsc, time};
use tracing::{debug, warn};

pub use super::transport::SpanExporter;
use super::{attributes, encode::Encoder, resource::Resources};
use crate::{
    budget::{self, Charged, Reason, Share},
    config::otel::OtlpTarget,
    health::Heartbeat,
    span::Span,
    stats::Stats,
};

/// Spans that make a flush worth sending before the tick.
const BATCH: usize = 512;
/// Most spans taken from the queue at once: when the queue is behind, one
/// request carries more spans (still split under [`MAX_REQUEST_BYTES`]), so
/// the round trips per span fall and the exporter catches up.
const MAX_TAKE: usize = 4 * BATCH;
/// Largest export request (estimated encoded bytes): under the 4 MiB that
/// gRPC servers, the OTel Collector included, accept by default, with
/// room for the resource and scope envelopes.
pub const MAX_REQUEST_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;
/// Longest a span waits in the queue before a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Longest the exporter keeps sending what is queued once its input closes
/// (a request being sent then finishes within its export timeout).
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Spans on their way to an exporter (in the batches the pipeline routed
/// them in), their bytes held against the [`Share::Spans`] budget until
/// the batch is dropped.
pub type SpanBatch = Charged<Vec<Vec<Span>>>;

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("building the OTLP exporter for {endpoint}: {reason}")]
    Build { endpoint: String, reason: String },
}

pub fn build_span_exporter(t: &OtlpTarget) -> Result<SpanExporter, OtlpError> {
    SpanExporter::new(t).map_err(|reason| build_error(t, reason))
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

/// Retries of one metrics export request, as the OTel exporters do: the exporter
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

pub(super) fn metadata(headers: &[(String, String)]) -> Result<tonic::metadata::MetadataMap, String> {
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

pub(super) fn tls(t: &OtlpTarget) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
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
    exporter: SpanExporter,
    endpoint: String,
    encoder: Encoder,
    queue: Queue,
    stats: Arc<Stats>,
    failing: bool,
}

/// One export request: encoded spans of any workloads, under the size limit.
struct Request {
    body: Bytes,
    spans: u64,
    /// Bytes the spans hold against the export budget until the request ends.
    held: u64,
}

impl OtlpTraces {
    pub fn new(
        exporter: SpanExporter,
        endpoint: String,
        resources: Resources,
        capture_query: bool,
        capacity: usize,
        stats: Arc<Stats>,
    ) -> Self {
        let opts = attributes::Options {
            capture_query,
            process: false,
        };
        Self {
            exporter,
            endpoint,
            encoder: Encoder::new(resources, opts),
            queue: Queue::new(capacity, stats.clone()),
            stats,
            failing: false,
        }
    }

    /// Exports until `spans_rx` closes, then flushes what is queued (see
    /// [`Self::stopping`]). New spans are taken in (or shed, counted) while
    /// a request is in flight, so a slow collector never backs up into the
    /// pipeline.
    pub async fn run(mut self, mut spans_rx: mpsc::Receiver<SpanBatch>, heartbeat: Heartbeat) {
        let mut tick = time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
        // Set when the input closes: the end of the final flush.
        let mut deadline = None;
        while deadline.is_none() {
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
            while deadline.is_none() && (self.queue.len() >= BATCH || (ticked && !self.queue.is_empty())) {
                let before = self.queue.len();
                for request in self.next_requests() {
                    match deadline {
                        None => {
                            if !self.export(request, &mut spans_rx, &heartbeat).await {
                                deadline = Some(time::Instant::now() + FINAL_FLUSH);
                            }
                        }
                        Some(end) => self.send_or_give_up(request, end, &mut spans_rx, &heartbeat).await,
                    }
                }
                if self.queue.len() >= before {
                    break; // refilled while exporting: wait for the next tick or batch
                }
            }
        }
        let end = deadline.unwrap_or_else(|| time::Instant::now() + FINAL_FLUSH);
        while !self.queue.is_empty() {
            if self.stopping(end) {
                self.give_up_queue();
                break;
            }
            for request in self.next_requests() {
                self.send_or_give_up(request, end, &mut spans_rx, &heartbeat).await;
            }
        }
        heartbeat.finish();
    }

    /// Whether, the input closed, what is left is dropped instead of sent:
    /// sending goes on while the collector takes it, until FINAL_FLUSH after
    /// the input closed (`end`; Kubernetes gives a pod 30 s to stop), and a
    /// collector that failed (now or before) gets no more tries, rather than
    /// each queued request waiting out its retries.
    fn stopping(&self, end: time::Instant) -> bool {
        self.failing || time::Instant::now() >= end
    }

    async fn send_or_give_up(
        &mut self,
        request: Request,
        end: time::Instant,
        spans_rx: &mut mpsc::Receiver<SpanBatch>,
        heartbeat: &Heartbeat,
    ) {
        if self.stopping(end) {
            self.queue.release(request.held);
            self.dropped_at_stop(request.spans);
        } else {
            self.export(request, spans_rx, heartbeat).await;
        }
    }

    /// Drops what is still queued, unencoded, at shutdown.
    fn give_up_queue(&mut self) {
        let n = self.queue.len() as u64;
        self.queue.clear();
        self.dropped_at_stop(n);
    }

    fn dropped_at_stop(&self, spans: u64) {
        Stats::add(&self.stats.otlp_spans_dropped, spans);
        self.stats.budget.shed(Reason::ExportShutdown, spans);
    }

    /// Takes up to [`MAX_TAKE`] queued spans as encoded requests, each under
    /// [`MAX_REQUEST_BYTES`]; a span larger than that alone is dropped,
    /// counted.
    fn next_requests(&mut self) -> Vec<Request> {
        // Encoded where they wait, then dropped: a span is a large struct,
        // and moving it out first cost more than encoding it (perf).
        let n = MAX_TAKE.min(self.queue.len());
        let (spans, held) = self.queue.front(n);
        let mut requests = Vec::new();
        let oversize = self.encoder.encode(&spans, MAX_REQUEST_BYTES, |body, members| {
            requests.push(Request {
                body: Bytes::copy_from_slice(body),
                spans: members.len() as u64,
                held: members.iter().map(|&i| held[i as usize]).sum(),
            });
        });
        for i in oversize {
            self.queue.release(held[i as usize]);
            self.stats.budget.shed(Reason::ExportOversize, 1);
            Stats::inc(&self.stats.otlp_spans_dropped);
        }
        drop(spans);
        self.queue.remove_front(n);
        requests
    }

    /// Sends one request (retrying retryable failures with backoff, see
    /// [`super::transport`]) while still taking in new spans; false when
    /// `spans_rx` closed meanwhile.
    async fn export(
        &mut self,
        request: Request,
        spans_rx: &mut mpsc::Receiver<SpanBatch>,
        heartbeat: &Heartbeat,
    ) -> bool {
        let count = request.spans;
        let (exporter, queue) = (&mut self.exporter, &mut self.queue);
        let sent = exporter.export(request.body);
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
/// Kept in the vectors they arrived in: a span is a large struct, and
/// moving every one into a single queue was 2 % of the agent's CPU (perf).
struct Queue {
    /// Batches in arrival order; the first one's leading `taken` spans
    /// are already encoded.
    chunks: VecDeque<Vec<Span>>,
    taken: usize,
    /// Budget bytes reserved for each span not yet taken, in order.
    held: VecDeque<u64>,
    capacity: usize,
    stats: Arc<Stats>,
}

impl Queue {
    fn new(capacity: usize, stats: Arc<Stats>) -> Self {
        Self {
            chunks: VecDeque::new(),
            taken: 0,
            held: VecDeque::new(),
            capacity,
            stats,
        }
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn push(&mut self, batch: SpanBatch) {
        let mut shed = 0u64;
        for mut chunk in batch.items {
            chunk.retain(|span| {
                let bytes = budget::span_bytes(span);
                if self.held.len() >= self.capacity || !self.stats.budget.try_reserve(Share::Export, bytes) {
                    shed += 1;
                    return false;
                }
                self.held.push_back(bytes);
                true
            });
            if !chunk.is_empty() {
                self.chunks.push_back(chunk);
            }
        }
        if shed > 0 {
            Stats::add(&self.stats.otlp_spans_dropped, shed);
            self.stats.budget.shed(Reason::ExportBudget, shed);
        }
    }

    /// The first `n` spans (n <= len) and their reserved bytes.
    fn front(&self, n: usize) -> (Vec<&Span>, Vec<u64>) {
        let spans = self
            .chunks
            .iter()
            .enumerate()
            .flat_map(|(i, c)| &c[if i == 0 { self.taken } else { 0 }..])
            .take(n)
            .collect();
        (spans, self.held.iter().take(n).copied().collect())
    }

    /// Drops the first `n` spans (encoded; their bytes stay reserved
    /// until their request ends). Spans taken from the middle of a batch
    /// are freed with it, or when they are half of it (the rest moved
    /// forward), so at most half a batch outlives its budget reservation.
    fn remove_front(&mut self, mut n: usize) {
        let n_held = n.min(self.held.len());
        self.held.drain(..n_held);
        while let Some(first) = self.chunks.front_mut() {
            let left = first.len() - self.taken;
            if n < left {
                self.taken += n;
                if self.taken * 2 >= first.len() {
                    first.drain(..self.taken);
                    self.taken = 0;
                }
                return;
            }
            n -= left;
            self.chunks.pop_front();
            self.taken = 0;
        }
    }

    /// Drops every queued span, giving back its reservation.
    fn clear(&mut self) {
        let held = self.held.drain(..).sum();
        self.release(held);
        self.chunks.clear();
        self.taken = 0;
    }

    fn release(&self, bytes: u64) {
        self.stats.budget.release(Share::Export, bytes);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::encode::tests::span;

    fn batch(stats: &Stats, paths: &[&[&str]]) -> SpanBatch {
        let chunks = paths.iter().map(|c| c.iter().map(|p| span(1, p)).collect()).collect();
        Charged::new(chunks, stats.budget.charge(Share::Spans, 0).expect("charge"))
    }

    fn targets(spans: &[&Span]) -> Vec<String> {
        spans.iter().map(|s| s.target().to_owned()).collect()
    }

    #[test]
    fn the_queue_hands_out_spans_in_arrival_order_across_its_batches() {
        let stats = Arc::new(Stats::default());
        let mut q = Queue::new(100, stats.clone());
        q.push(batch(&stats, &[&["/a0", "/a1", "/a2"], &[]]));
        q.push(batch(&stats, &[&["/b0", "/b1"]]));
        assert_eq!(q.len(), 5);
        let (spans, held) = q.front(2);
        assert_eq!(targets(&spans), ["/a0", "/a1"]);
        assert_eq!(held, [budget::span_bytes(spans[0]), budget::span_bytes(spans[1])]);
        q.remove_front(2);
        // Across a batch boundary, from the middle of the first batch.
        let (spans, _) = q.front(2);
        assert_eq!(targets(&spans), ["/a2", "/b0"]);
        q.remove_front(2);
        let (spans, held) = q.front(1);
        assert_eq!(targets(&spans), ["/b1"]);
        assert_eq!(held.len(), 1);
        assert_eq!(q.len(), 1);
        q.remove_front(1);
        assert!(q.is_empty() && q.chunks.is_empty());
        assert_eq!(q.front(1).0.len(), 0);
    }

    #[test]
    fn the_queue_sheds_past_its_capacity_and_releases_what_it_holds_when_dropped() {
        let stats = Arc::new(Stats::default());
        let mut q = Queue::new(3, stats.clone());
        q.push(batch(&stats, &[&["/a0", "/a1"], &["/b0", "/b1"]]));
        assert_eq!(q.len(), 3);
        assert_eq!(stats.otlp_spans_dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(targets(&q.front(3).0), ["/a0", "/a1", "/b0"]);
        assert!(stats.budget.used(Share::Export) > 0);
        drop(q);
        assert_eq!(stats.budget.used(Share::Export), 0);
    }
}
