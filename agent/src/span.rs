//! The span model shared by the correlator and the exporters.
use std::net::SocketAddr;

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
}

impl Span {
    /// `{method} {route}`: low-cardinality, never the raw path.
    pub fn name(&self) -> String {
        format!("{} {}", self.method, crate::route::template(self.path()))
    }

    /// Path part of the request target (no query).
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// Query part of the request target, without `?`.
    pub fn query(&self) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        Some(q.split('#').next().unwrap_or(""))
    }

    /// OTel status: ERROR for 5xx on servers and 4xx/5xx on clients.
    pub fn is_error(&self) -> bool {
        match (self.kind, self.status_code) {
            (_, None) => true,
            (SpanKind::Server, Some(s)) => s >= 500,
            (SpanKind::Client, Some(s)) => s >= 400,
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
