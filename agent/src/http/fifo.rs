//! HTTP/1.x behind the protocol seam: both streams of a connection and
//! FIFO pairing of its requests with responses.
use std::collections::VecDeque;

use meshless_common::Direction;

use super::{Flow, Head, HttpStream, Item, KeptHeaders};
use crate::{
    correlate::protocol::{Exchange, Output, Protocol, Request, Response, Segment, SpanContext, Thread},
    span::{SpanKind, Unanswered},
    trace_context::KernelCtx,
};

/// Claims every connection that no more specific protocol claimed: the
/// parser itself resyncs on garbage (the kernel only follows sockets whose
/// first bytes looked like HTTP).
pub fn detect(_first: &[u8], _direction: Direction, kept: &KeptHeaders) -> Option<Box<dyn Protocol>> {
    Some(Box::new(Http1::keeping(kept.clone())))
}

/// Requests kept waiting for responses on one connection. Only a
/// pipelining peer queues more than one; past this the connection's
/// pairing is given up (the requests become `queue_overflow` spans).
pub const MAX_PENDING: usize = 64;

/// Index of a direction in per-direction arrays.
fn way(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// HTTP/1.x state of one connection.
#[derive(Debug)]
pub struct Http1 {
    last_ktime_ns: u64,
    ingress: HttpStream,
    egress: HttpStream,
    pending: VecDeque<Request>,
    responding: Option<(Request, Head)>,
    next_seq: u64,
    /// Two requests were seen in one syscall: the peer pipelines, so a new
    /// request does not mean the ones before it were answered.
    pipelined: bool,
    /// Pairing was lost on a pipelined connection and cannot be regained:
    /// nothing more is paired (spans dropped and counted, never wrong).
    poisoned: bool,
    /// Time of the last syscall that carried bytes of a finished request.
    last_request_end_ns: u64,
    /// Latest start of any response head seen (answered or orphaned).
    last_response_start_ns: u64,
    /// Latest time bytes were seen each way (ingress, egress).
    last_bytes_ns: [u64; 2],
    /// (direction, ktime, len) of the last event, to drop exact duplicates.
    last_event: Option<(Direction, u64, u64)>,
    /// Kernel contexts of recent events, by (direction, ktime): a request
    /// head takes the one of the syscall whose payload it starts.
    kernel_ctx: VecDeque<(Direction, u64, KernelCtx)>,
    /// Per direction, after events were lost and until the stream finds a
    /// message start again: Some(time of the last segment skipped meanwhile),
    /// Some(0) before any was.
    resyncing: [Option<u64>; 2],
    /// A response that came while no request waited, kept until the next
    /// request head in case it answers that one (see [`Early`]).
    early: Option<Box<Early>>,
    /// Events were lost just before the next event (set by `lose_events`).
    lost_before_next: bool,
    /// The exit of the event that came right after lost events: a request
    /// sent before it may have been answered in them. Events are numbered
    /// as their exits run, so an answer read while its request's write was
    /// still on its way to its exit is numbered first, and can be lost
    /// while the request is not.
    lost_until_ns: u64,
}

/// A response seen before the request it answers. A client whose writes
/// and reads run on different threads (Go's net/http) can have its read
/// of the answer return, and its event reach the ring buffer, before the
/// write of the request got to its own exit. Events come in the order
/// their exits ran, so such a request shows up after its response. The
/// request's `sent_ns` (taken at sys_enter) still comes before the
/// response's arrival: a request sent no later than the response began to
/// arrive, on a connection that does not pipeline and had nothing else
/// waiting, is the one it answers. Anything else drops it (an orphan).
#[derive(Debug)]
struct Early {
    head: Head,
    /// The time its last bytes were read, once they were.
    end_ktime_ns: Option<u64>,
}

/// Kernel contexts remembered per connection while their heads complete.
const KERNEL_CTX_KEPT: usize = 8;

/// Pairing rules (why FIFO matching cannot drift):
/// - An HTTP/1 client that does not pipeline sends a request only after
///   reading the whole previous response. So on such a connection a new
///   request means every older one was answered: requests still queued had
///   their responses lost (ring-buffer loss, a mid-stream start, bytes not
///   captured) and are dropped, and a response still being read is ended.
/// - A response cannot answer a request seen after the response started,
///   and a request delivered after a later response went by (events
///   reordered) may have been answered by it: it is dropped.
/// - Where responses may have been in bytes that were not captured, the
///   requests sent before them end without a status rather than take the
///   next response seen.
/// - On a pipelining connection any lost framing stops pairing for good.
impl Default for Http1 {
    fn default() -> Self {
        Self::new()
    }
}

impl Http1 {
    pub fn new() -> Self {
        Self::keeping(KeptHeaders::all())
    }

    /// A connection whose heads keep only the `kept` header fields.
    pub fn keeping(kept: KeptHeaders) -> Self {
        Self {
            last_ktime_ns: 0,
            ingress: HttpStream::keeping(kept.clone()),
            egress: HttpStream::keeping(kept),
            pending: VecDeque::new(),
            responding: None,
            next_seq: 0,
            pipelined: false,
            poisoned: false,
            last_request_end_ns: 0,
            last_response_start_ns: 0,
            last_bytes_ns: [0; 2],
            last_event: None,
            kernel_ctx: VecDeque::new(),
            resyncing: [None; 2],
            early: None,
            lost_before_next: false,
            lost_until_ns: 0,
        }
    }

    /// Approximate heap bytes this connection holds.
    fn held_bytes(&self) -> usize {
        let request_bytes = |r: &Request| {
            std::mem::size_of::<Request>()
                + r.head.headers.heap_bytes()
                + match &r.head.kind {
                    crate::http::HeadKind::Request { method } => method.heap_bytes(),
                    crate::http::HeadKind::Response { .. } => 0,
                }
        };
        std::mem::size_of::<Self>()
            + self.ingress.state_bytes()
            + self.egress.state_bytes()
            + self.pending.iter().map(request_bytes).sum::<usize>()
            + self.responding.as_ref().map_or(0, |(r, _)| request_bytes(r) + 512)
            + self
                .early
                .as_ref()
                .map_or(0, |e| std::mem::size_of::<Early>() + e.head.headers.heap_bytes())
    }

    /// Feeds one syscall's bytes, with the context the kernel chose if they
    /// start a request.
    fn feed(&mut self, segment: Segment, out: &mut Output) {
        let Segment {
            direction,
            payload,
            len,
            ktime_ns: ktime,
            sent_ns: sent,
            thread,
            ctx,
        } = segment;
        if self.last_event.replace((direction, ktime, len)) == Some((direction, ktime, len)) {
            out.duplicates += 1;
            return;
        }
        if std::mem::take(&mut self.lost_before_next) {
            self.lost_until_ns = ktime;
        }
        if let Some(ctx) = ctx {
            if self.kernel_ctx.len() >= KERNEL_CTX_KEPT {
                self.kernel_ctx.pop_front();
            }
            // Keyed by the time the head it starts is dated by.
            self.kernel_ctx.push_back((direction, sent, ctx));
        }
        self.last_ktime_ns = self.last_ktime_ns.max(ktime);
        let seen = &mut self.last_bytes_ns[way(direction)];
        *seen = (*seen).max(sent);
        let missing = len.saturating_sub(payload.len() as u64);
        if let Some(skipped) = self.resyncing[way(direction)].filter(|t| *t > 0) {
            self.lose_skipped(direction, skipped, out);
        }
        self.stream(direction).push_sent(payload, missing, ktime, sent);
        self.drain(direction, thread, sent, out);
        if self.resyncing[way(direction)].is_some() {
            self.resyncing[way(direction)] = self.stream(direction).desynced().then_some(sent);
        }
    }

    /// Bytes skipped (up to `at`) while a stream looked for a message start
    /// after a loss may have held whole messages: like a gap there.
    fn lose_skipped(&mut self, direction: Direction, at: u64, out: &mut Output) {
        let other = match direction {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        };
        let responses = self.stream(direction).flow() == Some(Flow::Responses)
            || (self.stream(direction).flow().is_none() && self.stream(other).flow() == Some(Flow::Requests));
        if responses {
            self.lose_responses(at, false, out);
        } else {
            self.lose_requests(at, out);
        }
    }

    /// The socket closed (`why` = ConnectionClosed) or was forgotten
    /// (Timeout when idle; None when shed): ends close-delimited responses
    /// and turns requests still waiting into unanswered exchanges (or
    /// drops them when `why` is None).
    fn close_conn(&mut self, why: Option<Unanswered>, at_ktime_ns: u64, out: &mut Output) {
        self.last_ktime_ns = self.last_ktime_ns.max(at_ktime_ns);
        for direction in [Direction::Ingress, Direction::Egress] {
            let stream = self.stream(direction);
            let is_responses = stream.flow() == Some(Flow::Responses);
            if let Some(Item::End { ktime_ns }) = stream.close() {
                if is_responses {
                    self.finish_response(ktime_ns, out);
                }
            }
        }
        let end = self.last_ktime_ns;
        // A response head seen whose end never came still answered.
        self.finish_response(end, out);
        self.drop_early(out);
        match why {
            Some(why) if !self.poisoned => self.give_up(why, end, out),
            _ => out.resyncs += std::mem::take(&mut self.pending).len() as u64,
        }
    }

    /// Events of this connection were lost (the kernel's per-connection
    /// event sequence jumped): whatever is pending may have been answered
    /// in them, and both streams restart at the next message start.
    fn lose_events(&mut self, out: &mut Output) {
        self.drop_early(out);
        out.resyncs += self.pending.len() as u64 + u64::from(self.responding.is_some());
        self.pending.clear();
        self.responding = None;
        self.ingress.force_end();
        self.egress.force_end();
        self.resyncing = [Some(0); 2];
        self.lost_before_next = true;
        if self.pipelined {
            // Responses to requests sent before the loss may still come.
            self.poisoned = true;
        }
    }

    /// Every waiting request becomes an exchange without a response.
    fn give_up(&mut self, why: Unanswered, end_ktime_ns: u64, out: &mut Output) {
        for request in self.pending.drain(..) {
            out.exchanges.push(Exchange {
                rpc: None,
                end_ktime_ns: end_ktime_ns.max(request.head.start_ktime_ns),
                request,
                response: Response::Missing(why),
            });
        }
    }

    fn stream(&mut self, direction: Direction) -> &mut HttpStream {
        match direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }

    /// `sent`: when the bytes just pushed were on their way.
    fn drain(&mut self, direction: Direction, thread: Thread, sent: u64, out: &mut Output) {
        let other = match direction {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        };
        while let Some(item) = self.stream(direction).next_item() {
            let mut flow = self.stream(direction).flow();
            if flow.is_none() && self.stream(other).flow() == Some(Flow::Requests) {
                // Nothing readable came this way yet, but it is where the
                // responses come from.
                flow = Some(Flow::Responses);
            }
            match (item, flow) {
                (Item::Malformed(_), Some(Flow::Responses)) => {
                    out.malformed += 1;
                    // Where a response should start there are bytes we
                    // cannot read: the response to what was sent before is
                    // unknowable, never to be taken from the next one.
                    self.lose_responses(sent, false, out);
                }
                (Item::Malformed(_), _) => {
                    out.malformed += 1;
                    self.lose_requests(sent, out);
                }
                (Item::Gap { sent_ns }, Some(Flow::Responses)) => self.lose_responses(sent_ns, true, out),
                (Item::Gap { sent_ns }, _) => self.lose_requests(sent_ns, out),
                (Item::Head(head), Some(Flow::Requests)) => self.request_head(direction, head, thread, out),
                (Item::Head(head), _) => self.response_head(direction, head, sent, out),
                (Item::End { ktime_ns }, Some(Flow::Responses)) => {
                    if let (None, Some(early)) = (&self.responding, &mut self.early) {
                        early.end_ktime_ns.get_or_insert(ktime_ns);
                    }
                    self.finish_response(ktime_ns, out);
                }
                // Dated like the head that may begin in the same syscall.
                (Item::End { .. }, _) => self.last_request_end_ns = self.stream(direction).last_sent(),
            }
        }
    }

    fn finish_response(&mut self, end_ktime_ns: u64, out: &mut Output) {
        if let Some((request, response)) = self.responding.take() {
            out.exchanges.push(Exchange {
                rpc: None,
                request,
                response: Response::Seen(response),
                end_ktime_ns,
            });
        }
    }

    /// Requests may have been in bytes (sent at `at`) we could not follow:
    /// on a pipelining connection their responses would shift everything
    /// after them; a peer that does not pipeline sent them only after the
    /// requests before were answered, so those lost their responses.
    fn lose_requests(&mut self, at: u64, out: &mut Output) {
        if self.pipelined {
            self.poison(out);
            return;
        }
        let before = self.pending.len();
        self.pending.retain(|r| r.head.start_ktime_ns >= at);
        out.resyncs += (before - self.pending.len()) as u64;
    }

    /// Responses may have been lost at time `at`: requests seen before it
    /// end without a status (`uncaptured`: their responses were probably in
    /// the bytes not captured) or are dropped (unreadable bytes).
    fn lose_responses(&mut self, at: u64, uncaptured: bool, out: &mut Output) {
        if self.pipelined {
            // Later responses may belong to any of these; keep none.
            while let Some(request) = self.pending.pop_front() {
                if uncaptured && request.head.start_ktime_ns <= at {
                    out.exchanges.push(Exchange {
                        rpc: None,
                        request,
                        response: Response::Uncaptured,
                        end_ktime_ns: at,
                    });
                } else {
                    out.resyncs += 1;
                }
            }
            self.poison(out);
            return;
        }
        while self.pending.front().is_some_and(|r| r.head.start_ktime_ns <= at) {
            let Some(request) = self.pending.pop_front() else {
                break;
            };
            if uncaptured {
                out.exchanges.push(Exchange {
                    rpc: None,
                    request,
                    response: Response::Uncaptured,
                    end_ktime_ns: at,
                });
            } else {
                out.resyncs += 1;
            }
        }
    }

    /// Stops pairing on this connection for good.
    fn poison(&mut self, out: &mut Output) {
        self.drop_early(out);
        if !self.poisoned {
            self.poisoned = true;
            out.resyncs += self.pending.len() as u64;
            self.pending.clear();
        }
    }

    /// Forgets a response kept for a request that did not come: an orphan.
    fn drop_early(&mut self, out: &mut Output) {
        if self.early.take().is_some() {
            out.orphans += 1;
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

    fn request_head(&mut self, direction: Direction, head: Head, thread: Thread, out: &mut Output) {
        let kind = match direction {
            Direction::Ingress => SpanKind::Server,
            Direction::Egress => SpanKind::Client,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let kernel = self.take_kernel_ctx(direction, &head);
        let ctx = SpanContext::for_request(kind, &head, kernel);
        out.aliases.extend(ctx.alias);
        // Linking keys on the request's index; keep counting even when the
        // request itself is not kept.
        match kind {
            SpanKind::Client => out.client_requests.push((seq, ctx)),
            SpanKind::Server => out.server_requests.push((seq, ctx)),
        }
        let response_direction = match direction {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        };
        if self.poisoned {
            out.resyncs += 1;
            return;
        }
        let early = self.early.take();
        let waiting = !self.pending.is_empty() || self.responding.is_some();
        if waiting && head.start_ktime_ns == self.last_request_end_ns {
            // It began in the syscall that ended the request before it.
            self.pipelined = true;
        } else if waiting && !self.pipelined {
            // The peer does not pipeline, so everything sent before this
            // request was answered: what still waits lost its response.
            let before = self.pending.len();
            self.pending.retain(|r| r.head.start_ktime_ns >= head.start_ktime_ns);
            out.resyncs += (before - self.pending.len()) as u64;
            if let Some(Item::End { ktime_ns }) = self.stream(response_direction).force_end() {
                self.finish_response(ktime_ns, out);
            }
        }
        // Bytes came back while this head, in parts, was being written: a
        // peer that does not pipeline never does that, so the head is glued
        // together from two requests around lost bytes. (One syscall's bytes
        // are one write; an answer dated inside it came after they left.)
        let glued = !head.in_one_segment && self.last_bytes_ns[way(response_direction)] > head.start_ktime_ns;
        if glued && self.pipelined {
            self.poison(out);
        }
        let version = if head.version == 0 { "1.0" } else { "1.1" };
        let request = Request {
            head,
            kind,
            thread,
            seq,
            ctx,
            version,
        };
        if let Some(early) = early {
            let answers = !waiting
                && !self.pipelined
                && !self.poisoned
                && !glued
                && request.head.start_ktime_ns <= early.head.start_ktime_ns;
            if answers {
                self.answer_early(request, *early, response_direction, out);
                return;
            }
            out.orphans += 1;
        }
        let maybe_answered_in_lost = request.head.start_ktime_ns < self.lost_until_ns;
        if self.poisoned || glued || maybe_answered_in_lost || request.head.start_ktime_ns < self.last_response_start_ns
        {
            out.resyncs += 1;
            return;
        }
        if self.pending.len() >= MAX_PENDING {
            out.overflows += 1;
            out.resyncs += 1;
            let end = self.last_ktime_ns;
            self.give_up(Unanswered::QueueOverflow, end, out);
            self.poisoned = true;
            return;
        }
        self.pending.push_back(request);
    }

    /// Pairs a request that came after its response ([`Early`]).
    fn answer_early(&mut self, request: Request, early: Early, response_direction: Direction, out: &mut Output) {
        out.early_answers += 1;
        match early.end_ktime_ns {
            Some(end_ktime_ns) => out.exchanges.push(Exchange {
                rpc: None,
                request,
                response: Response::Seen(early.head),
                end_ktime_ns,
            }),
            None => {
                if request.head.method() == Some("HEAD") {
                    self.stream(response_direction).expect_no_body();
                }
                self.responding = Some((request, early.head));
            }
        }
    }

    /// `sent`: when the bytes that completed the head were on their way.
    fn response_head(&mut self, direction: Direction, head: Head, sent: u64, out: &mut Output) {
        let status = head.status().unwrap_or(0);
        self.last_response_start_ns = self.last_response_start_ns.max(head.start_ktime_ns);
        let request_direction = match direction {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        };
        if !self.pipelined && !head.in_one_segment && self.last_bytes_ns[way(request_direction)] > head.start_ktime_ns {
            // Request bytes went out while this head was arriving: a peer
            // that does not pipeline never does that, so the head is glued
            // from two responses around lost bytes. Whatever it answers is
            // unknowable.
            out.orphans += 1;
            self.lose_responses(sent, false, out);
            self.stream(direction).force_end();
            return;
        }
        // A response cannot answer a request seen after it started.
        let answerable = self
            .pending
            .front()
            .is_some_and(|r| r.head.start_ktime_ns <= head.start_ktime_ns);
        let request = if self.poisoned || !answerable {
            None
        } else {
            self.pending.pop_front()
        };
        let Some(request) = request else {
            if matches!(status, 100..=199 | 204 | 304) {
                self.stream(direction).expect_no_body();
            }
            // Only a client reads answers on a thread of their own; a server
            // writes one only after reading the request's head, whose event
            // is out by then.
            let may_be_early = direction == Direction::Ingress
                && !self.pipelined
                && !self.poisoned
                && self.pending.is_empty()
                && self.responding.is_none()
                && !(100..200).contains(&status);
            if may_be_early {
                self.drop_early(out);
                self.early = Some(Box::new(Early {
                    head,
                    end_ktime_ns: None,
                }));
                return;
            }
            out.orphans += 1;
            if !self.pending.is_empty() {
                out.resyncs += 1;
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
            self.ingress.abandon();
            self.egress.abandon();
            self.pending.clear();
            if is_h2c(&head) {
                // RFC 7540 section 3.2: the request is answered on stream 1.
                out.upgrade = Some(request);
                return;
            }
            let end = head.start_ktime_ns;
            out.exchanges.push(Exchange {
                rpc: None,
                request,
                response: Response::Seen(head),
                end_ktime_ns: end,
            });
            return;
        }
        if request.head.method() == Some("HEAD") || status == 204 || status == 304 {
            self.stream(direction).expect_no_body();
        }
        self.responding = Some((request, head));
    }
}

impl Protocol for Http1 {
    fn data(&mut self, segment: Segment, out: &mut Output) {
        self.feed(segment, out);
    }

    fn close(&mut self, why: Option<Unanswered>, at_ktime_ns: u64, out: &mut Output) {
        self.close_conn(why, at_ktime_ns, out);
    }

    fn events_lost(&mut self, out: &mut Output) {
        self.lose_events(out);
    }

    fn state_bytes(&self) -> usize {
        self.held_bytes()
    }
}

/// A `101` that switches to cleartext HTTP/2 (`Upgrade: h2c`).
fn is_h2c(response: &Head) -> bool {
    response
        .header("upgrade")
        .is_some_and(|u| u.trim().eq_ignore_ascii_case("h2c"))
}
