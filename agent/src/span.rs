//! The span model shared by the correlator and the exporters.
use std::net::SocketAddr;

pub use crate::http::Target;
use crate::trace_context::{SpanId, TraceId};

/// Which side of a request the traced process was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    /// The process received the request.
    Server,
    /// The process sent the request.
    Client,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        }
    }
}

/// The traced process, as the kernel saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    /// The thread's comm (executable name, up to 15 bytes).
    pub comm: String,
    pub cgroup_id: u64,
}

/// One HTTP request/response exchange seen from one side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
    /// The parent came from an incoming `traceparent` (not from this node).
    pub parent_is_remote: bool,
    pub trace_state: Option<String>,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub method: String,
    /// Request target as sent: path and query.
    pub target: String,
    pub status_code: Option<u16>,
    /// "1.0" or "1.1".
    pub protocol_version: &'static str,
    pub client: Option<SocketAddr>,
    pub server: Option<SocketAddr>,
    pub process: Process,
    /// Executable name of the process at the other end, when it runs on
    /// this node and the call was linked.
    pub peer_comm: Option<String>,
    /// Where a client's call really went when that differs from the address
    /// it dialled (a Service IP DNATed to a server on this node), as the
    /// server's side saw it.
    pub resolved_server: Option<SocketAddr>,
    /// Pod and container of the traced process (Kubernetes only).
    pub k8s: Option<crate::k8s::SpanK8s>,
    /// What the cluster knows about the other end (Kubernetes only).
    pub peer_k8s: Option<crate::k8s::PeerK8s>,
    pub user_agent: Option<String>,
    /// Allow-listed request headers, credentials already redacted.
    pub request_headers: Vec<(String, String)>,
    /// Allow-listed response headers, credentials already redacted.
    pub response_headers: Vec<(String, String)>,
    /// Some header block was not captured to its end.
    pub truncated: bool,
    /// Why the request got no response (None when it got one, or when its
    /// response was sent but not captured).
    pub unanswered: Option<Unanswered>,
}

/// Why a request ended without a response, as a sidecar would record it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unanswered {
    /// The connection closed before a response was seen.
    ConnectionClosed,
    /// The connection stayed silent past the idle timeout.
    Timeout,
    /// Too many requests were pending on the connection to keep pairing them.
    QueueOverflow,
}

impl Unanswered {
    /// The semconv `error.type` value (low cardinality, snake_case).
    pub fn error_type(self) -> &'static str {
        match self {
            Unanswered::ConnectionClosed => "connection_closed",
            Unanswered::Timeout => "timeout",
            Unanswered::QueueOverflow => "queue_overflow",
        }
    }

    /// Envoy's response flag for the same situation (Istio's
    /// `response_flags` label): a client that closed is the downstream
    /// going away (DC); a server that closed without answering is the
    /// upstream going away (UC); UT is an upstream timeout, UO an overflow.
    pub fn response_flags(self, kind: SpanKind) -> &'static str {
        match (self, kind) {
            (Unanswered::ConnectionClosed, SpanKind::Client) => "DC",
            (Unanswered::ConnectionClosed, SpanKind::Server) => "UC",
            (Unanswered::Timeout, _) => "UT",
            (Unanswered::QueueOverflow, _) => "UO",
        }
    }
}

/// The methods of RFC 9110 and RFC 5789 (PATCH) plus QUERY: the only ones
/// used as-is in span names and metric labels (OTel HTTP semconv).
pub const KNOWN_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
];

/// What semconv calls any other method in names and labels.
pub const OTHER_METHOD: &str = "_OTHER";

impl Span {
    /// `{method} {route}`: low-cardinality, never the raw path or an
    /// unknown method token (a client controls both).
    pub fn name(&self) -> String {
        let target = Target::parse(&self.target);
        match target.path {
            Some(path) => format!("{} {}", self.method_label(), crate::route::template(path)),
            None => self.method_label().to_owned(),
        }
    }

    /// The method as a bounded label: a known method or `_OTHER`.
    pub fn method_label(&self) -> &str {
        if self.method_is_known() {
            &self.method
        } else {
            OTHER_METHOD
        }
    }

    /// The method is one of [`KNOWN_METHODS`].
    pub fn method_is_known(&self) -> bool {
        KNOWN_METHODS.contains(&self.method.as_str())
    }

    /// Path part of the request target (no query, no scheme or authority).
    pub fn path(&self) -> &str {
        Target::parse(&self.target).path.unwrap_or("")
    }

    /// Query part of the request target, without `?`.
    pub fn query(&self) -> Option<&str> {
        Target::parse(&self.target).query
    }

    /// The host and port named by an absolute-form or authority-form
    /// target (`GET http://h:8080/p`, `CONNECT h:443`).
    pub fn target_authority(&self) -> Option<(&str, Option<u16>)> {
        let t = Target::parse(&self.target);
        t.host.map(|h| (h, t.port))
    }

    /// OTel status: ERROR for 5xx on servers, 4xx/5xx on clients, and
    /// requests that got no response. A response that was sent but whose
    /// head was not captured is not an error.
    pub fn is_error(&self) -> bool {
        match (self.kind, self.status_code) {
            (_, None) => self.unanswered.is_some(),
            (SpanKind::Server, Some(s)) => s >= 500,
            (SpanKind::Client, Some(s)) => s >= 400,
        }
    }

    /// The semconv `error.type`: the status code of an error response, or
    /// why there was no response.
    pub fn error_type(&self) -> Option<String> {
        if !self.is_error() {
            return None;
        }
        match (self.status_code, self.unanswered) {
            (Some(code), _) => Some(code.to_string()),
            (None, Some(why)) => Some(why.error_type().to_owned()),
            (None, None) => None,
        }
    }

    /// The peer of the traced process.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self.kind {
            SpanKind::Server => self.client,
            SpanKind::Client => self.server,
        }
    }
}
