//! A metric family whose number of series is bounded and whose idle series
//! expire. Label values come from traffic the traced processes control
//! (methods, peers, pod IPs that churn), so without a cap one client can
//! grow `/metrics` without end.
//!
//! Past the cap a recording goes to one overflow series labelled only
//! `otel_metric_overflow="true"`, as the OpenTelemetry SDKs do
//! (`otel.metric.overflow`), and is counted. prometheus-client has no cap
//! or expiry of its own; its `Family` is kept for storage and encoding and
//! a side table remembers when each series was last written.
use std::{
    hash::BuildHasher,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::family::Family;

use crate::stats::Stats;

/// Label set of a bounded family, in a fixed order per family.
pub type Labels = Vec<(&'static str, String)>;

/// Most series one family keeps (the overflow series comes on top).
pub const MAX_SERIES_PER_FAMILY: usize = 2000;
/// Series not written for this long are removed.
pub const SERIES_EXPIRY_SECS: u64 = 10 * 60;
/// How often stale series are looked for.
const SWEEP_EVERY_SECS: u64 = 30;

/// The label set of the overflow series.
pub fn overflow_labels() -> Labels {
    vec![("otel_metric_overflow", "true".to_owned())]
}

#[derive(Debug, Clone, Copy)]
pub struct SeriesLimits {
    pub max_series: usize,
    pub expiry_secs: u64,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        Self {
            max_series: MAX_SERIES_PER_FAMILY,
            expiry_secs: SERIES_EXPIRY_SECS,
        }
    }
}

/// The series written, each with a handle on its metric (prometheus-client
/// metrics share their storage between clones): a write finds its series
/// by one fast hash of the borrowed label values, so writing to an existing
/// series copies no label (owned labels are made once, for a new series).
#[derive(Debug)]
struct Tracker<M> {
    /// By label hash; a bucket holds more than one series only on a collision.
    series: foldhash::HashMap<u64, Vec<Series<M>>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
    last_sweep: u64,
}

#[derive(Debug)]
struct Series<M> {
    labels: Labels,
    metric: M,
    /// Second (of the writers' clock) the series was last written.
    last_write: u64,
}

impl<M> Series<M> {
    fn is(&self, labels: &[(&'static str, &str)]) -> bool {
        self.labels.len() == labels.len()
            && self
                .labels
                .iter()
                .zip(labels)
                .all(|((k, v), (lk, lv))| same_key(k, lk) && v == lv)
    }
}

/// Label names are `&'static str`s from one array per call site: equal
/// names are almost always the same string, compared without `memcmp`.
fn same_key(a: &str, b: &str) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

/// The hash of a label set: its values (and names' lengths). A family's
/// names are the same on every write, so hashing their text only cost
/// time; [`Series::is`] still compares names and values.
fn label_hash(hasher: &impl BuildHasher, labels: &[(&str, &str)]) -> u64 {
    use std::hash::Hasher;
    let mut h = hasher.build_hasher();
    for (k, v) in labels {
        h.write_usize(k.len());
        h.write_usize(v.len());
        h.write(v.as_bytes());
    }
    h.finish()
}

/// Where a tracker's series live: one prometheus-client family, or two
/// families with the same labels that are always written together (one
/// label lookup serves both).
pub trait Store {
    /// The handle(s) a series is written through.
    type Metric;
    /// The series of `labels`, created if new.
    fn create(&self, labels: &Labels) -> Self::Metric;
    fn remove(&self, labels: &Labels);
}

/// One family of metrics built by a constructor function.
pub type Single<M> = Family<Labels, M, fn() -> M>;

impl<M: prometheus_client::metrics::TypedMetric + Clone> Store for Single<M> {
    type Metric = M;

    fn create(&self, labels: &Labels) -> M {
        self.get_or_create(labels).clone()
    }

    fn remove(&self, labels: &Labels) {
        Family::remove(self, labels);
    }
}

impl<A: Store, B: Store> Store for (A, B) {
    type Metric = (A::Metric, B::Metric);

    fn create(&self, labels: &Labels) -> Self::Metric {
        (self.0.create(labels), self.1.create(labels))
    }

    fn remove(&self, labels: &Labels) {
        self.0.remove(labels);
        self.1.remove(labels);
    }
}

/// A family (or a pair, see [`Store`]) with a series cap and expiry.
#[derive(Debug)]
pub struct Tracked<S: Store> {
    family: S,
    tracker: Mutex<Tracker<S::Metric>>,
    limits: SeriesLimits,
    stats: Arc<Stats>,
}

/// One bounded family.
pub type Bounded<M> = Tracked<Single<M>>;
/// Two bounded families with the same labels, written together.
pub type BoundedPair<A, B> = Tracked<(Single<A>, Single<B>)>;

impl<M: prometheus_client::metrics::TypedMetric + Clone> Bounded<M> {
    pub fn new(constructor: fn() -> M, limits: SeriesLimits, stats: Arc<Stats>) -> Self {
        Tracked::with_store(Family::new_with_constructor(constructor), limits, stats)
    }

    /// The family to register (shares storage with `self`).
    pub fn family(&self) -> Single<M> {
        self.family.clone()
    }
}

impl<A, B> BoundedPair<A, B>
where
    A: prometheus_client::metrics::TypedMetric + Clone,
    B: prometheus_client::metrics::TypedMetric + Clone,
{
    pub fn pair(a: fn() -> A, b: fn() -> B, limits: SeriesLimits, stats: Arc<Stats>) -> Self {
        let store = (Family::new_with_constructor(a), Family::new_with_constructor(b));
        Tracked::with_store(store, limits, stats)
    }

    /// The two families to register (sharing storage with `self`).
    pub fn families(&self) -> (Single<A>, Single<B>) {
        self.family.clone()
    }
}

impl<S: Store> Tracked<S> {
    fn with_store(family: S, limits: SeriesLimits, stats: Arc<Stats>) -> Self {
        Self {
            family,
            tracker: Mutex::new(Tracker {
                series: foldhash::HashMap::default(),
                len: 0,
                hasher: foldhash::fast::RandomState::default(),
                last_sweep: 0,
            }),
            limits,
            stats,
        }
    }

    /// Writes to the series of `labels`, or to the overflow series when the
    /// family is full, at second `now_secs` of the caller's clock (one read
    /// serves every family a span writes; tests drive time). Returns true
    /// when the write went to the overflow series.
    ///
    /// Series are removed only here, by the sweep at the start of a call
    /// ([`Self::expire`]): the Istio cache in `prom.rs` (`IstioMemo`)
    /// relies on a series it looked up staying in the family for the rest
    /// of that second. Removing series anywhere else (evicting under cap
    /// pressure, say) must invalidate that cache too.
    pub fn with_at(&self, labels: &[(&'static str, &str)], now_secs: u64, write: impl FnOnce(&S::Metric)) -> bool {
        // A poisoned lock only means another writer panicked; the table
        // itself is still consistent.
        let mut guard = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        if now_secs.saturating_sub(t.last_sweep) >= SWEEP_EVERY_SECS {
            t.last_sweep = now_secs;
            self.expire(t, now_secs);
        }
        let hash = label_hash(&t.hasher, labels);
        if let Some(series) = t
            .series
            .get_mut(&hash)
            .and_then(|b| b.iter_mut().find(|s| s.is(labels)))
        {
            series.last_write = now_secs;
            write(&series.metric);
            return false;
        }
        let overflow = t.len >= self.limits.max_series;
        let (chosen, hash) = if !overflow {
            let owned: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
            (owned, hash)
        } else {
            Stats::inc(&self.stats.metric_series_overflow);
            // Tracked (so it expires too) but beyond the cap by one.
            let hash = label_hash(&t.hasher, OVERFLOW);
            (overflow_labels(), hash)
        };
        let bucket = t.series.entry(hash).or_default();
        let at = match bucket.iter().position(|s| s.labels == chosen) {
            Some(at) => at,
            None => {
                bucket.push(Series {
                    metric: self.family.create(&chosen),
                    labels: chosen,
                    last_write: now_secs,
                });
                t.len += 1;
                bucket.len() - 1
            }
        };
        let series = &mut bucket[at];
        series.last_write = now_secs;
        write(&series.metric);
        overflow
    }

    /// Series currently kept (overflow series included).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// Removes the series idle past the expiry (the only place series are
    /// removed, see [`Self::with_at`]).
    fn expire(&self, t: &mut Tracker<S::Metric>, now_secs: u64) {
        let expiry = self.limits.expiry_secs;
        let family = &self.family;
        let stats = &self.stats;
        let mut removed = 0;
        t.series.retain(|_, bucket| {
            bucket.retain(|series| {
                let keep = now_secs.saturating_sub(series.last_write) < expiry;
                if !keep {
                    family.remove(&series.labels);
                    Stats::inc(&stats.metric_series_expired);
                    removed += 1;
                }
                keep
            });
            !bucket.is_empty()
        });
        t.len -= removed;
    }
}

/// The overflow series' labels, borrowed (hashed like any label set).
const OVERFLOW: &[(&str, &str)] = &[("otel_metric_overflow", "true")];

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    fn labels(i: usize) -> Labels {
        vec![("http_request_method", format!("M{i}"))]
    }

    fn with_at(b: &Bounded<Counter>, labels: &Labels, now_secs: u64) {
        let borrowed: Vec<(&'static str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        b.with_at(&borrowed, now_secs, |c| {
            c.inc();
        });
    }

    fn bounded(max_series: usize) -> (Bounded<Counter>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let limits = SeriesLimits {
            max_series,
            expiry_secs: 600,
        };
        (Bounded::new(Counter::default, limits, stats.clone()), stats)
    }

    #[test]
    fn series_past_the_cap_go_to_one_overflow_series_and_are_counted() {
        let (b, stats) = bounded(10);
        for i in 0..3000 {
            with_at(&b, &labels(i), 0);
        }
        assert_eq!(b.len(), 11);
        assert_eq!(b.family.get_or_create(&overflow_labels()).get(), 2990);
        assert_eq!(
            stats.metric_series_overflow.load(std::sync::atomic::Ordering::Relaxed),
            2990
        );
        // Existing series keep counting.
        with_at(&b, &labels(3), 1);
        assert_eq!(b.family.get_or_create(&labels(3)).get(), 2);
    }

    #[test]
    fn series_not_written_for_the_expiry_period_are_removed() {
        let (b, stats) = bounded(10);
        with_at(&b, &labels(1), 0);
        with_at(&b, &labels(2), 500);
        with_at(&b, &labels(2), 700);
        assert_eq!(b.len(), 1, "series 1 expired, series 2 is fresh");
        assert_eq!(
            stats.metric_series_expired.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_pair_writes_and_expires_both_families_of_one_label_set() {
        let stats = Arc::new(Stats::default());
        let limits = SeriesLimits {
            max_series: 10,
            expiry_secs: 600,
        };
        let pair = BoundedPair::pair(
            Counter::default as fn() -> Counter,
            Counter::default as fn() -> Counter,
            limits,
            stats.clone(),
        );
        let (first, second) = pair.families();
        let borrowed = [("http_request_method", "GET")];
        for now in [0, 1] {
            pair.with_at(&borrowed, now, |(a, b)| {
                a.inc();
                b.inc_by(10);
            });
        }
        assert_eq!(first.get_or_create(&labels_get()).get(), 2);
        assert_eq!(second.get_or_create(&labels_get()).get(), 20);
        assert_eq!(pair.len(), 1, "one series for both families");
        pair.with_at(&[("http_request_method", "PUT")], 700, |_| {});
        assert_eq!(pair.len(), 1, "GET expired");
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("first", "", first);
        registry.register("second", "", second);
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(!text.contains("GET"), "expired from both families: {text}");
        assert_eq!(text.matches("PUT").count(), 2, "{text}");
    }

    fn labels_get() -> Labels {
        vec![("http_request_method", "GET".to_owned())]
    }
}
