//! Incremental HTTP/1.x parsing of one direction of a connection.
//!
//! The kernel hands us, per syscall, a bounded prefix of the bytes moved and
//! the true byte count. [`HttpStream`] turns that sequence into message
//! heads and message ends. It copes with splits anywhere, pipelining,
//! content-length and chunked bodies, bytes that were never captured
//! (gaps), and garbage; it never panics. Where framing is lost it waits for
//! the next segment that starts like a message ("resync").
mod chunked;
mod fifo;
mod head;
mod memo;
mod method;
mod names;
mod pool;
mod target;

use std::collections::VecDeque;

pub use fifo::{detect, Http1, MAX_PENDING};
pub use head::{cut, Head, HeadKind, Headers, KeptHeaders, MAX_HEADERS};
pub use method::{Method, KNOWN_METHODS};
pub use target::Target;

use chunked::{ChunkStep, Chunked};

/// Largest header block buffered while waiting for its end.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header-buffer capacity kept between messages; a bigger buffer (after a
/// big header block) is given back so idle connections stay small.
const KEEP_HEAD_CAPACITY: usize = 4 * 1024;

/// What a stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message head (request or status line and headers).
    Head(Head),
    /// The message whose head came last has ended; `ktime_ns` is the time of
    /// the last syscall that carried its bytes.
    End { ktime_ns: u64 },
    /// Bytes that could not be parsed were skipped (counted by callers).
    Malformed(&'static str),
    /// Bytes after a message boundary (or the rest of a header block) were
    /// not captured: whole messages may have been in them. Framing resumes
    /// at the next segment that starts like a message. `sent_ns` is when
    /// the bytes were on their way (as a head's start).
    Gap { sent_ns: u64 },
}

/// Which kind of messages a stream carries, decided by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Requests,
    Responses,
}

#[derive(Debug)]
enum State {
    /// Expecting a start line; `head` accumulates the header block.
    Start,
    Body {
        remaining: u64,
    },
    Chunked(Chunked),
    UntilClose,
    /// Framing lost: skip until a segment starts like a message.
    Desync,
}

/// When a segment's syscall returned (`ktime`: what spans are timed by)
/// and when its bytes were on their way (`sent`: what pairing compares
/// across directions, see [`crate::capture::event::sent_at`]).
#[derive(Debug, Clone, Copy, Default)]
struct Stamp {
    ktime: u64,
    sent: u64,
}

#[derive(Debug)]
struct Segment {
    data: bytes::Bytes,
    pos: usize,
    /// Bytes the syscall moved beyond what was captured.
    missing: u64,
    at: Stamp,
    /// The segment before this one ended inside a token: if this one looks
    /// like a request it may continue a method name, so it cannot be
    /// trusted to begin a message after framing was lost (responses start
    /// with `HTTP/`, which no tail of a method is).
    after_open_token: bool,
}

/// Parser state for one direction of one connection.
#[derive(Debug)]
pub struct HttpStream {
    flow: Option<Flow>,
    state: State,
    head: Vec<u8>,
    /// When the first bytes of the head being buffered were on their way.
    head_sent: u64,
    /// The head being buffered began at a segment's first byte.
    head_at_start: bool,
    /// A message is open (head returned, end not yet).
    open: bool,
    /// The last segment whose bytes went to a message.
    last: Stamp,
    /// The head just returned has no body: `End` is due next.
    end_due: bool,
    /// A `Gap` at this time is due after the item just returned.
    gap_due: Option<u64>,
    segments: VecDeque<Segment>,
    /// The last segment pushed ended inside a token.
    open_token: bool,
    kept: KeptHeaders,
}

impl Default for HttpStream {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpStream {
    pub fn new() -> Self {
        Self::keeping(KeptHeaders::all())
    }

