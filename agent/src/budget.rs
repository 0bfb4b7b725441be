//! One memory budget in bytes for everything the traced processes can make
//! the agent hold: the capture→correlate channel, correlator state, span
//! queues, the OTLP export queue and metric series.
//!
//! The budget is a set of atomics, cheap enough for the hot path: a stage
//! reserves bytes before it holds data and releases them when the data is
//! gone. A reservation that does not fit is refused; the caller sheds the
//! data and counts it under a labelled reason (`meshless_dropped_total`).
//! Nothing waits for memory and nothing grows past its share.
//!
//! Each [`Share`] gets a fixed fraction of the limit, so a flood in one
//! stage (say, a request-shaped write storm filling the capture channel)
//! cannot starve another (the export queue keeps its room).
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use crate::{capture::Event, span::Span};

/// The default budget: well under the DaemonSet's 256 MiB limit, leaving
/// room for code, the ring buffer mapping and allocator slack.
pub const DEFAULT_LIMIT: u64 = 128 * 1024 * 1024;

macro_rules! shares {
    ($($variant:ident = $name:literal, $percent:literal;)*) => {
        /// What a reservation is for; each share has its own cap.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Share { $($variant,)* }

        impl Share {
            pub const ALL: &'static [Share] = &[$(Share::$variant,)*];

            /// Label value in metrics.
            pub fn name(self) -> &'static str {
                match self { $(Share::$variant => $name,)* }
            }

            /// Percent of the whole budget this share may use.
            fn percent(self) -> u64 {
                match self { $(Share::$variant => $percent,)* }
            }
        }
    };
}

shares! {
    Capture = "capture", 25;
    Correlate = "correlate", 30;
    Spans = "spans", 10;
    Export = "export", 20;
    Metrics = "metrics", 15;
}

macro_rules! reasons {
    ($($variant:ident = $name:literal: $doc:literal;)*) => {
        /// Why data was shed; the `reason` label of `meshless_dropped_total`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason { $(#[doc = $doc] $variant,)* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// Label value in metrics.
            pub fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }
        }
    };
}

reasons! {
    CaptureBudget = "capture_budget": "Events shed because the capture→correlate share was full.";
    CaptureQueue = "capture_queue": "Events shed because the correlator was behind (channel full).";
    CorrelateBudget = "correlate_budget": "Connection state shed because the correlator's share was full.";
    SpanBudget = "span_budget": "Spans shed because the exporters' input share was full.";
    SpanQueue = "span_queue": "Spans shed because an exporter was behind (channel full).";
    ExportBudget = "export_budget": "Spans shed because the OTLP export queue's share was full.";
    ExportFailed = "export_failed": "Spans dropped after the collector refused them or retries ran out.";
    ExportOversize = "export_oversize": "Spans larger than one OTLP request may be.";
    ExportShutdown = "export_shutdown": "Spans still queued when the agent stopped, dropped because the collector had failed or the final flush ran out of time.";
    MetricSeries = "metric_series": "Metric series not created because the series share was full.";
}

const SHARES: usize = Share::ALL.len();
const REASONS: usize = Reason::ALL.len();

/// The shared byte accountant (one per agent, inside [`crate::stats::Stats`]).
#[derive(Debug)]
pub struct Budget {
    limit: AtomicU64,
    used: [AtomicU64; SHARES],
    dropped: [AtomicU64; REASONS],
}

