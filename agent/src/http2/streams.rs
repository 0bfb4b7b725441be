//! Pairing by stream id: a request is the first header block of a stream
//! in the requests' direction, its response the header block coming back
//! on the same stream; the exchange ends with the response's END_STREAM,
//! an RST_STREAM either way, or a GOAWAY that excludes the stream.
use meshless_common::Direction;

use super::{
    frames::{Frame, FrameStream},
    grpc,
    hpack::{Block, Field},
};
use crate::{
    correlate::protocol::{Exchange, Output, Protocol, Request, Response, Segment, SpanContext, Thread},
    http::{Head, HeadKind, Headers, Method},
    span::{SpanKind, Unanswered},
};

/// Streams open at once per connection (HTTP/2 peers default to 100-250
/// concurrent streams); past this new requests are dropped and counted.
pub const MAX_STREAMS: usize = 1024;

/// An open stream.
#[derive(Debug)]
struct Stream {
    request: Request,
    /// The response's first header block, once seen.
    response: Option<Block>,
    /// Trailers (or a trailers-only response).
    trailers: Option<Block>,
}

/// Responses kept per connection for requests not seen yet (see
/// [`Early`]); past this the lowest stream's is dropped as an orphan.
pub const MAX_EARLY: usize = 16;

/// A response whose event came before its request's: a client that writes
/// and reads on different threads (Go) can have the answer's read reach the
/// ring buffer before the write of the request got to its exit. Stream ids
/// are never reused, so it answers the request on its stream when that
/// comes.
#[derive(Debug)]
struct Early {
    response: Block,
    trailers: Option<Block>,
    /// When END_STREAM came, if it did.
    end_ktime_ns: Option<u64>,
}

/// HTTP/2 state of one connection.
#[derive(Debug)]
pub struct Http2 {
    ingress: FrameStream,
    egress: FrameStream,
    /// The direction requests travel, once known (the preface's, or the
    /// first block with a known `:method`).
    requests: Option<Direction>,
    streams: foldhash::HashMap<u32, Stream>,
    early: foldhash::HashMap<u32, Early>,
    last_ktime_ns: u64,
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

impl Http2 {
    /// `preface`: the direction the client preface was seen in; None when
    /// the connection was already running (HPACK tables start empty).
    pub fn new(preface: Option<Direction>) -> Self {
        let stream = |d: Direction| match preface {
            Some(p) => FrameStream::new(p == d),
            None => FrameStream::mid_connection(),
        };
        Self {
            ingress: stream(Direction::Ingress),
            egress: stream(Direction::Egress),
            requests: preface,
            streams: foldhash::HashMap::default(),
            early: foldhash::HashMap::default(),
            last_ktime_ns: 0,
        }
    }

    /// A connection that switched from HTTP/1.1 (`Upgrade: h2c`): the
    /// client's preface comes next, the server's frames may already have
    /// started in bytes the HTTP/1 parser consumed (so that direction waits
    /// for a frame start, its HPACK table trusted from there), and
    /// `request` is answered on stream 1.
    pub fn upgraded(mut request: Request) -> Self {
        let requests = match request.kind {
            SpanKind::Server => Direction::Ingress,
            SpanKind::Client => Direction::Egress,
        };
        let stream = |d: Direction| {
            if d == requests {
                FrameStream::new(true)
            } else {
                FrameStream::mid_connection()
            }
        };
        request.version = "2";
        let mut h2 = Self {
            ingress: stream(Direction::Ingress),
            egress: stream(Direction::Egress),
            requests: Some(requests),
            streams: foldhash::HashMap::default(),
            early: foldhash::HashMap::default(),
            last_ktime_ns: request.head.start_ktime_ns,
        };
        h2.streams.insert(
            1,
            Stream {
                request,
                response: None,
                trailers: None,
            },
        );
        h2
    }

    fn way(&mut self, direction: Direction) -> &mut FrameStream {
        match index(direction) {
            0 => &mut self.ingress,
            _ => &mut self.egress,
        }
    }

