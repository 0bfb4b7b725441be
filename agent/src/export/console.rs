//! The console exporter: one line per span, human-readable or JSON.
//!
//! The JSON form is a stable interface (tests and tools parse it): one
//! object per line with `name`, `kind`, `trace_id`, `span_id`,
//! `parent_span_id`, `start_time_unix_nano`, `end_time_unix_nano`,
//! `status` and `attributes` (OTel semantic-convention keys).
use std::io::Write;

use serde_json::{json, Map, Value};

use super::attributes;
use crate::span::Span;

/// How spans are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One aligned, readable line per span.
    Human,
    /// One JSON object per line.
    Json,
}

/// The JSON object for one span.
pub fn to_json(span: &Span, opts: attributes::Options) -> Value {
    let attrs: Map<String, Value> = attributes::of(span, opts)
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                attributes::Value::Str(s) => json!(s),
                attributes::Value::Int(i) => json!(i),
                attributes::Value::Bool(b) => json!(b),
                attributes::Value::StrArray(a) => json!(a),
            };
            (k.into_owned(), v)
        })
        .collect();
    json!({
        "name": span.name(),
        "kind": span.kind.as_str(),
        "trace_id": span.trace_id.to_string(),
        "span_id": span.span_id.to_string(),
        "parent_span_id": span.parent_span_id.map(|p| p.to_string()),
        "trace_state": span.trace_state,
        "start_time_unix_nano": span.start_unix_nano,
        "end_time_unix_nano": span.end_unix_nano,
        "status": { "code": if span.is_error() { "ERROR" } else { "UNSET" } },
        "attributes": attrs,
    })
}

/// One readable line, e.g.
/// `13:45:01.123456 SERVER GET /x -> 200 1.234ms python3[812] 10.0.0.1:4242 -> 10.0.0.2:80 trace=4bf9…`
pub fn to_human(span: &Span) -> String {
    let secs = span.start_unix_nano / 1_000_000_000;
    let micros = (span.start_unix_nano % 1_000_000_000) / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let dur_ms = span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e6;
    let status = span.status_code.map_or_else(|| "---".to_owned(), |c| c.to_string());
    let addr = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "?".to_owned(), |a| a.to_string());
    let trunc = if span.truncated { " [truncated]" } else { "" };
    format!(
        "{h:02}:{m:02}:{s:02}.{micros:06} {kind:<6} {method} {target} -> {status} {dur_ms:.3}ms {comm}[{pid}] {client} -> {server} trace={trace}{trunc}",
        kind = span.kind.as_str(),
        method = crate::http::cut(span.method.as_str(), 64),
        target = crate::http::cut(span.path(), 1024),
        comm = span.process.name,
        pid = span.process.pid,
        client = addr(span.client),
        server = addr(span.server),
        trace = span.trace_id,
    )
}

/// Writes spans to `out`, one line each.
pub struct Console<W: Write> {
    format: Format,
    opts: attributes::Options,
    out: W,
}

impl<W: Write> Console<W> {
    pub fn new(format: Format, capture_query: bool, out: W) -> Self {
        Self {
            format,
            opts: attributes::Options {
                capture_query,
                process: true,
            },
            out,
        }
    }

    pub fn write(&mut self, spans: &[Span]) -> std::io::Result<()> {
        for span in spans {
            match self.format {
                Format::Human => writeln!(self.out, "{}", to_human(span))?,
                Format::Json => writeln!(self.out, "{}", to_json(span, self.opts))?,
            }
        }
        self.out.flush()
    }
}
