//! The userspace pipeline after capture, drivable without the kernel:
//! decoded events → correlate → route (enrich, metrics, sampling) → sinks.
//!
//! The agent runs it on the correlate task and feeds its sinks from
//! channels to the exporter threads; the replay benchmark runs the same
//! thing on one thread with an encoding sink that discards the bytes.
use std::sync::{atomic::Ordering, Arc};

use crate::{
    admin,
    budget::{self, Charged, Reason, Share},
    capture::Event,
    correlate::Correlator,
    export::{otlp::SpanBatch, resource::Resources, sampler::Sampler},
    k8s::index::{Index, Verdict},
    metrics::{OtlpMetrics, Peers, Prometheus},
    span::Span,
    stats::Stats,
};

/// Where routed spans go: an exporter's queue, or (benchmarks) an encoder.
pub trait Sink: Send {
    fn send(&mut self, spans: Vec<Span>);
    /// Hands on what `send` gathered (called on every correlator tick and
    /// at shutdown).
    fn flush(&mut self) {}
}

/// Spans gathered before an exporter thread is woken for them: about one
/// export request's worth (the OTLP exporter sends 512 spans at a time).
const GATHER_SPANS: usize = 512;

/// Hands spans to an exporter thread if their bytes fit the budget and the
/// exporter keeps up; otherwise sheds them, counted. Spans are gathered
/// up to [`GATHER_SPANS`] or the next tick (≤ 50 ms while traffic flows):
/// waking the exporter for every drained event batch (100 times a second)
/// doubled the agent's context switches (measured, docs/bench/replay.md).
/// Gathered as the batches they came in: a span is a large struct, and
/// copying each into one vector (and regrowing it) showed in the profile.
pub struct ChannelSink {
    tx: tokio::sync::mpsc::Sender<SpanBatch>,
    stats: Arc<Stats>,
    gathered: Vec<Vec<Span>>,
    /// Spans in `gathered`.
    count: usize,
}

impl ChannelSink {
    pub fn new(tx: tokio::sync::mpsc::Sender<SpanBatch>, stats: Arc<Stats>) -> Self {
        Self {
            tx,
            stats,
            gathered: Vec::new(),
            count: 0,
        }
    }

    fn hand_on(&mut self, batches: Vec<Vec<Span>>, n: usize) {
        let stats = &self.stats;
        let n = n as u64;
        let bytes = batches.iter().flatten().map(budget::span_bytes).sum();
        let Some(charge) = stats.budget.charge(Share::Spans, bytes) else {
            Stats::add(&stats.spans_dropped, n);
            return stats.budget.shed(Reason::SpanBudget, n);
        };
        if self.tx.try_send(Charged::new(batches, charge)).is_err() {
            Stats::add(&stats.spans_dropped, n);
            stats.budget.shed(Reason::SpanQueue, n);
        }
    }
}

impl Sink for ChannelSink {
    fn send(&mut self, batch: Vec<Span>) {
        self.count += batch.len();
        self.gathered.push(batch);
        if self.count >= GATHER_SPANS {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.count > 0 {
            let batches = std::mem::take(&mut self.gathered);
            let n = std::mem::take(&mut self.count);
            self.hand_on(batches, n);
        }
    }
}

/// Records metrics for every span, samples, and fans out to the sinks.
pub struct Router {
    pub sinks: Vec<Box<dyn Sink>>,
    pub sampler: Sampler,
    pub prometheus: Arc<Prometheus>,
    pub otlp_metrics: Option<OtlpMetrics>,
    pub names: Resources,
    pub stats: Arc<Stats>,
    pub k8s: Option<Index>,
    pub ready: admin::Ready,
    /// The live map and trace view (`--ui`).
    pub live: Option<crate::ui::Live>,
}

impl Router {
    /// A router with metrics and sampling but no Kubernetes, UI or sinks.
    pub fn plain(sampler: Sampler, names: Resources, stats: Arc<Stats>) -> Self {
        Self {
            sinks: Vec::new(),
            sampler,
            prometheus: Arc::new(Prometheus::new(stats.clone())),
            otlp_metrics: None,
            names,
            stats,
            k8s: None,
            ready: admin::Ready::default(),
            live: None,
        }
    }

    /// Applies pending metadata updates; reports readiness once synced.
    pub fn tick(&mut self) {
        if let Some(ix) = &mut self.k8s {
            ix.refresh();
            if ix.synced() {
                self.ready.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Hands on what the sinks gathered.
    pub fn flush(&mut self) {
        for sink in &mut self.sinks {
            sink.flush();
        }
    }

    pub fn route(&mut self, mut kept: Vec<Span>) {
        if let Some(ix) = &mut self.k8s {
            ix.refresh();
        }
        let second = self.prometheus.second();
        // Filtered in place: a span is a large struct, and moving each one
        // into a new vector showed in the profile.
        kept.retain_mut(|span| {
            if crate::export::is_own_export(span) {
                Stats::inc(&self.stats.spans_own_exports);
                return false;
            }
            if let Some(ix) = &mut self.k8s {
                if ix.enrich(span) == Verdict::Drop {
                    Stats::inc(&self.stats.spans_filtered);
                    return false;
                }
            }
            let service = self.names.service_of(span);
            let peers = Peers::of(span, service, |comm| self.names.service_name(comm));
            self.prometheus.record_at(span, service, &peers, second);
            if let Some(m) = &self.otlp_metrics {
                m.record(span, service);
            }
            let sampled = self.sampler.sample(span);
            if let Some(live) = &self.live {
                live.record(span, service, &peers, sampled);
            }
            if sampled {
                true
            } else {
                Stats::inc(&self.stats.spans_sampled_out);
                false
            }
        });
        if kept.is_empty() {
            return;
        }
        if let Some((last, others)) = self.sinks.split_last_mut() {
            for sink in others {
                sink.send(kept.clone());
            }
            last.send(kept);
        }
    }
}

/// Correlation and routing on one thread.
pub struct Pipeline {
    pub correlator: Correlator,
    pub router: Router,
    spans: Vec<Span>,
}

impl Pipeline {
    pub fn new(correlator: Correlator, router: Router) -> Self {
        Self {
            correlator,
            router,
            spans: Vec::new(),
        }
    }

    /// Correlates a batch of events and routes the spans they finish.
    pub fn events(&mut self, events: impl IntoIterator<Item = Event>) {
        for ev in events {
            self.correlator.handle(ev, &mut self.spans);
        }
        self.route();
    }

    /// Periodic work at kernel time `now_ktime_ns` (link waits, idle
    /// connections, metadata updates).
    pub fn tick(&mut self, now_ktime_ns: u64) {
        self.correlator.tick(now_ktime_ns, &mut self.spans);
        self.router.tick();
        self.route();
        self.router.flush();
    }

    /// Emits everything still held (shutdown) and returns the router.
    pub fn finish(mut self) -> Router {
        self.correlator.flush(&mut self.spans);
        self.route();
        self.router.flush();
        self.router
    }

    fn route(&mut self) {
        if !self.spans.is_empty() {
            // The next batch is likely as large: sized once, not regrown
            // (each regrowth copied every span so far).
            let next = Vec::with_capacity(self.spans.len());
            self.router.route(std::mem::replace(&mut self.spans, next));
        }
    }
}
