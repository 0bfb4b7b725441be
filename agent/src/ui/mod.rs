//! The live service map and trace view the admin server serves (`--ui`):
//! every request feeds the map ([`graph`], before sampling, like the RED
//! metrics), every exported span the trace view ([`traces`], after
//! sampling, with the exporters' attributes and redaction). Both are
//! bounded in bytes, and under load the trace view admits whole traces at
//! a bounded rate ([`admit`]); the page ([`api`]) polls JSON endpoints.
pub mod admit;
pub mod api;
pub mod graph;
pub mod traces;

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    export::attributes::{self, Value},
    metrics::{Peers, UNKNOWN},
    span::{Span, SpanKind},
};

/// Bytes the trace view keeps by default.
pub const DEFAULT_TRACE_BYTES: usize = 8 << 20;

/// The map and recent traces, shared by the router (writer) and the admin
/// server (reader).
#[derive(Clone)]
pub struct Live {
    inner: Arc<Mutex<State>>,
    capture_query: bool,
}

struct State {
    graph: graph::Graph,
    recent: traces::Recent,
    admission: admit::Admission,
    /// The route of the span being counted (reused).
    route: String,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Live {
    pub fn new(trace_bytes: usize, capture_query: bool) -> Self {
        Live {
            inner: Arc::new(Mutex::new(State {
                graph: graph::Graph::default(),
                recent: traces::Recent::new(trace_bytes),
                admission: admit::Admission::new(trace_bytes),
                route: String::new(),
            })),
            capture_query,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent counters behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request on the map and, if `exported` and admitted, keeps
    /// the span for the trace view: one lock, and nothing allocated for a
    /// call on a known edge and route (this runs for every span).
    pub fn record(&self, span: &Span, service: &str, peers: &Peers, exported: bool) {
        let now = now_secs();
        let mut state = self.state();
        let State {
            graph,
            admission,
            route,
            ..
        } = &mut *state;
        // A client span whose server was seen on this node is left to the
        // server's span, so a hop counts once.
        if span.kind == SpanKind::Server || span.peer_comm.is_none() {
            let server_addr;
            let target = match span.kind {
                SpanKind::Client if peers.destination_workload == UNKNOWN => {
                    server_addr = span.server.map_or_else(|| UNKNOWN.to_owned(), |a| a.to_string());
                    server_addr.as_str()
                }
                _ => peers.destination_workload,
            };
            route.clear();
            write_route(span, route);
            let call = graph::Call {
                source: peers.source_workload,
                target,
                route,
                duration_us: span.end_unix_nano.saturating_sub(span.start_unix_nano) / 1000,
                error: map_error(span),
                trace_id: &span.trace_id,
            };
            graph.record(&call, now);
        }
        // Decided before anything is built: most spans under load are not kept.
        if !exported || !admission.admit(&span.trace_id, span.is_error(), now) {
            return;
        }
        drop(state);
        let row = self.row(span, service, peers);
        self.state().recent.push(&row);
    }

    fn row(&self, span: &Span, service: &str, peers: &Peers) -> traces::SpanRow {
        let opts = attributes::Options {
            capture_query: self.capture_query,
            process: true,
        };
        let attributes = attributes::of(span, opts)
            .into_iter()
            .map(|(k, v)| (k.into_owned(), text(v)))
            .collect();
        let peer = match span.kind {
            SpanKind::Server => peers.source_workload,
            SpanKind::Client => peers.destination_workload,
        };
        let peer = if peer == UNKNOWN {
            span.peer().map_or_else(|| UNKNOWN.to_owned(), |a| a.to_string())
        } else {
            peer.to_owned()
        };
        let status = match (span.grpc_status(), span.status_code, span.unanswered) {
            (Some(g), _, _) => format!("grpc {g}"),
            (None, Some(s), _) => s.to_string(),
            (None, None, Some(why)) => why.error_type().to_owned(),
            (None, None, None) => String::new(),
        };
        let mut route = String::new();
        write_route(span, &mut route);
        traces::SpanRow {
            trace_id: span.trace_id.to_string(),
            span_id: span.span_id.to_string(),
            parent_id: span.parent_span_id.map(|p| p.to_string()),
            kind: span.kind.as_str(),
            service: service.to_owned(),
            peer,
            name: span.name(),
            route,
            start_unix_nano: span.start_unix_nano,
            end_unix_nano: span.end_unix_nano,
            status,
            error: span.is_error(),
            attributes,
        }
    }

    /// Bytes held by the map and the trace view.
    pub fn bytes(&self) -> usize {
        let s = self.state();
        s.graph.bytes() + s.recent.bytes()
    }

    pub fn graph(&self, window_secs: u64) -> graph::GraphView {
        self.state().graph.view(now_secs(), window_secs)
    }

    pub fn search(&self, q: &traces::Query) -> Vec<traces::TraceSummary> {
        self.state().recent.search(q)
    }

    pub fn trace(&self, id: &str) -> Vec<traces::SpanRow> {
        self.state().recent.trace(id)
    }
}

/// The route a map shows: `package.Service/Method` for gRPC, else the
/// templated path (ids become `*`).
fn write_route(span: &Span, out: &mut String) {
    use std::fmt::Write;
    let _ = match span.rpc.as_ref().filter(|r| !r.service.is_empty()) {
        Some(rpc) => write!(out, "{}/{}", rpc.service, rpc.method),
        None => crate::route::write_template(span.path(), out),
    };
}

/// A failed call as the map counts it (as Kiali does: server errors, not
/// 4xx): Some(what it answered).
fn map_error(span: &Span) -> Option<String> {
    if let Some(code) = span.grpc_status() {
        // What a server counts as failed, from whichever side it was seen.
        return crate::span::grpc_is_error(SpanKind::Server, code).then(|| format!("grpc {code}"));
    }
    match (span.status_code, span.unanswered) {
        (Some(s), _) if s >= 500 => Some(s.to_string()),
        (None, Some(why)) => Some(why.error_type().to_owned()),
        _ => None,
    }
}

fn text(v: Value) -> String {
    match v {
        Value::Str(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::StrArray(a) => a.join(", "),
    }
}
