//! The span model shared by the correlator and the exporters.
use std::{net::SocketAddr, sync::Arc};

use smallvec::SmallVec;

use crate::capture::Comm;
pub use crate::http::{Method, Target, KNOWN_METHODS};
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

/// The traced process and the thread that handled the request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    /// The process's name: its main thread's comm, as `ps` shows it (up to
    /// 15 bytes). Names the workload outside Kubernetes.
    pub name: Arc<str>,
    /// Base name of the executable (semconv `process.executable.name`).
    pub executable: Arc<str>,
    /// The handling thread's own name (its comm, inline; runtimes name
    /// threads `event_engine`, `http-nio-8080-exec-1`…): semconv `thread.name`.
    pub thread: Comm,
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
    pub method: Method,
    /// The request target as sent (path and query) and its `user-agent`:
    /// see [`Span::target`], [`Span::user_agent`].
    pub request: RequestText,
    pub status_code: Option<u16>,
    /// "1.0", "1.1" or "2".
    pub protocol_version: &'static str,
    /// The exchange ran over TLS (its plaintext was read at the TLS library).
    pub tls: bool,
    /// RPC facts (gRPC): service, method, status.
    /// Boxed: most spans are not RPCs, and a span is moved a few times.
    pub rpc: Option<Box<Rpc>>,
    pub client: Option<SocketAddr>,
    pub server: Option<SocketAddr>,
    pub process: Process,
    /// Name of the process at the other end ([`Process::name`]), when it
    /// runs on this node and the call was linked.
    pub peer_comm: Option<Arc<str>>,
    /// (pid, cgroup id) of the local client whose ids a server span
    /// adopted: Kubernetes mode drops the parent when that client's spans
    /// are dropped (an opted-out pod, an untraced namespace).
    pub peer_process: Option<(u32, u64)>,
    /// Where a client's call really went when that differs from the address
    /// it dialled (a Service IP DNATed to a server on this node), as the
    /// server's side saw it.
    pub resolved_server: Option<SocketAddr>,
    /// Pod and container of the traced process (Kubernetes only).
    pub k8s: Option<crate::k8s::SpanK8s>,
    /// What the cluster knows about the other end (Kubernetes only),
    /// shared with the metadata index's cache and the other spans to it.
    pub peer_k8s: Option<std::sync::Arc<crate::k8s::PeerK8s>>,
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

/// A request's target and user agent in one buffer, inline up to a
/// typical size: a span costs no allocation for them.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RequestText {
    /// The target, then the user agent; only ever whole `&str`s.
    text: SmallVec<[u8; REQUEST_TEXT_INLINE]>,
    target_end: usize,
    has_user_agent: bool,
}

/// Bytes of target + user agent kept inline (service-to-service targets
/// and agents, `Go-http-client/1.1`, `python-requests/2.32`…, fit).
const REQUEST_TEXT_INLINE: usize = 112;

impl RequestText {
    pub fn new(target: &str, user_agent: Option<&str>) -> Self {
        let mut text = SmallVec::new();
        text.extend_from_slice(target.as_bytes());
        text.extend_from_slice(user_agent.unwrap_or("").as_bytes());
        Self {
            text,
            target_end: target.len(),
            has_user_agent: user_agent.is_some(),
        }
    }

    pub fn target(&self) -> &str {
        self.str(0, self.target_end)
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.has_user_agent.then(|| self.str(self.target_end, self.text.len()))
    }

    /// Heap bytes held (none while inline).
    pub fn heap_bytes(&self) -> usize {
        if self.text.spilled() {
            self.text.capacity()
        } else {
            0
        }
    }

    fn str(&self, from: usize, to: usize) -> &str {
        // SAFETY: `text` is the bytes of two `&str`s back to back and
        // `from..to` is one of them (fields are private, set only in `new`).
        unsafe { std::str::from_utf8_unchecked(&self.text[from..to]) }
    }
}

impl std::fmt::Debug for RequestText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestText")
            .field("target", &self.target())
            .field("user_agent", &self.user_agent())
            .finish()
    }
}

/// What an RPC call (gRPC over HTTP/2) said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rpc {
    /// `package.Service` from the `:path` `/package.Service/Method`.
    pub service: String,
    pub method: String,
    /// `grpc-status` from the trailers (or a trailers-only response).
    pub grpc_status: Option<u32>,
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
    /// The stream was reset (HTTP/2 RST_STREAM) before a response.
    Reset,
    /// The server's GOAWAY said the stream was never processed.
    GoAway,
}

