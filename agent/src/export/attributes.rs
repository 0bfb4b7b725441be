//! The attributes of a span, named by the OpenTelemetry HTTP semantic
//! conventions; one list shared by every exporter.
use std::borrow::Cow;

use crate::span::Span;

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    StrArray(Vec<String>),
}

/// What the exporter may include beyond the always-safe attributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    pub capture_query: bool,
    /// Add `process.*` attributes (console; OTLP carries them in the
    /// resource). `thread.*` are always added: they differ per span.
    pub process: bool,
}

pub type Attributes = Vec<(Cow<'static, str>, Value)>;

/// Longest `url.path` / `url.query` exported; a client controls both.
pub const MAX_URL_PART: usize = 1024;
/// Longest other free-text attribute value exported.
pub const MAX_VALUE: usize = 1024;
/// Set when some attribute value above was cut to its limit.
pub const TRUNCATED_ATTRIBUTE: &str = "meshless.attributes.truncated";

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

/// `v` cut to `max` bytes (on a char boundary); `cut` records that it was.
fn capped(v: &str, max: usize, cut: &mut bool) -> Value {
    let kept = crate::http::cut(v, max);
    *cut |= kept.len() < v.len();
    s(kept)
}

/// The span's attributes.
pub fn of(span: &Span, opts: Options) -> Attributes {
    let mut a: Attributes = Vec::with_capacity(20);
    let mut cut = false;
    let mut put = |k: &'static str, v: Value| a.push((Cow::Borrowed(k), v));
    put("http.request.method", s(span.method_label()));
    if !span.method_is_known() {
        put(
            "http.request.method_original",
            capped(&span.method, MAX_VALUE, &mut cut),
        );
    }
    let target = crate::span::Target::parse(&span.target);
    if let Some(path) = target.path {
        put("url.path", capped(path, MAX_URL_PART, &mut cut));
    }
    put("url.scheme", s(if span.tls { "https" } else { "http" }));
    if opts.capture_query {
        if let Some(q) = target.query {
            put("url.query", capped(q, MAX_URL_PART, &mut cut));
        }
    }
    if let Some(code) = span.status_code {
        put("http.response.status_code", Value::Int(i64::from(code)));
    }
    if let (Some(host), port) = (target.host, target.port) {
        // An absolute-form or authority-form target names the server
        // (semconv: the target's host wins over the connection's address).
        put("server.address", capped(host, MAX_VALUE, &mut cut));
        if let Some(port) = port.or(span.server.map(|s| s.port())) {
            put("server.port", Value::Int(i64::from(port)));
        }
    } else if let Some(server) = span.server {
        // A client span names the service it called when the cluster knows it.
        let name = match (span.kind, span.peer_k8s.as_ref().and_then(|p| p.service_fqdn.clone())) {
            (crate::span::SpanKind::Client, Some(fqdn)) => fqdn,
            _ => server.ip().to_string(),
        };
        put("server.address", s(name));
        put("server.port", Value::Int(i64::from(server.port())));
    }
    if let Some(real) = span.resolved_server {
        // No semconv attribute names the NAT target; server.address stays
        // what the client dialled.
        put("meshless.server.resolved.address", s(real.ip().to_string()));
        put("meshless.server.resolved.port", Value::Int(i64::from(real.port())));
    }
    if let Some(client) = span.client {
        put("client.address", s(client.ip().to_string()));
        put("client.port", Value::Int(i64::from(client.port())));
    }
    if let Some(peer) = span.peer() {
        put("network.peer.address", s(peer.ip().to_string()));
        put("network.peer.port", Value::Int(i64::from(peer.port())));
    }
    // network.transport (tcp) and network.protocol.name (http) are left
    // out: semconv requires them only when they differ from these defaults.
    put("network.protocol.version", s(span.protocol_version));
    if span.tls {
        // semconv tls.*: the session is TLS (the library does not tell
        // the agent the version it negotiated).
        put("tls.protocol.name", s("tls"));
    }
    if let Some(ua) = &span.user_agent {
        put("user_agent.original", capped(ua, MAX_VALUE, &mut cut));
    }
    if let Some(error_type) = span.error_type() {
        put("error.type", s(error_type));
    }
    if let Some(rpc) = &span.rpc {
        put("rpc.system", s("grpc"));
        if !rpc.service.is_empty() {
            put("rpc.service", capped(&rpc.service, MAX_VALUE, &mut cut));
            put("rpc.method", capped(&rpc.method, MAX_VALUE, &mut cut));
        }
        if let Some(code) = rpc.grpc_status {
            put("rpc.grpc.status_code", Value::Int(i64::from(code)));
        }
    }
    // Per span, not per process: the resource cannot carry the thread.
    put("thread.id", Value::Int(i64::from(span.process.tid)));
    if !span.process.thread.is_empty() {
        put("thread.name", s(span.process.thread.clone()));
    }
    if opts.process {
        put("process.pid", Value::Int(i64::from(span.process.pid)));
        put("process.executable.name", s(&*span.process.executable));
    }
    if span.truncated {
        put("meshless.capture.truncated", Value::Bool(true));
    }
    if cut {
        put(TRUNCATED_ATTRIBUTE, Value::Bool(true));
    }
    for (prefix, headers) in [
        ("http.request.header.", &span.request_headers),
        ("http.response.header.", &span.response_headers),
    ] {
        for (name, value) in headers.iter() {
            a.push((
                Cow::Owned(format!("{prefix}{name}")),
                Value::StrArray(vec![value.clone()]),
            ));
        }
    }
    a
}
