//! The run's summary as JSON in the shape oha writes (`summary`,
//! `latencyPercentiles` in seconds, `statusCodeDistribution`,
//! `errorDistribution`), so the bench reads both with the same code. Status
//! codes here are gRPC codes (`"0"` = OK).
use std::{collections::BTreeMap, time::Duration};

use serde_json::{json, Value};

/// Percentiles reported, as (key, quantile).
const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p100", 1.0),
];

/// Summary of one load run.
#[derive(Debug)]
pub struct Report {
    sent: u64,
    elapsed: Duration,
    /// Sorted ascending.
    latencies: Vec<Duration>,
    codes: BTreeMap<i32, u64>,
    errors: BTreeMap<String, u64>,
}

impl Report {
    pub fn new(
        sent: u64,
        elapsed: Duration,
        mut latencies: Vec<Duration>,
        codes: BTreeMap<i32, u64>,
        errors: BTreeMap<String, u64>,
    ) -> Report {
        latencies.sort_unstable();
        Report {
            sent,
            elapsed,
            latencies,
            codes,
            errors,
        }
    }

    /// Nearest-rank percentile of the answered calls' latencies.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        let n = self.latencies.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1])
    }

    pub fn to_json(&self) -> Value {
        let answered = self.latencies.len() as u64;
        let ok = self.codes.get(&0).copied().unwrap_or(0);
        let secs = self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let percentiles: serde_json::Map<String, Value> = PERCENTILES
            .iter()
            .map(|(k, q)| (k.to_string(), json!(self.percentile(*q).map(|d| d.as_secs_f64()))))
            .collect();
        let codes: serde_json::Map<String, Value> = self.codes.iter().map(|(c, n)| (c.to_string(), json!(n))).collect();
        json!({
            "summary": {
                "successRate": if self.sent == 0 { 0.0 } else { ok as f64 / self.sent as f64 },
                "total": secs,
                "requestsPerSec": answered as f64 / secs,
                "sent": self.sent,
            },
            "latencyPercentiles": percentiles,
            "statusCodeDistribution": codes,
            "errorDistribution": self.errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(latencies_us: &[u64], failed: u64) -> Report {
        let mut errors = BTreeMap::new();
        if failed > 0 {
            errors.insert("client timeout".to_owned(), failed);
        }
        let answered = latencies_us.len() as u64;
        Report::new(
            answered + failed,
            Duration::from_secs(2),
            latencies_us.iter().map(|&u| Duration::from_micros(u)).collect(),
            BTreeMap::from([(0, answered)]),
            errors,
        )
    }

    #[test]
    fn percentiles_use_nearest_rank_over_answered_calls() {
        let r = report(&(1..=1000).rev().collect::<Vec<_>>(), 0);
        assert_eq!(r.percentile(0.5), Some(Duration::from_micros(500)));
        assert_eq!(r.percentile(0.99), Some(Duration::from_micros(990)));
        assert_eq!(r.percentile(0.999), Some(Duration::from_micros(999)));
        assert_eq!(r.percentile(1.0), Some(Duration::from_micros(1000)));
    }

    #[test]
    fn json_has_the_fields_the_bench_reads_from_oha() {
        let v = report(&[100, 200, 300, 400], 1).to_json();
        assert_eq!(v["statusCodeDistribution"]["0"], 4);
        assert_eq!(v["errorDistribution"]["client timeout"], 1);
        assert_eq!(v["summary"]["requestsPerSec"], 2.0);
        assert_eq!(v["summary"]["successRate"], 0.8);
        assert_eq!(v["latencyPercentiles"]["p50"], 0.0002);
    }

    #[test]
    fn a_run_without_answers_reports_no_percentiles() {
        let v = report(&[], 3).to_json();
        assert!(v["latencyPercentiles"]["p99"].is_null());
        assert_eq!(v["summary"]["successRate"], 0.0);
    }
}
