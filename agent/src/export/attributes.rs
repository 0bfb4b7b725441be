//! The attributes of a span, named by the OpenTelemetry HTTP semantic
//! conventions; one list shared by every exporter.
use std::borrow::Cow;

use crate::{span::Span, text::Text};

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

/// An attribute value borrowed from the span (what encoders walk).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    /// A one-element string array (semconv header attributes).
    StrArray1(&'a str),
}

impl Attr<'_> {
    fn to_owned(self) -> Value {
        match self {
            Attr::Str(s) => Value::Str(s.to_owned()),
            Attr::Int(i) => Value::Int(i),
            Attr::Bool(b) => Value::Bool(b),
            Attr::StrArray1(s) => Value::StrArray(vec![s.to_owned()]),
        }
    }
}

/// `v` cut to `max` bytes (on a char boundary); `cut` records that it was.
fn capped<'a>(v: &'a str, max: usize, cut: &mut bool) -> Attr<'a> {
    let kept = crate::http::cut(v, max);
    *cut |= kept.len() < v.len();
    Attr::Str(kept)
}

/// The span's attributes, owned (console, UI).
pub fn of(span: &Span, opts: Options) -> Attributes {
    let mut a: Attributes = Vec::with_capacity(20);
    visit(span, opts, |prefix, key, v| {
        let key = match (prefix, key) {
            ("", _) => Cow::Owned(key.to_owned()),
            _ => Cow::Owned(format!("{prefix}{key}")),
        };
        a.push((key, v.to_owned()));
    });
    a
}

/// Calls `put(key_prefix, key, value)` for each of the span's attributes,
/// in order, borrowing what it can from the span (the OTLP encoder writes
/// them straight into its buffer). The prefix is empty except for headers.
pub fn visit(span: &Span, opts: Options, mut emit: impl FnMut(&str, &str, Attr<'_>)) {
    let mut cut = false;
    let mut put = |k: &str, v: Attr<'_>| emit("", k, v);
    put("http.request.method", Attr::Str(span.method_label()));
    if !span.method_is_known() {
        put(
            "http.request.method_original",
            capped(span.method.as_str(), MAX_VALUE, &mut cut),
        );
    }
    let target = crate::span::Target::parse(span.target());
    // Each address is formatted once: the peer is the client or the server.
    let server_ip = span.server.map(|s| Text::ip(s.ip()));
    let client_ip = span.client.map(|c| Text::ip(c.ip()));
    if let Some(path) = target.path {
        put("url.path", capped(path, MAX_URL_PART, &mut cut));
    }
    put("url.scheme", Attr::Str(if span.tls { "https" } else { "http" }));
    if opts.capture_query {
        if let Some(q) = target.query {
            put("url.query", capped(q, MAX_URL_PART, &mut cut));
        }
    }
    if let Some(code) = span.status_code {
        put("http.response.status_code", Attr::Int(i64::from(code)));
    }
    if let (Some(host), port) = (target.host, target.port) {
        // An absolute-form or authority-form target names the server
        // (semconv: the target's host wins over the connection's address).
        put("server.address", capped(host, MAX_VALUE, &mut cut));
        if let Some(port) = port.or(span.server.map(|s| s.port())) {
            put("server.port", Attr::Int(i64::from(port)));
        }
    } else if let (Some(server), Some(server_ip)) = (span.server, &server_ip) {
        // A client span names the service it called when the cluster knows it.
        let fqdn = match span.kind {
            crate::span::SpanKind::Client => span.peer_k8s.as_ref().and_then(|p| p.service_fqdn.as_deref()),
            crate::span::SpanKind::Server => None,
        };
        match fqdn {
            Some(fqdn) => put("server.address", Attr::Str(fqdn)),
            None => put("server.address", Attr::Str(server_ip.as_str())),
        }
        put("server.port", Attr::Int(i64::from(server.port())));
    }
    if let Some(real) = span.resolved_server {
        // No semconv attribute names the NAT target; server.address stays
        // what the client dialled.
        put(
            "meshless.server.resolved.address",
            Attr::Str(Text::ip(real.ip()).as_str()),
        );
        put("meshless.server.resolved.port", Attr::Int(i64::from(real.port())));
    }
    if let (Some(client), Some(client_ip)) = (span.client, &client_ip) {
        put("client.address", Attr::Str(client_ip.as_str()));
        put("client.port", Attr::Int(i64::from(client.port())));
    }
    let peer = match span.kind {
        crate::span::SpanKind::Server => span.client.zip(client_ip.as_ref()),
        crate::span::SpanKind::Client => span.server.zip(server_ip.as_ref()),
    };
    debug_assert_eq!(peer.map(|(p, _)| p), span.peer());
    if let Some((peer, peer_ip)) = peer {
        put("network.peer.address", Attr::Str(peer_ip.as_str()));
        put("network.peer.port", Attr::Int(i64::from(peer.port())));
    }
    // network.transport (tcp) and network.protocol.name (http) are left
    // out: semconv requires them only when they differ from these defaults.
    put("network.protocol.version", Attr::Str(span.protocol_version));
    if span.tls {
        // semconv tls.*: the session is TLS (the library does not tell
        // the agent the version it negotiated).
        put("tls.protocol.name", Attr::Str("tls"));
    }
    if let Some(ua) = span.user_agent() {
        put("user_agent.original", capped(ua, MAX_VALUE, &mut cut));
    }
    if span.is_error() {
        match (span.grpc_status(), span.status_code, span.unanswered) {
            (Some(code), _, _) => put("error.type", Attr::Str(Text::of(code).as_str())),
            (None, Some(code), _) => put("error.type", Attr::Str(Text::of(code).as_str())),
            (None, None, Some(why)) => put("error.type", Attr::Str(why.error_type())),
            (None, None, None) => {}
        }
    }
    if let Some(rpc) = &span.rpc {
        put("rpc.system", Attr::Str("grpc"));
        if !rpc.service.is_empty() {
            put("rpc.service", capped(&rpc.service, MAX_VALUE, &mut cut));
            put("rpc.method", capped(&rpc.method, MAX_VALUE, &mut cut));
        }
        if let Some(code) = rpc.grpc_status {
            put("rpc.grpc.status_code", Attr::Int(i64::from(code)));
        }
    }
    // Per span, not per process: the resource cannot carry the thread.
    put("thread.id", Attr::Int(i64::from(span.process.tid)));
    if !span.process.thread.is_empty() {
        put("thread.name", Attr::Str(&span.process.thread.to_str_lossy()));
    }
    if opts.process {
        put("process.pid", Attr::Int(i64::from(span.process.pid)));
        put("process.executable.name", Attr::Str(&span.process.executable));
    }
    if span.truncated {
        put("meshless.capture.truncated", Attr::Bool(true));
    }
    if cut {
        put(TRUNCATED_ATTRIBUTE, Attr::Bool(true));
    }
    for (prefix, headers) in [
        ("http.request.header.", &span.request_headers),
        ("http.response.header.", &span.response_headers),
    ] {
        for (name, value) in headers.iter() {
            emit(prefix, name, Attr::StrArray1(value));
        }
    }
}