    /// A stream whose heads keep only the `kept` header fields.
    pub fn keeping(kept: KeptHeaders) -> Self {
        Self {
            flow: None,
            state: State::Start,
            head: Vec::new(),
            head_sent: 0,
            head_at_start: false,
            open: false,
            last: Stamp::default(),
            end_due: false,
            gap_due: None,
            segments: VecDeque::new(),
            open_token: false,
            kept,
        }
    }

    /// When the bytes of the last segment that went to a message were on
    /// their way.
    pub fn last_sent(&self) -> u64 {
        self.last.sent
    }

    /// Requests or responses, once the first message was seen.
    pub fn flow(&self) -> Option<Flow> {
        self.flow
    }

    /// Queues the bytes of one syscall: `data` was captured, `missing` more
    /// bytes were moved but not captured.
    pub fn push(&mut self, data: bytes::Bytes, missing: u64, ktime_ns: u64) {
        self.push_sent(data, missing, ktime_ns, ktime_ns);
    }

    /// [`Self::push`] of bytes that were on their way at `sent_ns`, before
    /// their syscall returned at `ktime_ns`: heads and gaps are dated by
    /// `sent_ns`, ends by `ktime_ns`.
    pub fn push_sent(&mut self, data: bytes::Bytes, missing: u64, ktime_ns: u64, sent_ns: u64) {
        let after_open_token = self.open_token;
        // Past missing bytes the syscall's end is a write boundary; apps
        // write whole messages far more often than method fragments.
        self.open_token = missing == 0 && data.last().is_some_and(|&b| head::is_tchar(b));
        self.segments.push_back(Segment {
            after_open_token,
            data,
            pos: 0,
            missing,
            at: Stamp {
                ktime: ktime_ns,
                sent: sent_ns,
            },
        });
    }

    /// Approximate heap bytes held (buffered segments and header buffer).
    pub fn state_bytes(&self) -> usize {
        let queued: usize = self.segments.iter().map(|s| s.data.len()).sum();
        queued + self.head.capacity() + self.segments.capacity() * std::mem::size_of::<Segment>()
    }

    /// Ends the open message now (its peer has evidently moved on) and
    /// resumes at the next segment that starts like a message.
    pub fn force_end(&mut self) -> Option<Item> {
        self.head.clear();
        self.end_due = false;
        self.gap_due = None;
        self.state = State::Desync;
        std::mem::replace(&mut self.open, false).then_some(Item::End {
            ktime_ns: self.last.ktime,
        })
    }

    /// Framing is lost: segments are skipped until one starts like a
    /// message (skipped bytes yield no item).
    pub fn desynced(&self) -> bool {
        matches!(self.state, State::Desync)
    }

    /// The connection closed: ends a message delimited by close.
    pub fn close(&mut self) -> Option<Item> {
        self.segments.clear();
        self.head.clear();
        self.gap_due = None;
        let was_open = std::mem::replace(&mut self.open, false);
        self.end_due = false;
        self.state = State::Start;
        was_open.then_some(Item::End {
            ktime_ns: self.last.ktime,
        })
    }

    /// Tells the stream that the message whose head was just returned has
    /// no body whatever its headers say (a response to HEAD, 1xx, 204, 304).
    pub fn expect_no_body(&mut self) {
        if self.open && !matches!(self.state, State::Desync) {
            self.state = State::Start;
            self.end_due = true;
        }
    }

    /// Stops parsing for good (after `101 Switching Protocols`).
    pub fn abandon(&mut self) {
        self.segments.clear();
        self.head = Vec::new();
        self.open = false;
        self.end_due = false;
        self.gap_due = None;
        self.state = State::Desync;
        self.flow = None;
    }

    /// Next parsed item, or None when more bytes are needed.
    pub fn next_item(&mut self) -> Option<Item> {
        loop {
            if self.end_due {
                self.end_due = false;
                self.open = false;
                return Some(Item::End {
                    ktime_ns: self.last.ktime,
                });
            }
            if let Some(sent_ns) = self.gap_due.take() {
                return Some(Item::Gap { sent_ns });
            }
            let seg = self.segments.front_mut()?;
            if seg.pos >= seg.data.len() && seg.missing == 0 {
                self.segments.pop_front();
                continue;
            }
            if let Some(item) = self.step() {
                return Some(item);
            }
        }
    }

