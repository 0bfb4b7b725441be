//! Recent spans for the trace view: a ring bounded in bytes, searched and
//! grouped by trace on request. Spans here are the exported ones (after
//! sampling) with the exporters' attributes, so redaction applies.
use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::span::SpanKind;

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

/// The ring: rows encoded back to back in one buffer of at most
/// `max_bytes` (allocated once, touched as it fills), the oldest
/// overwritten first. Rows used to be a struct of ~20 small strings each;
/// thousands of long-lived small allocations churning under load
/// fragmented the allocator, and every other allocation of the agent paid
/// for it (the map's agent spent 14 % of its time in `_int_malloc`, +30 %
/// CPU at 5 000 req/s). Encoded rows cost no allocation.
pub struct Recent {
    buf: Vec<u8>,
    /// Where the next row goes.
    write: usize,
    /// Rows oldest first: where each one lies in `buf`.
    rows: VecDeque<Slot>,
    max_bytes: usize,
    /// A row being encoded (reused).
    scratch: Vec<u8>,
    /// Spans pushed out to stay within `max_bytes`.
    pub evicted: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    at: usize,
    len: usize,
}

impl Recent {
    pub fn new(max_bytes: usize) -> Self {
        Recent {
            buf: Vec::new(),
            write: 0,
            rows: VecDeque::new(),
            max_bytes,
            scratch: Vec::new(),
            evicted: 0,
        }
    }

    pub fn push(&mut self, row: &SpanRow) {
        let mut encoded = std::mem::take(&mut self.scratch);
        encoded.clear();
        encode(row, &mut encoded);
        self.place(&encoded);
        self.scratch = encoded;
    }

    fn place(&mut self, encoded: &[u8]) {
        let len = encoded.len();
        if len > self.max_bytes {
            self.evicted += 1;
            return;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.max_bytes);
        }
        if self.write + len > self.max_bytes {
            // Rows never wrap: the end's leftover stays unused this lap,
            // and the last lap's rows still in it (the oldest) go.
            while self.rows.front().is_some_and(|old| old.at >= self.write) {
                self.rows.pop_front();
                self.evicted += 1;
            }
            self.write = 0;
        }
        // Older rows in the way give their place (they lie in write order
        // from `write` on, so the oldest is the next to overlap).
        let end = self.write + len;
        while let Some(old) = self.rows.front() {
            if old.at >= end || old.at + old.len <= self.write {
                break;
            }
            self.rows.pop_front();
            self.evicted += 1;
        }
        if end <= self.buf.len() {
            self.buf[self.write..end].copy_from_slice(encoded);
        } else {
            self.buf.truncate(self.write);
            self.buf.extend_from_slice(encoded);
        }
        self.rows.push_back(Slot { at: self.write, len });
        self.write = end;
    }

    /// Bytes held: the ring as far as it has filled, and its index.
    pub fn bytes(&self) -> usize {
        self.buf.len() + self.rows.capacity() * std::mem::size_of::<Slot>()
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = Stored<'_>> {
        self.rows
            .iter()
            .filter_map(|s| decode(self.buf.get(s.at..s.at + s.len)?))
    }

    /// Traces with a span matching `q`, newest first.
    pub fn search(&self, q: &Query) -> Vec<TraceSummary> {
        let limit = q.limit.unwrap_or(50).min(MAX_LIST);
        let mut order: Vec<&str> = Vec::new();
        let mut by_trace: HashMap<&str, Vec<Stored>> = HashMap::new();
        for s in self.iter().rev() {
            let group = by_trace.entry(s.trace_id).or_default();
            if group.is_empty() {
                order.push(s.trace_id);
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
        let mut spans: Vec<SpanRow> = self
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .map(|s| s.to_row())
            .collect();
        spans.sort_by_key(|s| (s.start_unix_nano, s.kind == "SERVER"));
        spans
    }
}

/// A row as stored: numbers first, then each string as a u32 length and
/// its bytes (trace id, span id, parent id or empty, kind, service, peer,
/// name, route, status), then the attribute count and their key/value pairs.
fn encode(row: &SpanRow, out: &mut Vec<u8>) {
    out.extend_from_slice(&row.start_unix_nano.to_le_bytes());
    out.extend_from_slice(&row.end_unix_nano.to_le_bytes());
    out.push(u8::from(row.error));
    let parent = row.parent_id.as_deref().unwrap_or("");
    let fixed = [
        row.trace_id.as_str(),
        &row.span_id,
        parent,
        row.kind,
        &row.service,
        &row.peer,
        &row.name,
        &row.route,
        &row.status,
    ];
    for s in fixed {
        put(out, s);
    }
    out.extend_from_slice(&(row.attributes.len() as u32).to_le_bytes());
    for (k, v) in &row.attributes {
        put(out, k);
        put(out, v);
    }
}

fn put(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A stored row, borrowed from the ring.
struct Stored<'a> {
    start_unix_nano: u64,
    end_unix_nano: u64,
    error: bool,
    trace_id: &'a str,
    span_id: &'a str,
    parent_id: &'a str,
    kind: &'a str,
    service: &'a str,
    peer: &'a str,
    name: &'a str,
    route: &'a str,
    status: &'a str,
    /// The encoded attributes (count, then pairs).
    attributes: &'a [u8],
}

/// Reads a field off the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, rest) = buf.split_at_checked(n)?;
    *buf = rest;
    Some(head)
}

