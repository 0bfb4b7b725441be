//! The attributes of a span, named by the OpenTelemetry HTTP semantic
//! conventions; one list shared by every exporter.
use std::{borrow::Cow, sync::Arc};

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
/// First those of the request ([`visit_request`]), then those its
/// connection and thread give every request they carry
/// ([`visit_connection`]), then the captured headers.
pub fn visit(span: &Span, opts: Options, mut emit: impl FnMut(&str, &str, Attr<'_>)) {
    let names_server = visit_request(span, opts, &mut emit);
    visit_connection(span, opts, names_server, &mut emit);
    visit_headers(span, emit);
}

/// The attributes that differ between requests on one connection (but
/// the captured headers, [`visit_headers`]); returns
/// whether the request's target named the server (then `server.*` came
/// from it, and [`visit_connection`] leaves them out).
pub fn visit_request(span: &Span, opts: Options, mut emit: impl FnMut(&str, &str, Attr<'_>)) -> bool {
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
    if let Some(path) = target.path {
        put("url.path", capped(path, MAX_URL_PART, &mut cut));
    }
    if opts.capture_query {
        if let Some(q) = target.query {
            put("url.query", capped(q, MAX_URL_PART, &mut cut));
        }
    }
    if let Some(code) = span.status_code {
        put("http.response.status_code", Attr::Int(i64::from(code)));
    }
    let names_server = target.host.is_some();
    if let (Some(host), port) = (target.host, target.port) {
        // An absolute-form or authority-form target names the server
        // (semconv: the target's host wins over the connection's address).
        put("server.address", capped(host, MAX_VALUE, &mut cut));
        if let Some(port) = port.or(span.server.map(|s| s.port())) {
            put("server.port", Attr::Int(i64::from(port)));
        }
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
    if span.truncated {
        put("meshless.capture.truncated", Attr::Bool(true));
    }
    if cut {
        put(TRUNCATED_ATTRIBUTE, Attr::Bool(true));
    }
    names_server
}

/// The captured header fields (`http.{request,response}.header.*`).
pub fn visit_headers(span: &Span, mut emit: impl FnMut(&str, &str, Attr<'_>)) {
    for (prefix, headers) in [
        ("http.request.header.", &span.request_headers),
        ("http.response.header.", &span.response_headers),
    ] {
        for (name, value) in headers.iter() {
            emit(prefix, name, Attr::StrArray1(value));
        }
    }
}

/// The attributes every request on the span's connection, handled by the
/// span's thread, has alike (addresses, protocol, thread): the same for
/// spans alike in [`ConnectionKey`]. `names_server`: the request's target
/// gave `server.*` (see [`visit_request`]). No value here is cut.
pub fn visit_connection(span: &Span, opts: Options, names_server: bool, mut emit: impl FnMut(&str, &str, Attr<'_>)) {
    let mut put = |k: &str, v: Attr<'_>| emit("", k, v);
    put("url.scheme", Attr::Str(if span.tls { "https" } else { "http" }));
    // Each address is formatted once: the peer is the client or the server.
    let server_ip = span.server.map(|s| Text::ip(s.ip()));
    let client_ip = span.client.map(|c| Text::ip(c.ip()));
    if let (false, Some(server), Some(server_ip)) = (names_server, span.server, &server_ip) {
        // A client span names the service it called when the cluster knows it.
        match service_fqdn(span) {
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
    // Per span, not per process: the resource cannot carry the thread.
    put("thread.id", Attr::Int(i64::from(span.process.tid)));
    if !span.process.thread.is_empty() {
        put("thread.name", Attr::Str(&span.process.thread.to_str_lossy()));
    }
    if opts.process {
        put("process.pid", Attr::Int(i64::from(span.process.pid)));
        put("process.executable.name", Attr::Str(&span.process.executable));
    }
}

/// The service a client span called, when the cluster knows it.
fn service_fqdn(span: &Span) -> Option<&Arc<str>> {
    match span.kind {
        crate::span::SpanKind::Client => span.peer_k8s.as_ref().and_then(|p| p.service_fqdn.as_ref()),
        crate::span::SpanKind::Server => None,
    }
}

/// What [`visit_connection`]'s attributes depend on: two spans with equal
/// keys have the same attributes there. Shared strings compare by
/// identity (equal text under another pointer only misses); the key holds
/// them, so while it lives no other string can take their address.
#[derive(Debug, Clone)]
pub struct ConnectionKey {
    plain: PlainKey,
    _fqdn: Option<Arc<str>>,
    _executable: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlainKey {
    kind: crate::span::SpanKind,
    tls: bool,
    names_server: bool,
    protocol_version: &'static str,
    client: Option<std::net::SocketAddr>,
    server: Option<std::net::SocketAddr>,
    resolved_server: Option<std::net::SocketAddr>,
    pid: u32,
    tid: u32,
    thread: crate::capture::event::Comm,
    /// Addresses of the shared strings: the service called, the executable.
    fqdn: usize,
    executable: usize,
}

impl PlainKey {
    fn of(span: &Span, names_server: bool) -> Self {
        Self {
            kind: span.kind,
            tls: span.tls,
            names_server,
            protocol_version: span.protocol_version,
            client: span.client,
            server: span.server,
            resolved_server: span.resolved_server,
            pid: span.process.pid,
            tid: span.process.tid,
            thread: span.process.thread,
            fqdn: service_fqdn(span).map_or(0, |s| Arc::as_ptr(s).cast::<u8>() as usize),
            executable: Arc::as_ptr(&span.process.executable).cast::<u8>() as usize,
        }
    }
}

impl ConnectionKey {
    /// The key of a span whose target did or did not name the server
    /// (what [`visit_request`] returned).
    pub fn of(span: &Span, names_server: bool) -> Self {
        Self {
            plain: PlainKey::of(span, names_server),
            _fqdn: service_fqdn(span).cloned(),
            _executable: span.process.executable.clone(),
        }
    }

    /// Whether `span` has this key (no copies made).
    pub fn is_of(&self, span: &Span, names_server: bool) -> bool {
        self.plain == PlainKey::of(span, names_server)
    }

    /// A hash of the key `span` has, computed without copies.
    pub fn hash_of(span: &Span, names_server: bool, hasher: &impl std::hash::BuildHasher) -> u64 {
        hasher.hash_one(PlainKey::of(span, names_server))
    }
}
