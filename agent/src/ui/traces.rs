//! Recent spans for the trace view: a ring bounded in bytes, searched and
//! grouped by trace on request. Spans here are the exported ones (after
//! sampling) with the exporters' attributes, so redaction applies.
use std::collections::{HashMap, VecDeque};

use serde::Serialize;

/// One span as the waterfall shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    pub kind: &'static str,
    pub service: String,
    /// The other end, when known (workload or address).
    pub peer: String,
    pub name: String,
    pub route: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status: String,
    pub error: bool,
    pub attributes: Vec<(String, String)>,
}

impl SpanRow {
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.trace_id.len()
            + self.span_id.len()
            + self.parent_id.as_ref().map_or(0, String::len)
            + self.service.len()
            + self.peer.len()
            + self.name.len()
            + self.route.len()
            + self.status.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len() + 48)
                .sum::<usize>()
    }

    fn duration_ms(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e6
    }
}

/// What `/api/traces` filters on (all optional).
#[derive(Debug, Default, serde::Deserialize)]
pub struct Query {
    pub service: Option<String>,
    pub route: Option<String>,
    /// `error`, `ok`, or a status code / prefix (`5` matches 5xx).
    pub status: Option<String>,
    pub min_ms: Option<f64>,
    pub limit: Option<usize>,
}

/// A trace in the list.
#[derive(Debug, Serialize)]
pub struct TraceSummary {
    pub trace_id: String,
    /// The earliest span's service and name.
    pub root_service: String,
    pub root_name: String,
    pub services: Vec<String>,
    pub spans: usize,
    pub start_unix_nano: u64,
    pub duration_ms: f64,
    pub error: bool,
}

/// Most traces `/api/traces` returns.
pub const MAX_LIST: usize = 200;

pub struct Recent {
    spans: VecDeque<SpanRow>,
    bytes: usize,
    max_bytes: usize,
    /// Spans pushed out to stay within `max_bytes`.
    pub evicted: u64,
}

impl Recent {
    pub fn new(max_bytes: usize) -> Self {
        Recent {
            spans: VecDeque::new(),
            bytes: 0,
            max_bytes,
            evicted: 0,
        }
    }

    pub fn push(&mut self, row: SpanRow) {
        let size = row.bytes();
        if size > self.max_bytes {
            self.evicted += 1;
            return;
        }
        while self.bytes + size > self.max_bytes {
            let Some(old) = self.spans.pop_front() else { break };
            self.bytes -= old.bytes();
            self.evicted += 1;
        }
        self.bytes += size;
        self.spans.push_back(row);
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Traces with a span matching `q`, newest first.
    pub fn search(&self, q: &Query) -> Vec<TraceSummary> {
        let limit = q.limit.unwrap_or(50).min(MAX_LIST);
        let mut order: Vec<&str> = Vec::new();
        let mut by_trace: HashMap<&str, Vec<&SpanRow>> = HashMap::new();
        for s in self.spans.iter().rev() {
            let group = by_trace.entry(&s.trace_id).or_default();
            if group.is_empty() {
                order.push(&s.trace_id);
            }
            group.push(s);
        }
        order
            .into_iter()
            .filter_map(|id| {
                let spans = &by_trace[id];
                spans.iter().any(|s| matches(s, q)).then(|| summary(id, spans))
            })
            .take(limit)
            .collect()
    }

    /// Every span kept of one trace, by start time.
    pub fn trace(&self, trace_id: &str) -> Vec<SpanRow> {
        let mut spans: Vec<SpanRow> = self.spans.iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        spans.sort_by_key(|s| (s.start_unix_nano, s.kind == "SERVER"));
        spans
    }
}

fn matches(s: &SpanRow, q: &Query) -> bool {
    let has = |filter: &Option<String>, value: &str| {
        filter
            .as_ref()
            .is_none_or(|f| f.is_empty() || value.contains(f.as_str()))
    };
    let status = q.status.as_deref().unwrap_or("");
    let status_ok = match status {
        "" => true,
        "error" => s.error,
        "ok" => !s.error,
        prefix => s.status.starts_with(prefix),
    };
    (has(&q.service, &s.service) || has(&q.service, &s.peer) && q.service.is_some())
        && has(&q.route, &s.route)
        && status_ok
        && q.min_ms.is_none_or(|m| s.duration_ms() >= m)
}

fn summary(id: &str, spans: &[&SpanRow]) -> TraceSummary {
    let first = spans
        .iter()
        .min_by_key(|s| s.start_unix_nano)
        .expect("a trace has a span");
    let start = first.start_unix_nano;
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(start);
    let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    TraceSummary {
        trace_id: id.to_owned(),
        root_service: first.service.clone(),
        root_name: first.name.clone(),
        services,
        spans: spans.len(),
        start_unix_nano: start,
        duration_ms: end.saturating_sub(start) as f64 / 1e6,
        error: spans.iter().any(|s| s.error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(trace: &str, span: &str, service: &str, start: u64, ms: u64, status: &str) -> SpanRow {
        SpanRow {
            trace_id: trace.into(),
            span_id: span.into(),
            parent_id: None,
            kind: "SERVER",
            service: service.into(),
            peer: "unknown".into(),
            name: "GET /r/*".into(),
            route: "/r/*".into(),
            start_unix_nano: start,
            end_unix_nano: start + ms * 1_000_000,
            status: status.into(),
            error: status.starts_with('5'),
            attributes: vec![("url.path".into(), "/r/1".into())],
        }
    }

    #[test]
    fn search_groups_by_trace_newest_first_and_filters() {
        let mut r = Recent::new(1 << 20);
        r.push(row("t1", "a", "web", 1, 5, "200"));
        r.push(row("t1", "b", "api", 2, 3, "503"));
        r.push(row("t2", "c", "web", 10, 50, "200"));
        let all = r.search(&Query::default());
        assert_eq!(
            all.iter().map(|t| t.trace_id.as_str()).collect::<Vec<_>>(),
            ["t2", "t1"]
        );
        let t1 = &all[1];
        assert_eq!((t1.spans, t1.error, t1.root_service.as_str()), (2, true, "web"));
        assert_eq!(t1.services, ["api", "web"]);
        let errors = r.search(&Query {
            status: Some("error".into()),
            ..Query::default()
        });
        assert_eq!(errors.len(), 1);
        let slow = r.search(&Query {
            min_ms: Some(20.0),
            ..Query::default()
        });
        assert_eq!(slow[0].trace_id, "t2");
        let api = r.search(&Query {
            service: Some("api".into()),
            ..Query::default()
        });
        assert_eq!(api.len(), 1);
        assert_eq!(r.trace("t1").len(), 2);
        assert!(r.trace("nope").is_empty());
    }

    #[test]
    fn the_ring_stays_within_its_bytes() {
        let one = row("t", "s", "web", 0, 1, "200").bytes();
        let mut r = Recent::new(one * 10);
        for i in 0..100 {
            r.push(row(&format!("t{i}"), "s", "web", i, 1, "200"));
        }
        assert!(r.bytes() <= one * 10);
        assert!(r.evicted >= 89);
        assert_eq!(r.search(&Query::default())[0].trace_id, "t99");
    }
}
