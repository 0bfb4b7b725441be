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
    /// Add `process.*` attributes (console; OTLP carries them in the resource).
    pub process: bool,
}

pub type Attributes = Vec<(Cow<'static, str>, Value)>;

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

/// The span's attributes.
pub fn of(span: &Span, opts: Options) -> Attributes {
    let mut a: Attributes = Vec::with_capacity(20);
    let mut put = |k: &'static str, v: Value| a.push((Cow::Borrowed(k), v));
    put("http.request.method", s(span.method.clone()));
    put("url.path", s(span.path()));
    put("url.scheme", s("http"));
    if opts.capture_query {
        if let Some(q) = span.query() {
            put("url.query", s(q));
        }
    }
    if let Some(code) = span.status_code {
        put("http.response.status_code", Value::Int(i64::from(code)));
    }
    if let Some(server) = span.server {
        // A client span names the service it called when the cluster knows it.
        let name = match (span.kind, span.peer_k8s.as_ref().and_then(|p| p.service_fqdn.clone())) {
            (crate::span::SpanKind::Client, Some(fqdn)) => fqdn,
            _ => server.ip().to_string(),
        };
        put("server.address", s(name));
        put("server.port", Value::Int(i64::from(server.port())));
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
    if let Some(ua) = &span.user_agent {
        put("user_agent.original", s(ua.clone()));
    }
    if span.is_error() {
        put(
            "error.type",
            s(span
                .status_code
                .map_or_else(|| "no_response".to_owned(), |c| c.to_string())),
        );
    }
    if opts.process {
        put("thread.id", Value::Int(i64::from(span.process.tid)));
        put("process.pid", Value::Int(i64::from(span.process.pid)));
        put("process.executable.name", s(span.process.comm.clone()));
    }
    if span.truncated {
        put("meshless.capture.truncated", Value::Bool(true));
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