impl Unanswered {
    /// The semconv `error.type` value (low cardinality, snake_case).
    pub fn error_type(self) -> &'static str {
        match self {
            Unanswered::ConnectionClosed => "connection_closed",
            Unanswered::Timeout => "timeout",
            Unanswered::QueueOverflow => "queue_overflow",
            Unanswered::Reset => "stream_reset",
            Unanswered::GoAway => "goaway",
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
            // Envoy: upstream/downstream remote reset.
            (Unanswered::Reset | Unanswered::GoAway, SpanKind::Client) => "UR",
            (Unanswered::Reset | Unanswered::GoAway, SpanKind::Server) => "DR",
        }
    }
}

/// A span's semconv `error.type`: a status code, or why there was no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorType {
    Code(u32),
    Reason(&'static str),
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorType::Code(code) => write!(f, "{code}"),
            ErrorType::Reason(why) => f.write_str(why),
        }
    }
}

/// What semconv calls any other method in names and labels.
pub const OTHER_METHOD: &str = "_OTHER";

impl Span {
    /// `{method} {route}`: low-cardinality, never the raw path or an
    /// unknown method token (a client controls both). An RPC is named
    /// `package.Service/Method` (OTel RPC semconv).
    pub fn name(&self) -> String {
        if let Some(rpc) = self.rpc.as_ref().filter(|r| !r.service.is_empty()) {
            return format!("{}/{}", rpc.service, rpc.method);
        }
        let target = Target::parse(self.target());
        match target.path {
            Some(path) => format!("{} {}", self.method_label(), crate::route::template(path)),
            None => self.method_label().to_owned(),
        }
    }

    /// The method as a bounded label: a known method or `_OTHER`.
    pub fn method_label(&self) -> &str {
        if self.method_is_known() {
            self.method.as_str()
        } else {
            OTHER_METHOD
        }
    }

    /// The method is one of [`KNOWN_METHODS`].
    pub fn method_is_known(&self) -> bool {
        self.method.is_known()
    }

    /// The request target as sent: path and query.
    pub fn target(&self) -> &str {
        self.request.target()
    }

    /// The request's `user-agent`.
    pub fn user_agent(&self) -> Option<&str> {
        self.request.user_agent()
    }

    /// Path part of the request target (no query, no scheme or authority).
    pub fn path(&self) -> &str {
        Target::parse(self.target()).path.unwrap_or("")
    }

    /// Query part of the request target, without `?`.
    pub fn query(&self) -> Option<&str> {
        Target::parse(self.target()).query
    }

    /// The host and port named by an absolute-form or authority-form
    /// target (`GET http://h:8080/p`, `CONNECT h:443`).
    pub fn target_authority(&self) -> Option<(&str, Option<u16>)> {
        let t = Target::parse(self.target());
        t.host.map(|h| (h, t.port))
    }

    /// OTel status: ERROR for 5xx on servers, 4xx/5xx on clients, and
    /// requests that got no response. A response that was sent but whose
    /// head was not captured is not an error.
    pub fn is_error(&self) -> bool {
        if let Some(code) = self.grpc_status() {
            return grpc_is_error(self.kind, code);
        }
        match (self.kind, self.status_code) {
            (_, None) => self.unanswered.is_some(),
            (SpanKind::Server, Some(s)) => s >= 500,
            (SpanKind::Client, Some(s)) => s >= 400,
        }
    }

    /// The semconv `error.type`: the status code of an error response, or
    /// why there was no response.
    pub fn error_type(&self) -> Option<String> {
        self.error_kind().map(|e| e.to_string())
    }

    /// [`Span::error_type`] without building the string.
    pub fn error_kind(&self) -> Option<ErrorType> {
        if !self.is_error() {
            return None;
        }
        if let Some(code) = self.grpc_status() {
            return Some(ErrorType::Code(code));
        }
        match (self.status_code, self.unanswered) {
            (Some(code), _) => Some(ErrorType::Code(u32::from(code))),
            (None, Some(why)) => Some(ErrorType::Reason(why.error_type())),
            (None, None) => None,
        }
    }

    /// The gRPC status, when this was a gRPC call that got one.
    pub fn grpc_status(&self) -> Option<u32> {
        self.rpc.as_ref().and_then(|r| r.grpc_status)
    }

    /// The peer of the traced process.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self.kind {
            SpanKind::Server => self.client,
            SpanKind::Client => self.server,
        }
    }
}

/// OTel RPC semconv: a client span is an error for any status but OK; a
/// server span only for statuses that mean the server failed (UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
pub(crate) fn grpc_is_error(kind: SpanKind, code: u32) -> bool {
    match kind {
        SpanKind::Client => code != 0,
        SpanKind::Server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
    }
}
