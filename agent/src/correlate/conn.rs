//! One tracked connection: both HTTP streams and the requests in flight.
use std::{collections::VecDeque, net::SocketAddr};

use meshless_common::Direction;

use crate::{
    http::{Flow, Head, HttpStream, Item},
    span::{Process, SpanKind},
    trace_context::{KernelCtx, ParentOrigin, SpanId, TraceId, TraceParent, B3},
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
    /// The ids are authoritative (a header, the caller's TCP option, or the
    /// in-process parent): a same-node link must not replace them.
    pub fixed: bool,
    /// The parent lives in another process (header or TCP option).
    pub remote_parent: bool,
    /// The kernel's trace id for this request when a header we honour here
    /// (but the kernel could not) names another trace: spans that inherited
    /// the kernel's id are moved to the header's trace.
    pub alias: Option<(TraceId, TraceId)>,
}

/// The trace a request's headers name: `traceparent`, else B3.
fn header_parent(head: &Head) -> Option<(TraceId, SpanId, bool)> {
    if let Some(tp) = head.header("traceparent").and_then(TraceParent::parse) {
        return Some((tp.trace_id, tp.parent_id, tp.sampled));
    }
    let b3 = head.header("b3").and_then(B3::parse_single).or_else(|| {
        B3::parse_multi(head.header("x-b3-traceid")?, head.header("x-b3-spanid")?, head.header("x-b3-sampled"))
    })?;
    Some((b3.trace_id, b3.span_id, b3.sampled))
}

impl SpanContext {
    /// Decides a span's ids. The kernel's ids (`kernel`) are used whenever
    /// it saw the request start; a header the kernel did not see (B3, or a
    /// `traceparent` past the capture) only changes the trace and parent.
    /// Client spans always get an id of their own: a `traceparent` the app
    /// wrote names the app's span, which becomes the parent.
    pub fn for_request(kind: SpanKind, head: &Head, kernel: Option<KernelCtx>) -> Self {
        let header = header_parent(head);
        let own_id = kernel.map_or_else(SpanId::random, |k| k.span_id);
        let mut ctx = Self {
            trace_id: kernel.map_or_else(TraceId::random, |k| k.trace_id),
            span_id: own_id,
            parent: kernel.and_then(|k| k.parent),
            sampled: kernel.is_none_or(|k| k.sampled),
            fixed: kernel.is_some_and(|k| k.parent.is_some()),
            remote_parent: kernel.is_some_and(|k| matches!(k.origin, ParentOrigin::Header | ParentOrigin::TcpOption)),
            alias: None,
        };
        let Some((trace, parent, sampled)) = header else {
            return ctx;
        };
        let kernel_decided = kernel.is_some_and(|k| match kind {
            // The kernel already weighed header against option.
            SpanKind::Server => k.origin != ParentOrigin::None,
            // A proxy forwarding the header it received: the in-process
            // parent is nearer and in the same trace.
            SpanKind::Client => k.origin == ParentOrigin::InProcess && k.trace_id == trace,
        });
        if kernel_decided {
            return ctx;
        }
        if let Some(k) = kernel {
            if k.trace_id != trace {
                ctx.alias = Some((k.trace_id, trace));
            }
        }
        ctx.trace_id = trace;
        ctx.parent = Some(parent);
        ctx.sampled = sampled;
        ctx.fixed = true;
        ctx.remote_parent = kind == SpanKind::Server;
        ctx
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
    /// (kernel trace id, trace id a header names instead), see `SpanContext::alias`.
    pub aliases: Vec<(TraceId, TraceId)>,
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
    /// Kernel contexts of recent events, by (direction, ktime): a request
    /// head takes the one of the syscall whose payload it starts.
    kernel_ctx: VecDeque<(Direction, u64, KernelCtx)>,
}

/// Kernel contexts remembered per connection while their heads complete.
const KERNEL_CTX_KEPT: usize = 8;

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
            kernel_ctx: VecDeque::new(),
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

    /// Feeds one syscall's bytes, with the context the kernel chose if they
    /// start a request.
    pub fn data(
        &mut self,
        direction: Direction,
        payload: bytes::Bytes,
        len: u64,
        ktime: u64,
        tid: u32,
        ctx: Option<KernelCtx>,
    ) -> Output {
        self.last_ktime_ns = ktime;
        if let Some(ctx) = ctx {
            if self.kernel_ctx.len() >= KERNEL_CTX_KEPT {
                self.kernel_ctx.pop_front();
            }
            self.kernel_ctx.push_back((direction, ktime, ctx));
        }
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
                    let kernel = self.take_kernel_ctx(direction, &head);
                    let ctx = SpanContext::for_request(kind, &head, kernel);
                    out.aliases.extend(ctx.alias);
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

    /// The kernel context of the syscall this head starts, if it starts one.
    fn take_kernel_ctx(&mut self, direction: Direction, head: &Head) -> Option<KernelCtx> {
        let at = self
            .kernel_ctx
            .iter()
            .position(|(d, t, _)| *d == direction && *t == head.start_ktime_ns)?;
        let (_, _, ctx) = self.kernel_ctx.remove(at)?;
        // Older entries of this direction can no longer start a head.
        self.kernel_ctx
            .retain(|(d, t, _)| *d != direction || *t > head.start_ktime_ns);
        head.at_segment_start.then_some(ctx)
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