    /// Advances the state machine on the front segment; may return an item.
    fn step(&mut self) -> Option<Item> {
        let seg = self.segments.front_mut()?;
        let at = seg.at;
        match &mut self.state {
            State::Start => self.step_start(),
            State::Body { remaining } => {
                let avail = (seg.data.len() - seg.pos) as u64;
                let take = avail.min(*remaining);
                seg.pos += take as usize;
                *remaining -= take;
                if *remaining > 0 && seg.pos == seg.data.len() {
                    let gap = seg.missing.min(*remaining);
                    seg.missing -= gap;
                    *remaining -= gap;
                }
                self.last = at;
                if *remaining == 0 {
                    return Some(self.finish_message());
                }
                None
            }
            State::Chunked(chunked) => {
                let data = &seg.data[seg.pos..];
                let (used, step) = if data.is_empty() {
                    let (skipped, step) = chunked.skip(seg.missing);
                    seg.missing -= skipped;
                    (0, step)
                } else {
                    chunked.feed(data)
                };
                seg.pos += used;
                self.last = at;
                match step {
                    ChunkStep::More => None,
                    ChunkStep::Done => Some(self.finish_message()),
                    ChunkStep::Lost => {
                        self.state = State::Desync;
                        Some(Item::Malformed("chunked framing lost"))
                    }
                }
            }
            State::UntilClose => {
                seg.pos = seg.data.len();
                seg.missing = 0;
                self.last = at;
                None
            }
            State::Desync => {
                // `PU` then `T / HTTP/1.1` is one PUT, never a `T`.
                let maybe_method_tail = seg.after_open_token && !seg.data.starts_with(b"HTTP/");
                let starts_message = seg.pos == 0 && !maybe_method_tail && head::starts_message(&seg.data, self.flow);
                if starts_message {
                    self.state = State::Start;
                    if self.open {
                        self.open = false;
                        return Some(Item::End {
                            ktime_ns: self.last.ktime,
                        });
                    }
                    return None;
                }
                seg.pos = seg.data.len();
                seg.missing = 0;
                if self.open {
                    self.last = at;
                }
                None
            }
        }
    }

    fn step_start(&mut self) -> Option<Item> {
        let seg = self.segments.front_mut()?;
        if self.head.is_empty() {
            self.head_at_start = seg.pos == 0;
            // Tolerate stray CRLFs between messages (RFC 9112 section 2.2).
            while seg.pos < seg.data.len() && matches!(seg.data[seg.pos], b'\r' | b'\n') {
                seg.pos += 1;
            }
            if seg.pos == seg.data.len() {
                if seg.missing > 0 {
                    // A message boundary fell in bytes we never saw.
                    seg.missing = 0;
                    self.state = State::Desync;
                    return Some(Item::Gap { sent_ns: seg.at.sent });
                }
                return None;
            }
            self.head_sent = seg.at.sent;
        }
        let old_len = self.head.len();
        let room = MAX_HEAD_BYTES.saturating_sub(old_len);
        let chunk = &seg.data[seg.pos..];
        if old_len == 0 {
            // The usual case, a whole head in one syscall: parsed where it
            // lies, not copied into the header buffer first, and in the
            // same pass that finds its end.
            let data = &chunk[..chunk.len().min(room)];
            if let Some((parsed, head_len)) = head::parse_leading(data, self.flow, &self.kept) {
                seg.pos += head_len;
                let at = seg.at;
                return Some(self.parsed(parsed, false, true, at));
            }
            if let Some(head_len) = find_head_end(data) {
                // Lent out while parsing and put back (a clone would take
                // and give back a reference on the capture arena's shared
                // count, a cache line the capture thread writes).
                let data = std::mem::take(&mut seg.data);
                let start = seg.pos;
                seg.pos += head_len;
                let at = seg.at;
                let item = self.parse_block(&data[start..start + head_len], false, true, at);
                // Parsing touches no segment: the one lent from is still first.
                let seg = self.segments.front_mut();
                debug_assert!(seg.is_some(), "the segment lent from is gone");
                if let Some(seg) = seg {
                    seg.data = data;
                }
                return Some(item);
            }
        }
        let take = chunk.len().min(room);
        self.head.extend_from_slice(&chunk[..take]);
        let search_from = old_len.saturating_sub(3);
        if let Some(end) = find_head_end(&self.head[search_from..]) {
            let head_len = search_from + end;
            let unused = self.head.len() - head_len;
            seg.pos += take - unused;
            self.head.truncate(head_len);
            let at = seg.at;
            return Some(self.parse_head(false, at));
        }
        seg.pos += take;
        let overflow = take < chunk.len();
        if seg.missing > 0 || overflow {
            // The header block continues in bytes we never saw.
            seg.missing = 0;
            seg.pos = seg.data.len();
            let at = seg.at;
            return Some(self.parse_head(true, at));
        }
        None
    }

