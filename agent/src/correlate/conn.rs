//! One tracked connection: both HTTP streams and the requests in flight.
use std::{collections::VecDeque, net::SocketAddr};

use meshless_common::Direction;

use crate::{
    http::{Flow, Head, HttpStream, Item},
    span::{Process, SpanKind},
    trace_context::{SpanId, TraceId, TraceParent},
};

/// A request waiting for (or receiving) its response.
#[derive(Debug)]
pub struct Request {
    pub head: Box<Head>,
    pub kind: SpanKind,
    pub tid: u32,
    /// Index of this request on its connection (links the two sides).
    pub seq: u64,
    pub ctx: SpanContext,
}

/// Ids of a span, decided when its request is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// The ids came from a `traceparent` header (they are authoritative).
    pub from_header: bool,
}

impl SpanContext {
    /// Server spans join an incoming trace as a child; client spans carry
    /// the id the caller put in its outgoing `traceparent` (that id names
    /// this very call, so the server side links to it).
    fn for_request(kind: SpanKind, head: &Head) -> Self {
        let incoming = head.header("traceparent").and_then(TraceParent::parse);
        match (incoming, kind) {
            (Some(tp), SpanKind::Server) => Self {
                trace_id: tp.trace_id,
                span_id: SpanId::random(),
                parent: Some(tp.parent_id),
                sampled: tp.sampled,
                from_header: true,
            },
            (Some(tp), SpanKind::Client) => Self {
                trace_id: tp.trace_id,
                span_id: tp.parent_id,
                parent: None,
                sampled: tp.sampled,
                from_header: true,
            },
            (None, _) => Self {
                trace_id: TraceId::random(),
                span_id: SpanId::random(),
                parent: None,
                sampled: true,
                from_header: false,
            },
        }
    }
}

/// A finished exchange, ready to become a span.
#[derive(Debug)]
pub struct Exchange {
    pub request: Request,
    pub response: Box<Head>,
    pub end_ktime_ns: u64,
}

/// What a connection produced from one event.
#[derive(Debug, Default)]
pub struct Output {
    /// Client requests seen: (seq, context), for linking with server spans.
    pub client_requests: Vec<(u64, SpanContext)>,
    /// Requests this (server) process read.
    pub server_requests: usize,
    pub exchanges: Vec<Exchange>,
    pub malformed: u64,
    pub orphans: u64,
}

#[derive(Debug)]
pub struct Conn {
    pub process: Process,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub last_ktime_ns: u64,
    ingress: HttpStream,
    egress: HttpStream,
    pending: VecDeque<Request>,
    responding: Option<(Request, Box<Head>)>,
    next_seq: u64,
}

impl Conn {
    pub fn new(process: Process, local: Option<SocketAddr>, remote: Option<SocketAddr>) -> Self {
        Self {
            process,
            local,
            remote,
            last_ktime_ns: 0,
            ingress: HttpStream::new(),
            egress: HttpStream::new(),
            pending: VecDeque::new(),
            responding: None,
            next_seq: 0,
        }
    }

    /// (client, server) addresses of this connection for a span of `kind`.
    pub fn endpoints(&self, kind: SpanKind) -> (Option<SocketAddr>, Option<SocketAddr>) {
        match kind {
            SpanKind::Server => (self.remote, self.local),
            SpanKind::Client => (self.local, self.remote),
        }
    }

    /// Requests still waiting for a response.
    pub fn unanswered(&self) -> usize {
        self.pending.len() + usize::from(self.responding.is_some())
    }

    /// Feeds one syscall's bytes.
    pub fn data(&mut self, direction: Direction, payload: bytes::Bytes, len: u64, ktime: u64, tid: u32) -> Output {
        self.last_ktime_ns = ktime;
        self.process.tid = tid;
        let missing = len.saturating_sub(payload.len() as u64);
        let stream = match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        };
        stream.push(payload, missing, ktime);
        let mut out = Output::default();
        self.drain(direction, tid, &mut out);
        out
    }

    /// The socket closed: ends close-delimited responses.
    pub fn close(&mut self) -> Output {
        let mut out = Output::default();
        for direction in [Direction::Ingress, Direction::Egress] {
            let stream = self.stream(direction);
            let is_responses = stream.flow() == Some(Flow::Responses);
            if let Some(Item::End { ktime_ns }) = stream.close() {
                if is_responses {
                    if let Some((request, response)) = self.responding.take() {
                        out.exchanges.push(Exchange {
                            request,
                            response,
                            end_ktime_ns: ktime_ns,
                        });
                    }
                }
            }
        }
        out
    }

    fn stream(&mut self, direction: Direction) -> &mut HttpStream {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }

    fn drain(&mut self, direction: Direction, tid: u32, out: &mut Output) {
        while let Some(item) = self.stream(direction).next_item() {
            let flow = self.stream(direction).flow();
            match (item, flow) {
                (Item::Malformed(_), _) => out.malformed += 1,
                (Item::Head(head), Some(Flow::Requests)) => {
                    let kind = match direction {
                        Direction::Ingress => SpanKind::Server,
                        Direction::Egress => SpanKind::Client,
                    };
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let ctx = SpanContext::for_request(kind, &head);
                    match kind {
                        SpanKind::Client => out.client_requests.push((seq, ctx)),
                        SpanKind::Server => out.server_requests += 1,
                    }
                    self.pending.push_back(Request {
                        head,
                        kind,
                        tid,
                        seq,
                        ctx,
                    });
                }
                (Item::Head(head), _) => self.response_head(direction, head, out),
                (Item::End { ktime_ns }, Some(Flow::Responses)) => {
                    if let Some((request, response)) = self.responding.take() {
                        out.exchanges.push(Exchange {
                            request,
                            response,
                            end_ktime_ns: ktime_ns,
                        });
                    }
                }
                (Item::End { .. }, _) => {}
            }
        }
    }

    fn response_head(&mut self, direction: Direction, head: Box<Head>, out: &mut Output) {
        let status = head.status().unwrap_or(0);
        let Some(request) = self.pending.pop_front() else {
            out.orphans += 1;
            if matches!(status, 100..=199 | 204 | 304) {
                self.stream(direction).expect_no_body();
            }
            return;
        };
        if (100..200).contains(&status) && status != 101 {
            // Interim response: the final one is still to come.
            self.stream(direction).expect_no_body();
            self.pending.push_front(request);
            return;
        }
        if status == 101 {
            // Switched protocols: the rest of the connection is not HTTP/1.x.
            let end = head.start_ktime_ns;
            out.exchanges.push(Exchange {
                request,
                response: head,
                end_ktime_ns: end,
            });
            self.ingress.abandon();
            self.egress.abandon();
            self.pending.clear();
            return;
        }
        if request.head.method() == Some("HEAD") || status == 204 || status == 304 {
            self.stream(direction).expect_no_body();
        }
        self.responding = Some((request, head));
    }
}
