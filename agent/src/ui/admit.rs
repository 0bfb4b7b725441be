//! Which exported spans the trace view keeps. Under load the ring would
//! hold only the last fraction of a second (a row is ~1 KiB; 5 000 req/s
//! are 10 000 spans/s), and building rows that are pushed out at once is
//! most of the view's cost. So it admits about a thirtieth of its capacity
//! per second, chosen by trace id so that every span of a trace (both
//! sides of each hop, all hops) is chosen together, plus failed spans
//! (what the map's recent errors link to), within a hard cap per second.
use crate::trace_context::TraceId;

/// Seconds of history the ring is sized to hold under load.
const HISTORY_SECS: usize = 30;
/// Bytes assumed per row when sizing the rate (rows are ~0.6–1.5 KiB).
const ROW_BYTES: usize = 1024;
/// Admissions per second past the budget (a burst's first second, errors).
const BURST: u32 = 4;
/// Trace-id hash values: a span is chosen when its hash is below the threshold.
const SCALE: u32 = 1 << 16;

pub struct Admission {
    /// Spans admitted per second at steady state.
    budget: u32,
    /// The second being counted, and its counts.
    second: u64,
    seen: u32,
    admitted: u32,
    /// Of `SCALE`: this second's share, from the last second's rate.
    threshold: u32,
}

impl Admission {
    pub fn new(ring_bytes: usize) -> Self {
        let budget = (ring_bytes / ROW_BYTES / HISTORY_SECS).clamp(1, u32::MAX as usize) as u32;
        Admission {
            budget,
            second: 0,
            seen: 0,
            admitted: 0,
            threshold: SCALE,
        }
    }

    /// Whether to keep a span of `trace` (failed or not) seen at `now_secs`.
    pub fn admit(&mut self, trace: &TraceId, error: bool, now_secs: u64) -> bool {
        if now_secs != self.second {
            // A gap of seconds means no load: everything is chosen again.
            let last = if now_secs == self.second + 1 { self.seen } else { 0 };
            self.threshold = if last <= self.budget {
                SCALE
            } else {
                (u64::from(SCALE) * u64::from(self.budget) / u64::from(last)) as u32
            };
            (self.second, self.seen, self.admitted) = (now_secs, 0, 0);
        }
        self.seen = self.seen.saturating_add(1);
        let hash = u32::from(u16::from_le_bytes([trace.0[14], trace.0[15]]));
        let chosen = error || hash < self.threshold;
        if !chosen || self.admitted >= self.budget.saturating_mul(BURST) {
            return false;
        }
        self.admitted += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(i: u32) -> TraceId {
        // Spread over the hash the way random ids are.
        let mut id = [0; 16];
        id[14..].copy_from_slice(&((i.wrapping_mul(40_503)) as u16).to_le_bytes());
        id[..4].copy_from_slice(&i.to_le_bytes());
        TraceId(id)
    }

    #[test]
    fn at_a_low_rate_every_span_is_kept() {
        let mut a = Admission::new(4 << 20);
        assert!((0..100).all(|i| a.admit(&trace(i), false, 1_000 + u64::from(i) / 50)));
    }

    #[test]
    fn under_load_whole_traces_are_kept_near_the_budget_and_every_error_within_the_cap() {
        let mut a = Admission::new(4 << 20);
        let budget = a.budget;
        let per_sec = 10_000;
        let mut kept_last = 0;
        for sec in 0..5u64 {
            kept_last = 0;
            for i in 0..per_sec {
                // Two spans per trace (client and server), one after the other.
                let t = trace((sec as u32) * per_sec + i / 2);
                let first = a.admit(&t, false, 2_000 + sec);
                let second = a.admit(&t, false, 2_000 + sec);
                // (In the first second everything is chosen until the cap.)
                assert!(sec == 0 || first == second, "both spans of a trace, or neither");
                kept_last += u32::from(first) * 2;
            }
        }
        assert!(
            kept_last <= 3 * budget && kept_last >= budget / 3,
            "kept {kept_last}/s for a budget of {budget}"
        );
        assert!(a.admit(&trace(7), true, 2_004), "an error is kept past the hash");
    }
}