    /// Parses the buffered header block; `truncated` means its end was lost.
    fn parse_head(&mut self, truncated: bool, at: Stamp) -> Item {
        // Parse in place and keep the buffer's capacity for the next message.
        let head = std::mem::take(&mut self.head);
        let item = self.parse_block(&head, truncated, false, at);
        self.head = head;
        self.head.clear();
        if self.head.capacity() > KEEP_HEAD_CAPACITY {
            self.head.shrink_to(KEEP_HEAD_CAPACITY);
        }
        item
    }

    /// Parses one header block and moves to the state its framing says.
    fn parse_block(&mut self, block: &[u8], truncated: bool, whole: bool, at: Stamp) -> Item {
        let parsed = head::parse(block, truncated, self.flow, &self.kept);
        self.parsed(parsed, truncated, whole, at)
    }

    /// Moves to the state a parsed header block's framing says.
    fn parsed(&mut self, parsed: Result<Head, &'static str>, truncated: bool, whole: bool, at: Stamp) -> Item {
        self.last = at;
        match parsed {
            Ok(mut h) => {
                h.start_ktime_ns = self.head_sent;
                h.at_segment_start = self.head_at_start;
                h.in_one_segment = whole;
                self.flow = Some(h.flow());
                self.open = true;
                self.state = if truncated {
                    // The rest of this head, its body and maybe more
                    // messages were in the bytes not captured. The gap
                    // is dated at the head's start: the head itself was
                    // seen (cut), only what follows it may be lost.
                    self.gap_due = Some(self.head_sent);
                    State::Desync
                } else {
                    match h.framing() {
                        head::Framing::None => {
                            self.end_due = true;
                            State::Start
                        }
                        head::Framing::Length(n) => State::Body { remaining: n },
                        head::Framing::Chunked => State::Chunked(Chunked::default()),
                        head::Framing::UntilClose => State::UntilClose,
                    }
                };
                Item::Head(h)
            }
            Err(_) if truncated => {
                self.state = State::Desync;
                Item::Gap { sent_ns: at.sent }
            }
            Err(reason) => {
                self.state = State::Desync;
                Item::Malformed(reason)
            }
        }
    }

    fn finish_message(&mut self) -> Item {
        self.state = State::Start;
        self.open = false;
        Item::End {
            ktime_ns: self.last.ktime,
        }
    }
}

/// Position just past the blank line ending a header block.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    // Built once: `memmem::find` builds a searcher on every call.
    static BLANK_LINE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    BLANK_LINE.find(buf).map(|p| p + 4)
}

#[cfg(test)]
mod tests;
