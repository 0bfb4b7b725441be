//! Stage supervision: every long-running stage (capture, correlate, each
//! exporter) holds a [`Heartbeat`] and beats it from its loop. The agent is
//! unhealthy when a stage has ended while the agent is not shutting down,
//! or when a stage's last beat is older than the stall limit while it has
//! input pending. `/healthz` answers 503 with the reason, `/readyz` is not
//! ready, and the supervisor logs the reason once when it appears.
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// How long a stage with pending input may go without a beat.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// Whether a stage has work waiting (a stage that beats on a timer always
/// has; a stage that sleeps until input arrives only when its queue is not
/// empty).
pub type Pending = Box<dyn Fn() -> bool + Send + Sync>;

struct Stage {
    name: &'static str,
    last_beat_ms: AtomicU64,
    /// Set when the stage ended; the reason it gave (or a generic one).
    ended: Mutex<Option<String>>,
    pending: Pending,
}

/// The supervised stages of one agent.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    epoch: Instant,
    stall_after: Duration,
    stages: Mutex<Vec<Arc<Stage>>>,
    stopping: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(STALL_AFTER)
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("problems", &self.problems()).finish()
    }
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                stall_after,
                stages: Mutex::default(),
                stopping: AtomicBool::new(false),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// Registers a stage that beats on a timer (always expected to beat).
    pub fn stage(&self, name: &'static str) -> Heartbeat {
        self.stage_with(name, Box::new(|| true))
    }

    /// Registers a stage that is only expected to beat while `pending` says
    /// it has input.
    pub fn stage_with(&self, name: &'static str, pending: Pending) -> Heartbeat {
        let stage = Arc::new(Stage {
            name,
            last_beat_ms: AtomicU64::new(self.now_ms()),
            ended: Mutex::new(None),
            pending,
        });
        if let Ok(mut stages) = self.inner.stages.lock() {
            stages.push(stage.clone());
        }
        Heartbeat {
            stage,
            health: self.clone(),
            finished: false,
        }
    }

    /// The agent is stopping: stages ending now are expected.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// What is wrong now, one line per stage; empty when healthy.
    pub fn problems(&self) -> Vec<String> {
        self.problems_at(self.now_ms())
    }

    fn problems_at(&self, now_ms: u64) -> Vec<String> {
        if self.inner.stopping.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let Ok(stages) = self.inner.stages.lock() else {
            return vec!["health registry poisoned".to_owned()];
        };
        let stall_ms = self.inner.stall_after.as_millis() as u64;
        stages
            .iter()
            .filter_map(|s| {
                if let Some(why) = s.ended.lock().ok().and_then(|e| e.clone()) {
                    return Some(format!("{} stage stopped: {why}", s.name));
                }
                let age = now_ms.saturating_sub(s.last_beat_ms.load(Ordering::Relaxed));
                (age > stall_ms && (s.pending)())
                    .then(|| format!("{} stage stalled: no progress for {:.1} s", s.name, age as f64 / 1000.0))
            })
            .collect()
    }
}

/// A stage's handle: beat it from the loop; say why if the stage gives up.
/// Dropping it without [`Heartbeat::finish`] marks the stage as ended (a
/// panicking or failing stage drops it too).
pub struct Heartbeat {
    stage: Arc<Stage>,
    health: Health,
    finished: bool,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.stage.last_beat_ms.store(self.health.now_ms(), Ordering::Relaxed);
    }

    /// The stage cannot go on; `why` is shown by `/healthz` and logged.
    pub fn fail(mut self, why: impl Into<String>) {
        self.end(why.into());
    }

    /// The stage ended because its input closed (normal shutdown).
    pub fn finish(mut self) {
        self.finished = true;
    }

    fn end(&mut self, why: String) {
        self.finished = true;
        if let Ok(mut ended) = self.stage.ended.lock() {
            ended.get_or_insert(why);
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if !self.finished {
            let why = if std::thread::panicking() {
                "panicked (see the log above)"
            } else {
                "ended unexpectedly (see the log above)"
            };
            self.end(why.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_that_keeps_beating_is_healthy() {
        let h = Health::new(Duration::from_secs(5));
        let hb = h.stage("capture");
        hb.beat();
        assert!(h.problems_at(h.now_ms() + 4_000).is_empty());
    }

    #[test]
    fn a_stage_that_stops_beating_with_input_pending_is_reported_stalled() {
        let h = Health::new(Duration::from_secs(5));
        let _hb = h.stage("correlate");
        let problems = h.problems_at(h.now_ms() + 6_000);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("correlate stage stalled"), "{problems:?}");
    }

    #[test]
    fn an_idle_stage_without_pending_input_is_not_stalled() {
        let h = Health::new(Duration::from_secs(5));
        let pending = Arc::new(AtomicBool::new(false));
        let p = pending.clone();
        let _hb = h.stage_with("export-console", Box::new(move || p.load(Ordering::Relaxed)));
        assert!(h.problems_at(h.now_ms() + 60_000).is_empty());
        pending.store(true, Ordering::Relaxed);
        assert_eq!(h.problems_at(h.now_ms() + 60_000).len(), 1);
    }

    #[test]
    fn a_stage_that_ends_is_reported_with_its_reason() {
        let h = Health::default();
        h.stage("export-otlp").fail("runtime could not start");
        let dropped = h.stage("capture");
        drop(dropped);
        let problems = h.problems();
        assert!(problems.contains(&"export-otlp stage stopped: runtime could not start".to_owned()));
        assert!(problems
            .iter()
            .any(|p| p.starts_with("capture stage stopped: ended unexpectedly")));
    }

    #[test]
    fn a_panicking_stage_is_reported() {
        let h = Health::default();
        let hb = h.stage("correlate");
        let joined = std::thread::spawn(move || {
            let _hb = hb;
            panic!("boom");
        })
        .join();
        assert!(joined.is_err());
        assert!(h.problems()[0].contains("panicked"), "{:?}", h.problems());
    }

    #[test]
    fn stages_finishing_at_shutdown_are_not_problems() {
        let h = Health::default();
        h.stage("capture").finish();
        let hb = h.stage("correlate");
        h.stopping();
        drop(hb);
        assert!(h.problems().is_empty());
    }
}