fn take_u32(buf: &mut &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(take(buf, 4)?.try_into().ok()?) as usize)
}

fn take_str<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let n = take_u32(buf)?;
    std::str::from_utf8(take(buf, n)?).ok()
}

fn decode(mut b: &[u8]) -> Option<Stored<'_>> {
    let buf = &mut b;
    let start_unix_nano = u64::from_le_bytes(take(buf, 8)?.try_into().ok()?);
    let end_unix_nano = u64::from_le_bytes(take(buf, 8)?.try_into().ok()?);
    let error = take(buf, 1)?[0] != 0;
    let mut fixed = [""; 9];
    for f in &mut fixed {
        *f = take_str(buf)?;
    }
    let [trace_id, span_id, parent_id, kind, service, peer, name, route, status] = fixed;
    Some(Stored {
        start_unix_nano,
        end_unix_nano,
        error,
        trace_id,
        span_id,
        parent_id,
        kind,
        service,
        peer,
        name,
        route,
        status,
        attributes: b,
    })
}

impl Stored<'_> {
    fn duration_ms(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e6
    }

    fn to_row(&self) -> SpanRow {
        let mut attrs = self.attributes;
        let n = take_u32(&mut attrs).unwrap_or(0);
        let attributes = (0..n)
            .map_while(|_| Some((take_str(&mut attrs)?.to_owned(), take_str(&mut attrs)?.to_owned())))
            .collect();
        SpanRow {
            trace_id: self.trace_id.to_owned(),
            span_id: self.span_id.to_owned(),
            parent_id: (!self.parent_id.is_empty()).then(|| self.parent_id.to_owned()),
            kind: kind_of(self.kind),
            service: self.service.to_owned(),
            peer: self.peer.to_owned(),
            name: self.name.to_owned(),
            route: self.route.to_owned(),
            start_unix_nano: self.start_unix_nano,
            end_unix_nano: self.end_unix_nano,
            status: self.status.to_owned(),
            error: self.error,
            attributes,
        }
    }
}

/// The row's kind back as the static name it was stored from.
fn kind_of(stored: &str) -> &'static str {
    [SpanKind::Server, SpanKind::Client]
        .into_iter()
        .map(SpanKind::as_str)
        .find(|k| *k == stored)
        .unwrap_or("UNSPECIFIED")
}

fn matches(s: &Stored, q: &Query) -> bool {
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
    (has(&q.service, s.service) || has(&q.service, s.peer) && q.service.is_some())
        && has(&q.route, s.route)
        && status_ok
        && q.min_ms.is_none_or(|m| s.duration_ms() >= m)
}

fn summary(id: &str, spans: &[Stored]) -> TraceSummary {
    let first = spans
        .iter()
        .min_by_key(|s| s.start_unix_nano)
        .expect("a trace has a span");
    let start = first.start_unix_nano;
    let end = spans.iter().map(|s| s.end_unix_nano).max().unwrap_or(start);
    let mut services: Vec<String> = spans.iter().map(|s| s.service.to_owned()).collect();
    services.sort();
    services.dedup();
    TraceSummary {
        trace_id: id.to_owned(),
        root_service: first.service.to_owned(),
        root_name: first.name.to_owned(),
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
        r.push(&row("t1", "a", "web", 1, 5, "200"));
        r.push(&row("t1", "b", "api", 2, 3, "503"));
        r.push(&row("t2", "c", "web", 10, 50, "200"));
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
        let one = {
            let mut b = Vec::new();
            encode(&row("t00", "s", "web", 0, 1, "200"), &mut b);
            b.len()
        };
        let mut r = Recent::new(one * 10);
        for i in 0..100 {
            r.push(&row(&format!("t{i:02}"), "s", "web", i, 1, "200"));
        }
        assert!(
            r.buf.len() <= one * 10 && r.rows.len() == 10,
            "{} B, {} rows",
            r.buf.len(),
            r.rows.len()
        );
        assert_eq!(r.evicted, 90);
        assert_eq!(r.search(&Query::default())[0].trace_id, "t99");
    }

    #[test]
    fn rows_of_every_size_read_back_as_pushed_across_many_laps_of_the_ring() {
        let mut r = Recent::new(4096);
        let mut pushed = Vec::new();
        for i in 0..500u64 {
            let mut x = row(&format!("t{i}"), &format!("s{i}"), "web", i, 1, "200");
            // 0 to ~1.5 KiB of attributes: some rows leave a gap at the end of a lap.
            x.attributes = (0..(i * 7) % 23)
                .map(|j| (format!("k{j}"), "v".repeat((i * j % 97) as usize)))
                .collect();
            x.parent_id = (i % 3 == 0).then(|| format!("p{i}"));
            r.push(&x);
            pushed.push(x);
        }
        let kept: Vec<SpanRow> = r.iter().map(|s| s.to_row()).collect();
        assert!(kept.len() >= 3, "{} rows kept", kept.len());
        assert_eq!(
            kept[..],
            pushed[pushed.len() - kept.len()..],
            "the newest rows, intact, oldest first"
        );
        assert_eq!(r.evicted as usize + kept.len(), pushed.len());
        assert!(r.buf.len() <= 4096);
        let big = row("big", "s", "web", 0, 1, &"x".repeat(5000));
        r.push(&big);
        assert!(
            r.trace("big").is_empty(),
            "a row larger than the ring is counted, not kept"
        );
        assert_eq!(r.trace(&pushed[499].trace_id), [pushed[499].clone()]);
    }
}
