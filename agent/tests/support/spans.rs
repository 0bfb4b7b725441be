//! One view of a span whether it came from the console JSON or from the
//! OTLP receiver, and the checks every connected-trace test shares: span
//! ids unique, and a readable dump of a trace for failure messages.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{otlp::Received, Agent};

/// The fields a trace-shape test needs from an exported span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanView {
    /// `SERVER` or `CLIENT`.
    pub kind: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    pub attrs: BTreeMap<String, String>,
}

impl SpanView {
    pub fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map_or("", String::as_str)
    }

    /// `server.address:server.port` as the span records it.
    pub fn server(&self) -> String {
        format!("{}:{}", self.attr("server.address"), self.attr("server.port"))
    }

    pub fn path(&self) -> &str {
        self.attr("url.path")
    }

    pub fn is_server(&self) -> bool {
        self.kind == "SERVER"
    }

    pub fn is_client(&self) -> bool {
        self.kind == "CLIENT"
    }

    /// Whether this span's parent is `other` in the same trace.
    pub fn is_child_of(&self, other: &SpanView) -> bool {
        self.trace_id == other.trace_id && self.parent.as_deref() == Some(other.span_id.as_str())
    }
}

impl fmt::Display for SpanView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<6} {} {} -> {} status={} comm={} client={}:{} trace={} span={} parent={}",
            self.kind,
            self.attr("http.request.method"),
            self.path(),
            self.server(),
            self.attr("http.response.status_code"),
            self.attr("process.executable.name"),
            self.attr("client.address"),
            self.attr("client.port"),
            self.trace_id,
            self.span_id,
            self.parent.as_deref().unwrap_or("-"),
        )
    }
}

impl From<&Value> for SpanView {
    fn from(v: &Value) -> SpanView {
        let attrs = v["attributes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let s = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (k.clone(), s)
                    })
                    .collect()
            })
            .unwrap_or_default();
        SpanView {
            kind: v["kind"].as_str().unwrap_or("").to_owned(),
            trace_id: v["trace_id"].as_str().unwrap_or("").to_owned(),
            span_id: v["span_id"].as_str().unwrap_or("").to_owned(),
            parent: v["parent_span_id"].as_str().map(str::to_owned),
            attrs,
        }
    }
}

impl From<&Received> for SpanView {
    fn from(r: &Received) -> SpanView {
        let kind = match r.span.kind {
            2 => "SERVER",
            3 => "CLIENT",
            _ => "OTHER",
        };
        let parent = r.parent_span_id();
        SpanView {
            kind: kind.to_owned(),
            trace_id: r.trace_id(),
            span_id: r.span_id(),
            parent: (!parent.is_empty()).then_some(parent),
            attrs: super::otlp::attrs(&r.span.attributes).into_iter().collect(),
        }
    }
}

/// Where a test reads spans from: one console agent, several, or a receiver.
pub trait SpanSource {
    fn views(&self) -> Vec<SpanView>;
}

impl SpanSource for Agent {
    fn views(&self) -> Vec<SpanView> {
        self.settle(|_| true, Duration::ZERO)
            .iter()
            .map(SpanView::from)
            .collect()
    }
}

impl SpanSource for super::otlp::Receiver {
    fn views(&self) -> Vec<SpanView> {
        self.spans().iter().map(SpanView::from).collect()
    }
}

/// Waits until at least `n` spans match `filter` (or `timeout`), then
/// 700 ms more so that extra, unexpected spans show up too.
pub fn gather(
    source: &dyn SpanSource,
    filter: impl Fn(&SpanView) -> bool,
    n: usize,
    timeout: Duration,
) -> Vec<SpanView> {
    let deadline = Instant::now() + timeout;
    let pick = || -> Vec<SpanView> { source.views().into_iter().filter(|s| filter(s)).collect() };
    loop {
        let got = pick();
        if got.len() >= n {
            std::thread::sleep(Duration::from_millis(700));
            return pick();
        }
        if Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// All spans, one per line, grouped by trace (for failure messages).
pub fn dump(spans: &[SpanView]) -> String {
    let mut by_trace: BTreeMap<&str, Vec<&SpanView>> = BTreeMap::new();
    for s in spans {
        by_trace.entry(&s.trace_id).or_default().push(s);
    }
    let mut out = format!("{} spans in {} traces:\n", spans.len(), by_trace.len());
    for (trace, spans) in by_trace {
        out.push_str(&format!("trace {trace}\n"));
        for s in spans {
            out.push_str(&format!("  {s}\n"));
        }
    }
    out
}

/// No two exported spans may share a span id (issue 9, point 4).
pub fn assert_unique_span_ids(spans: &[SpanView]) {
    let mut seen: HashMap<&str, Vec<&SpanView>> = HashMap::new();
    for s in spans {
        seen.entry(&s.span_id).or_default().push(s);
    }
    let dups: Vec<String> = seen
        .iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(id, v)| {
            let lines: Vec<String> = v.iter().map(|s| format!("    {s}")).collect();
            format!("  span id {id} used {} times:\n{}", v.len(), lines.join("\n"))
        })
        .collect();
    assert!(
        dups.is_empty(),
        "exported spans share span ids:\n{}\n\n{}",
        dups.join("\n"),
        dump(spans)
    );
}

/// How a span's parent relates to the span it should be the child of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parentage {
    /// Child of the expected span, in its trace.
    Linked,
    /// No parent at all (not linked: allowed where linking is ambiguous).
    Root,
    /// The expected span's id as parent, but another trace id.
    OtherTrace,
    /// Another exported span as parent.
    WrongSpan,
    /// A parent id that no exported span has.
    Dangling,
}

impl Parentage {
    /// Of `s`, which should be the child of `expected` (`None`: should be a root).
    pub fn of(s: &SpanView, expected: Option<&SpanView>, all: &[SpanView]) -> Parentage {
        let Some(parent) = s.parent.as_deref() else {
            return Parentage::Root;
        };
        match expected {
            Some(e) if s.is_child_of(e) => Parentage::Linked,
            Some(e) if e.span_id == parent => Parentage::OtherTrace,
            _ if all.iter().any(|o| o.span_id == parent) => Parentage::WrongSpan,
            _ => Parentage::Dangling,
        }
    }

    /// Linked to something other than what it should be.
    pub fn is_wrong(self) -> bool {
        matches!(self, Parentage::OtherTrace | Parentage::WrongSpan | Parentage::Dangling)
    }
}