    fn frame(&mut self, direction: Direction, frame: Frame, thread: Thread, out: &mut Output) {
        match frame {
            Frame::Headers {
                stream,
                block,
                end_stream,
                ktime_ns,
            } => self.headers(direction, stream, block, end_stream, ktime_ns, thread, out),
            Frame::DataEnd { stream, ktime_ns } => {
                if Some(direction) != self.requests {
                    if let Some(early) = self.early.get_mut(&stream) {
                        early.end_ktime_ns.get_or_insert(ktime_ns);
                    }
                    self.finish(stream, ktime_ns, None, out);
                }
            }
            Frame::Reset { stream, code, ktime_ns } => self.reset(stream, code, ktime_ns, out),
            Frame::GoAway {
                last_stream, ktime_ns, ..
            } => {
                if Some(direction) != self.requests {
                    // Streams past `last_stream` were never processed.
                    let refused: Vec<u32> = self.streams.keys().copied().filter(|&s| s > last_stream).collect();
                    for stream in refused {
                        self.finish(stream, ktime_ns, Some(Unanswered::GoAway), out);
                    }
                }
            }
            Frame::Lost { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn headers(
        &mut self,
        direction: Direction,
        stream: u32,
        block: Option<Block>,
        end_stream: bool,
        ktime_ns: u64,
        thread: Thread,
        out: &mut Output,
    ) {
        let says_request = block
            .as_ref()
            .is_some_and(|b| matches!(b.get(":method"), Some(Some(_))));
        let says_response = block
            .as_ref()
            .is_some_and(|b| matches!(b.get(":status"), Some(Some(_))));
        if says_request && self.requests.is_none() {
            self.requests = Some(direction);
        }
        let is_request = says_request || (!says_response && self.requests == Some(direction));
        if is_request {
            if !self.streams.contains_key(&stream) {
                self.request(direction, stream, block, ktime_ns, thread, out);
            }
            return;
        }
        if self.requests.is_none() && says_response {
            self.requests = Some(opposite(direction));
        }
        let block = block.unwrap_or_else(|| Block {
            fields: vec![Field::Unknown],
            limited: false,
        });
        let Some(open) = self.streams.get_mut(&stream) else {
            // Answers come in on a client's side: kept for their request.
            if direction == Direction::Ingress {
                self.keep_early(stream, block, end_stream.then_some(ktime_ns), out);
            } else {
                out.orphans += 1;
            }
            return;
        };
        if open.response.is_none() {
            open.response = Some(block);
        } else {
            open.trailers = Some(block);
        }
        if end_stream {
            self.finish(stream, ktime_ns, None, out);
        }
    }

    /// A new stream's request.
    fn request(
        &mut self,
        direction: Direction,
        stream: u32,
        block: Option<Block>,
        ktime_ns: u64,
        thread: Thread,
        out: &mut Output,
    ) {
        let kind = match direction {
            Direction::Ingress => SpanKind::Server,
            Direction::Egress => SpanKind::Client,
        };
        let head = request_head(block.as_ref(), ktime_ns);
        let ctx = SpanContext::for_request(kind, &head, None);
        out.aliases.extend(ctx.alias);
        let seq = u64::from(stream);
        match kind {
            SpanKind::Client => out.client_requests.push((seq, ctx)),
            SpanKind::Server => out.server_requests.push((seq, ctx)),
        }
        if self.streams.len() >= MAX_STREAMS {
            out.overflows += 1;
            out.resyncs += 1;
            return;
        }
        let request = Request {
            head,
            kind,
            thread,
            seq,
            ctx,
            version: "2",
        };
        let (response, trailers, end) = match self.early.remove(&stream) {
            Some(early) => {
                out.early_answers += 1;
                (Some(early.response), early.trailers, early.end_ktime_ns)
            }
            None => (None, None, None),
        };
        self.streams.insert(
            stream,
            Stream {
                request,
                response,
                trailers,
            },
        );
        if let Some(end) = end {
            self.finish(stream, end, None, out);
        }
    }

    /// Keeps a header block that came back on a stream whose request was
    /// not seen: its response, or trailers after it.
    fn keep_early(&mut self, stream: u32, block: Block, end: Option<u64>, out: &mut Output) {
        if let Some(early) = self.early.get_mut(&stream) {
            early.trailers = Some(block);
            early.end_ktime_ns = early.end_ktime_ns.or(end);
            return;
        }
        if self.early.len() >= MAX_EARLY {
            // The lowest stream's request is the least likely to come.
            if let Some(lowest) = self.early.keys().copied().min() {
                self.early.remove(&lowest);
                out.orphans += 1;
            }
        }
        self.early.insert(
            stream,
            Early {
                response: block,
                trailers: None,
                end_ktime_ns: end,
            },
        );
    }

    /// Ends a stream that either side reset.
    fn reset(&mut self, stream: u32, code: u32, ktime_ns: u64, out: &mut Output) {
        let Some(open) = self.streams.get(&stream) else {
            return;
        };
        let reset = grpc::Reset {
            code,
            elapsed_ns: ktime_ns.saturating_sub(open.request.head.start_ktime_ns),
        };
        self.end(stream, ktime_ns, Some(Unanswered::Reset), Some(reset), out);
    }

    /// Ends a stream: with its response when seen, else as `why`.
    fn finish(&mut self, stream: u32, ktime_ns: u64, why: Option<Unanswered>, out: &mut Output) {
        self.end(stream, ktime_ns, why, None, out);
    }

    fn end(
        &mut self,
        stream: u32,
        ktime_ns: u64,
        why: Option<Unanswered>,
        reset: Option<grpc::Reset>,
        out: &mut Output,
    ) {
        let Some(open) = self.streams.remove(&stream) else {
            return;
        };
        let rpc = grpc::rpc(
            &open.request.head,
            open.response.as_ref(),
            open.trailers.as_ref(),
            reset,
        );
        let response = match (open.response.as_ref().map(response_head), why) {
            (Some(Some(head)), _) => Response::Seen(head),
            // A response went by whose status could not be decoded.
            (Some(None), None) => Response::Uncaptured,
            (_, Some(why)) => Response::Missing(why),
            (None, None) => Response::Uncaptured,
        };
        out.exchanges.push(Exchange {
            end_ktime_ns: ktime_ns.max(open.request.head.start_ktime_ns),
            request: open.request,
            response,
            rpc,
        });
    }

    fn absorb_faults(&mut self, out: &mut Output) {
        for way in [&mut self.ingress, &mut self.egress] {
            let faults = std::mem::take(&mut way.faults);
            out.malformed += faults.malformed;
            out.limited += faults.limited;
        }
    }
}

impl Protocol for Http2 {
    fn data(&mut self, segment: Segment, out: &mut Output) {
        self.last_ktime_ns = self.last_ktime_ns.max(segment.ktime_ns);
        let missing = segment.len.saturating_sub(segment.payload.len() as u64);
        let mut frames = Vec::new();
        // Requests are dated by when their bytes were on their way (a
        // write's start), like HTTP/1 heads; everything else by exits.
        let at = if self.requests == Some(segment.direction) {
            segment.sent_ns
        } else {
            segment.ktime_ns
        };
        self.way(segment.direction)
            .push(&segment.payload, missing, at, &mut frames);
        for frame in frames {
            self.frame(segment.direction, frame, segment.thread, out);
        }
        self.absorb_faults(out);
    }

    fn close(&mut self, why: Option<Unanswered>, at_ktime_ns: u64, out: &mut Output) {
        out.orphans += self.early.len() as u64;
        self.early.clear();
        let end = self.last_ktime_ns.max(at_ktime_ns);
        let mut open: Vec<u32> = self.streams.keys().copied().collect();
        open.sort_unstable();
        match why {
            Some(why) => {
                for stream in open {
                    self.finish(stream, end, Some(why), out);
                }
            }
            None => {
                out.resyncs += open.len() as u64;
                self.streams.clear();
            }
        }
    }

    fn events_lost(&mut self, _out: &mut Output) {
        // Streams stay open (their ends may still come; close ends the
        // rest), but framing and both HPACK tables start over.
        self.ingress.lose();
        self.egress.lose();
    }

    fn state_bytes(&self) -> usize {
        let per_stream = std::mem::size_of::<Stream>() + std::mem::size_of::<Head>() + 256;
        std::mem::size_of::<Self>()
            + self.ingress.state_bytes()
            + self.egress.state_bytes()
            + self
                .streams
                .values()
                .map(|s| {
                    per_stream
                        + s.request
                            .head
                            .headers
                            .iter()
                            .map(|(n, v)| n.len() + v.len() + 48)
                            .sum::<usize>()
                })
                .sum::<usize>()
            // Kept responses: their blocks' fields, bounded by MAX_EARLY.
            + self.early.len() * (std::mem::size_of::<Early>() + 512)
    }
}

/// A request as an HTTP `Head`: `:method` and `:path` become the request
/// line (empty when unknown, never guessed), `:authority` the `host`.
fn request_head(block: Option<&Block>, ktime_ns: u64) -> Head {
    let known = |name| block.and_then(|b| b.get(name)).flatten();
    let mut headers: Vec<(&str, &str)> = Vec::new();
    let mut truncated = block.is_none_or(|b| b.has_unknown() || b.limited);
    for field in block.map_or(&[][..], |b| &b.fields[..]) {
        if let Field::Known(n, v) = field {
            if !n.starts_with(':') {
                headers.push((n.as_str(), v.as_str()));
            }
        }
    }
    if let Some(authority) = known(":authority") {
        if !headers.iter().any(|(n, _)| *n == "host") {
            headers.push(("host", authority));
        }
    }
    let method = known(":method").map_or_else(Method::default, Method::new);
    let target = known(":path").unwrap_or_default();
    truncated |= method.is_empty() || target.is_empty();
    Head {
        kind: HeadKind::Request { method },
        version: 2,
        headers: Headers::request(target, headers),
        headers_dropped: 0,
        truncated,
        start_ktime_ns: ktime_ns,
        at_segment_start: false,
        in_one_segment: false,
    }
}

/// The response head, or None when `:status` is unknown.
fn response_head(block: &Block) -> Option<Head> {
    let status = block.get(":status").flatten()?.parse::<u16>().ok()?;
    let headers = block
        .fields
        .iter()
        .filter_map(|f| match f {
            Field::Known(n, v) if !n.starts_with(':') => Some((n.clone(), v.clone())),
            _ => None,
        })
        .collect();
    Some(Head {
        kind: HeadKind::Response { status },
        version: 2,
        headers,
        headers_dropped: 0,
        truncated: block.has_unknown() || block.limited,
        start_ktime_ns: 0,
        at_segment_start: false,
        in_one_segment: false,
    })
}