impl Default for Budget {
    /// Unlimited until [`Budget::set_limit`] is called (tests, tools).
    fn default() -> Self {
        Self {
            limit: AtomicU64::new(u64::MAX),
            used: std::array::from_fn(|_| AtomicU64::new(0)),
            dropped: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Budget {
    /// A budget of `bytes` in total.
    pub fn new(bytes: u64) -> Self {
        let b = Self::default();
        b.set_limit(bytes);
        b
    }

    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// The whole budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The most bytes `share` may hold.
    pub fn limit_of(&self, share: Share) -> u64 {
        let limit = self.limit();
        if limit == u64::MAX {
            return u64::MAX;
        }
        limit / 100 * share.percent()
    }

    /// Bytes `share` holds now.
    pub fn used(&self, share: Share) -> u64 {
        self.used[share as usize].load(Ordering::Relaxed)
    }

    /// Bytes `share` may still reserve.
    pub fn room(&self, share: Share) -> u64 {
        self.limit_of(share).saturating_sub(self.used(share))
    }

    /// True when `share` holds more than its cap (for stages that report
    /// their size with [`Budget::set_used`] and must shed to get back under).
    pub fn over(&self, share: Share) -> bool {
        self.used(share) > self.limit_of(share)
    }

    /// Reserves `bytes` for `share`; false (and nothing reserved) when they
    /// do not fit. The caller then sheds the data and calls [`Budget::shed`].
    pub fn try_reserve(&self, share: Share, bytes: u64) -> bool {
        let used = &self.used[share as usize];
        let cap = self.limit_of(share);
        // fetch_add + undo instead of a CAS loop: one atomic op on the happy
        // path; a concurrent reserver may see a transient overshoot and be
        // refused, which only errs on the side of shedding.
        let before = used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > cap {
            self.release(share, bytes);
            return false;
        }
        true
    }

    /// Gives back bytes reserved with [`Budget::try_reserve`].
    pub fn release(&self, share: Share, bytes: u64) {
        let _ = self.used[share as usize]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(bytes)));
    }

    /// Reports the whole size of a share that a stage measures itself (the
    /// correlator's `state_bytes()`, metric series); see [`Budget::over`].
    pub fn set_used(&self, share: Share, bytes: u64) {
        self.used[share as usize].store(bytes, Ordering::Relaxed);
    }

    /// Counts `n` items shed for `reason`.
    pub fn shed(&self, reason: Reason, n: u64) {
        self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Items shed so far for `reason`.
    pub fn dropped(&self, reason: Reason) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// (reason, count) for every reason, for `/metrics` and logs.
    pub fn dropped_all(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL.iter().map(|r| (r.name(), self.dropped(*r))).collect()
    }

    /// (share, used, limit) for every share, for `/metrics`.
    pub fn shares(&self) -> Vec<(&'static str, u64, u64)> {
        Share::ALL
            .iter()
            .map(|s| (s.name(), self.used(*s), self.limit_of(*s)))
            .collect()
    }

    /// A reservation released when the returned guard is dropped, so data
    /// that crosses a channel gives its bytes back wherever it ends.
    pub fn charge(self: &Arc<Self>, share: Share, bytes: u64) -> Option<Charge> {
        self.try_reserve(share, bytes).then(|| Charge {
            budget: self.clone(),
            share,
            bytes,
        })
    }
}

/// Bytes held against a share until dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    share: Share,
    bytes: u64,
}

impl Charge {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.share, self.bytes);
    }
}

/// Items that cross a channel with their bytes reserved.
#[derive(Debug)]
pub struct Charged<T> {
    pub items: T,
    _charge: Charge,
}

impl<T> Charged<T> {
    pub fn new(items: T, charge: Charge) -> Self {
        Self { items, _charge: charge }
    }
}

/// Bytes an event holds (the struct and its owned payload copy).
pub fn event_bytes(ev: &Event) -> u64 {
    let payload = match &ev.body {
        crate::capture::EventBody::Data { payload, .. } => payload.len(),
        _ => 0,
    };
    (std::mem::size_of::<Event>() + payload) as u64
}

/// Bytes a span holds, approximately: the struct plus its strings. An
/// estimate (allocator rounding is not counted), used to bound queues.
pub fn span_bytes(span: &Span) -> u64 {
    let headers: usize = span
        .request_headers
        .iter()
        .chain(&span.response_headers)
        .map(|(k, v)| k.len() + v.len() + 2 * std::mem::size_of::<String>())
        .sum();
    let strings = span.method.heap_bytes()
        + span.request.heap_bytes()
        + span.process.name.len()
        + span.process.executable.len()
        + span.trace_state.as_ref().map_or(0, String::len)
        + span.peer_comm.as_ref().map_or(0, |c| c.len());
    // Shared by the spans to one address (see k8s::index::Index::shared),
    // but counted for each: an upper bound.
    let peer = span.peer_k8s.as_ref().map_or(0, |p| {
        std::mem::size_of::<crate::k8s::PeerK8s>()
            + [&p.namespace, &p.workload, &p.pod]
                .iter()
                .map(|s| s.as_ref().map_or(0, String::len))
                .sum::<usize>()
            + p.service_fqdn.as_ref().map_or(0, |s| s.len())
    });
    let rpc = span.rpc.as_ref().map_or(0, |r| {
        std::mem::size_of::<crate::span::Rpc>() + r.service.len() + r.method.len()
    });
    (std::mem::size_of::<Span>() + headers + strings + peer + rpc) as u64
}

