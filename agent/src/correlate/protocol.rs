//! The protocol seam: what a protocol gives the correlator.
//!
//! A protocol brings a detector (does a connection's first payload belong
//! to it?) and, per connection, a [`Protocol`] value that parses both
//! directions and pairs requests with responses its own way (FIFO for
//! HTTP/1, stream id for HTTP/2). The correlator above only sees
//! [`Output`]: requests seen (for same-node linking) and finished
//! [`Exchange`]s (which become spans). docs/adding-a-protocol.md says which
//! files a new protocol touches.
use meshless_common::Direction;
use smallvec::SmallVec;

pub use super::context::SpanContext;
use crate::{
    http::{Head, KeptHeaders},
    span::{Rpc, SpanKind, Unanswered},
    trace_context::{KernelCtx, TraceId},
};

/// One syscall's bytes on a connection.
#[derive(Debug)]
pub struct Segment {
    pub direction: Direction,
    /// The captured prefix of the bytes moved.
    pub payload: bytes::Bytes,
    /// Bytes the syscall moved (at least `payload.len()`).
    pub len: u64,
    /// When the syscall returned.
    pub ktime_ns: u64,
    /// When the bytes were on their way ([`crate::capture::sent_at`]):
    /// what pairing compares across directions.
    pub sent_ns: u64,
    pub thread: Thread,
    /// The context the kernel chose, if these bytes start a request.
    pub ctx: Option<KernelCtx>,
}

/// The thread that made a syscall: its id and its name (comm) then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thread {
    pub tid: u32,
    pub comm: crate::capture::event::Comm,
}

/// A connection's parser and matcher: one value per connection.
///
/// Each call adds what it produced to `out`, which the caller passes in
/// empty and empties again after reading it: an [`Output`] is ~1 KB
/// (its inline exchange), and returning one per event moved it several
/// times (in the replay profile, `memcpy` from every call).
pub trait Protocol: std::fmt::Debug + Send {
    /// Feeds one syscall's bytes.
    fn data(&mut self, segment: Segment, out: &mut Output);
    /// The socket closed (`why` = ConnectionClosed) or was forgotten
    /// (Timeout when idle; None when shed): requests still waiting become
    /// unanswered exchanges (or are dropped when `why` is None).
    fn close(&mut self, why: Option<Unanswered>, at_ktime_ns: u64, out: &mut Output);
    /// Events of this connection were lost: pairing restarts.
    fn events_lost(&mut self, out: &mut Output);
    /// Approximate heap bytes held.
    fn state_bytes(&self) -> usize;
}

/// Recognises a protocol from the first payload of a connection (either
/// direction) and makes its per-connection state (keeping the `kept`
/// header fields of its messages).
pub type Detector = fn(first: &[u8], direction: Direction, kept: &KeptHeaders) -> Option<Box<dyn Protocol>>;

/// Every protocol, most specific first; the last one accepts anything.
const PROTOCOLS: &[Detector] = &[crate::http2::detect, crate::http::detect];

/// The protocol of a connection whose first captured bytes are `first`.
pub fn detect(first: &[u8], direction: Direction, kept: &KeptHeaders) -> Box<dyn Protocol> {
    PROTOCOLS
        .iter()
        .find_map(|detect| detect(first, direction, kept))
        .unwrap_or_else(|| Box::new(crate::http::Http1::keeping(kept.clone())))
}

/// A request waiting for (or receiving) its response.
#[derive(Debug)]
pub struct Request {
    pub head: Head,
    pub kind: SpanKind,
    /// The thread that sent or received the request head.
    pub thread: Thread,
    /// What both sides of the connection call this request: its index
    /// (HTTP/1) or stream id (HTTP/2). Same-node linking keys on it.
    pub seq: u64,
    pub ctx: SpanContext,
    /// `network.protocol.version`: "1.0", "1.1", "2".
    pub version: &'static str,
}

/// What a request got back.
#[derive(Debug)]
pub enum Response {
    /// The response head.
    Seen(Head),
    /// A response was sent but its head fell in bytes that were not
    /// captured: the exchange is real, its status unknown.
    Uncaptured,
    /// No response came.
    Missing(Unanswered),
}

impl Response {
    pub fn head(&self) -> Option<&Head> {
        match self {
            Response::Seen(h) => Some(h),
            Response::Uncaptured | Response::Missing(_) => None,
        }
    }
}

/// A finished exchange, ready to become a span.
#[derive(Debug)]
pub struct Exchange {
    pub request: Request,
    pub response: Response,
    pub end_ktime_ns: u64,
    /// The call was an RPC (gRPC) and what it said about it.
    pub rpc: Option<Box<Rpc>>,
}

/// What a connection produced from one event. An event almost always
/// yields at most one request and one exchange: they are stored inline, so
/// an event costs no allocation here.
#[derive(Debug, Default)]
pub struct Output {
    /// Client requests seen: (seq, context), for linking with server spans.
    pub client_requests: SmallVec<[(u64, SpanContext); 1]>,
    /// Requests this (server) process read.
    pub server_requests: SmallVec<[(u64, SpanContext); 1]>,
    pub exchanges: SmallVec<[Exchange; 1]>,
    pub malformed: u64,
    pub orphans: u64,
    /// Responses paired with a request whose event came after theirs.
    pub early_answers: u64,
    /// Requests given up to keep pairing right (their responses were lost,
    /// or could not be told apart); each is a span not emitted.
    pub resyncs: u64,
    /// Times the pending queue overflowed.
    pub overflows: u64,
    /// Events seen twice (same direction, time and length) and ignored.
    pub duplicates: u64,
    /// Header blocks or fields not kept because of decoding limits
    /// (HPACK bombs, oversized header blocks).
    pub limited: u64,
    /// The connection switched to HTTP/2 (`Upgrade: h2c`): the request
    /// that asked, to be answered on stream 1.
    pub upgrade: Option<Request>,
    /// (kernel trace id, trace id a header names instead), see `SpanContext::alias`.
    pub aliases: Vec<(TraceId, TraceId)>,
}

impl Output {
    /// Empties it for the next event. Every field is named, so a new one
    /// cannot be forgotten; cheaper than a fresh `Output` (whose drop and
    /// write-back cost ~80 instructions per event).
    pub fn clear(&mut self) {
        let Output {
            client_requests,
            server_requests,
            exchanges,
            malformed,
            orphans,
            early_answers,
            resyncs,
            overflows,
            duplicates,
            limited,
            upgrade,
            aliases,
        } = self;
        client_requests.clear();
        server_requests.clear();
        exchanges.clear();
        aliases.clear();
        *upgrade = None;
        for n in [
            malformed,
            orphans,
            early_answers,
            resyncs,
            overflows,
            duplicates,
            limited,
        ] {
            *n = 0;
        }
    }
}