/// `meshless_dropped_total{reason}` and the budget's per-share gauges.
pub fn encode_prometheus(
    budget: &Budget,
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::{
        encoding::EncodeMetric,
        metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    };
    let mut metric = encoder.encode_descriptor(
        "meshless_dropped",
        "Items shed to stay within the memory budget or because a stage was behind, by reason.",
        None,
        MetricType::Counter,
    )?;
    for (reason, n) in budget.dropped_all() {
        ConstCounter::new(n).encode(metric.encode_family(&[("reason", reason)])?)?;
    }
    let shares = budget.shares();
    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let mut metric = encoder.encode_descriptor(
        "meshless_memory_used_bytes",
        "Bytes held against each share of the memory budget.",
        None,
        MetricType::Gauge,
    )?;
    for (share, used, _) in &shares {
        gauge(*used).encode(metric.encode_family(&[("share", *share)])?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "meshless_memory_limit_bytes",
        "Bytes each share of the memory budget may hold (--memory-limit).",
        None,
        MetricType::Gauge,
    )?;
    for (share, _, limit) in &shares {
        gauge(*limit).encode(metric.encode_family(&[("share", *share)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_reservation_past_the_share_is_refused_and_nothing_is_held() {
        let b = Budget::new(100 * MIB);
        let cap = b.limit_of(Share::Capture);
        assert_eq!(cap, 25 * MIB);
        assert!(b.try_reserve(Share::Capture, cap - 10));
        assert!(!b.try_reserve(Share::Capture, 11));
        assert_eq!(b.used(Share::Capture), cap - 10);
        assert!(b.try_reserve(Share::Capture, 10));
        b.release(Share::Capture, cap);
        assert_eq!(b.used(Share::Capture), 0);
    }

    #[test]
    fn one_full_share_leaves_the_others_their_room() {
        let b = Budget::new(100 * MIB);
        while b.try_reserve(Share::Capture, MIB) {}
        assert!(b.try_reserve(Share::Export, 19 * MIB));
    }

    #[test]
    fn a_charge_gives_its_bytes_back_when_dropped() {
        let b = Arc::new(Budget::new(10 * MIB));
        let c = b.charge(Share::Spans, 1000).expect("fits");
        assert_eq!(b.used(Share::Spans), 1000);
        let batch = Charged::new(vec![1u8], c);
        drop(batch);
        assert_eq!(b.used(Share::Spans), 0);
        assert!(b.charge(Share::Spans, 2 * MIB).is_none());
    }

    #[test]
    fn drops_are_counted_per_reason() {
        let b = Budget::default();
        b.shed(Reason::ExportFailed, 3);
        b.shed(Reason::CaptureQueue, 1);
        let all = b.dropped_all();
        assert!(all.contains(&("export_failed", 3)));
        assert!(all.contains(&("capture_queue", 1)));
        assert!(all.contains(&("span_queue", 0)));
    }

    #[test]
    fn a_self_measured_share_reports_when_it_is_over() {
        let b = Budget::new(100 * MIB);
        b.set_used(Share::Correlate, 31 * MIB);
        assert!(b.over(Share::Correlate));
        b.set_used(Share::Correlate, 29 * MIB);
        assert!(!b.over(Share::Correlate));
    }

    #[test]
    fn the_default_budget_is_unlimited() {
        let b = Budget::default();
        assert!(b.try_reserve(Share::Capture, u64::MAX / 2));
        assert!(!b.over(Share::Capture));
    }
}
