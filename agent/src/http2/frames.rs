//! HTTP/2 framing of one direction of a connection (RFC 9113 section 4).
//!
//! Fed one syscall at a time (a captured prefix plus a count of bytes not
//! captured), it yields the frames the correlator needs: header blocks
//! (HEADERS + CONTINUATION, decoded with this direction's HPACK table),
//! END_STREAM on DATA, RST_STREAM and GOAWAY. DATA payloads are skipped,
//! so bytes the kernel did not capture inside them cost nothing. When a
//! frame header falls in bytes not captured, framing is lost: the stream
//! waits for a syscall that starts with a plausible frame header, and the
//! HPACK table is emptied (a header block may have been in the gap).
use super::hpack::{Block, Decoder};

/// The client connection preface (RFC 9113 section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const HEADER: usize = 9;
/// Largest header block (HEADERS + CONTINUATIONs) assembled; a bigger one
/// is skipped, counted, and empties the HPACK table.
pub const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// Largest frame accepted when looking for framing again (the protocol's
/// maximum is 2^24-1, real peers use 16 KiB to 1 MiB).
const MAX_PLAUSIBLE_FRAME: u32 = 1 << 20;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What one direction yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete header block on `stream`; `block` is None when it could
    /// not be decoded (too big, malformed).
    Headers {
        stream: u32,
        block: Option<Block>,
        end_stream: bool,
        ktime_ns: u64,
    },
    /// A DATA frame that ends its stream.
    DataEnd {
        stream: u32,
        ktime_ns: u64,
    },
    Reset {
        stream: u32,
        code: u32,
        ktime_ns: u64,
    },
    GoAway {
        last_stream: u32,
        code: u32,
        ktime_ns: u64,
    },
    /// Framing was lost at `ktime_ns` (bytes not captured, or garbage).
    Lost {
        ktime_ns: u64,
    },
}

/// Counts of what could not be read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub malformed: u64,
    /// Header blocks or fields not kept because of the HPACK limits.
    pub limited: u64,
}

#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; HEADER] = b.get(..HEADER)?.try_into().ok()?;
        Some(Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    /// Could this be where a frame starts (after framing was lost)?
    fn plausible(&self) -> bool {
        let needs_stream = matches!(self.kind, DATA | HEADERS | RST_STREAM | CONTINUATION | 2);
        let connection_only = matches!(self.kind, 4 | 6 | GOAWAY);
        self.kind <= CONTINUATION
            && self.len <= MAX_PLAUSIBLE_FRAME
            && (!needs_stream || self.stream != 0)
            && (!connection_only || self.stream == 0)
    }
}

#[derive(Debug)]
enum State {
    /// The preface may come first (client side, start of the connection).
    Preface,
    /// Collecting a frame header in `buf`.
    Header,
    /// Collecting the payload of `frame` in `buf`.
    Payload(FrameHeader),
    /// Skipping `left` payload bytes (DATA and frames not needed).
    Skip { left: u64 },
    /// Framing lost: waiting for a syscall that starts with a frame.
    Lost,
}

/// A header block waiting for its CONTINUATION frames.
#[derive(Debug)]
struct Pending {
    stream: u32,
    end_stream: bool,
    /// PUSH_PROMISE blocks are decoded (they change the table) but not yielded.
    promise: bool,
    bytes: Vec<u8>,
    too_big: bool,
    ktime_ns: u64,
}

/// Framing state of one direction.
#[derive(Debug)]
pub struct FrameStream {
    state: State,
    buf: Vec<u8>,
    /// Time of the syscall that carried the current frame's first byte.
    frame_ktime: u64,
    pending: Option<Pending>,
    /// GOAWAY debug data still to skip once its first 8 bytes are read.
    after_goaway: u64,
    hpack: Decoder,
    pub faults: Faults,
}

impl FrameStream {
    /// `preface`: the client's preface may lead this direction.
    pub fn new(preface: bool) -> Self {
        Self {
            state: if preface { State::Preface } else { State::Header },
            buf: Vec::new(),
            frame_ktime: 0,
            pending: None,
            after_goaway: 0,
            hpack: Decoder::new(),
            faults: Faults::default(),
        }
    }

    /// A stream whose start was not seen: frames are looked for at the
    /// next syscall start, and the HPACK table starts empty.
    pub fn mid_connection() -> Self {
        let mut s = Self::new(false);
        s.state = State::Lost;
        s
    }

    /// Approximate heap bytes held.
    pub fn state_bytes(&self) -> usize {
        self.buf.capacity() + self.pending.as_ref().map_or(0, |p| p.bytes.capacity()) + self.hpack.state_bytes()
    }

    /// Framing is lost (events of this connection were lost).
    pub fn lose(&mut self) {
        self.enter_lost();
    }

    /// Parses one syscall's bytes: `data` captured, `missing` more moved.
    pub fn push(&mut self, data: &[u8], missing: u64, ktime_ns: u64, out: &mut Vec<Frame>) {
        let mut data = data;
        if matches!(self.state, State::Lost) {
            match FrameHeader::parse(data) {
                Some(h) if h.plausible() && h.kind != CONTINUATION => self.state = State::Header,
                _ => return,
            }
        }
        while !data.is_empty() {
            self.step(&mut data, ktime_ns, out);
            if matches!(self.state, State::Lost) {
                return;
            }
        }
        if missing > 0 {
            self.skip_missing(missing, ktime_ns, out);
        }
    }

    /// Bytes not captured: fine inside a skipped payload, else framing is lost.
    fn skip_missing(&mut self, missing: u64, ktime_ns: u64, out: &mut Vec<Frame>) {
        if let State::Skip { left } = &mut self.state {
            if missing <= *left {
                *left -= missing;
                if *left == 0 {
                    self.state = State::Header;
                }
                return;
            }
        }
        self.enter_lost();
        out.push(Frame::Lost { ktime_ns });
    }

    fn enter_lost(&mut self) {
        self.state = State::Lost;
        self.buf.clear();
        self.pending = None;
        self.hpack.lose_sync();
    }

    fn step(&mut self, data: &mut &[u8], ktime_ns: u64, out: &mut Vec<Frame>) {
        match self.state {
            State::Preface => {
                let want = PREFACE.len() - self.buf.len();
                let take = want.min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                if !PREFACE.starts_with(&self.buf) {
                    // No preface: these are frames already (server side).
                    let seen = std::mem::take(&mut self.buf);
                    self.state = State::Header;
                    let mut seen_slice = &seen[..seen.len() - take];
                    while !seen_slice.is_empty() && !matches!(self.state, State::Lost) {
                        self.step(&mut seen_slice, ktime_ns, out);
                    }
                    return;
                }
                *data = &data[take..];
                if self.buf.len() == PREFACE.len() {
                    self.buf.clear();
                    self.state = State::Header;
                }
            }
            State::Header => {
                if self.buf.is_empty() {
                    self.frame_ktime = ktime_ns;
                }
                let take = (HEADER - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                *data = &data[take..];
                if let Some(h) = FrameHeader::parse(&self.buf) {
                    self.buf.clear();
                    self.header(h, out);
                }
            }
            State::Payload(h) => {
                let take = (h.len as usize - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                *data = &data[take..];
                if self.buf.len() == h.len as usize {
                    let payload = std::mem::take(&mut self.buf);
                    self.state = State::Header;
                    self.frame(h, &payload, out);
                    self.buf = payload;
                    self.buf.clear();
                    if self.buf.capacity() > 16 * 1024 {
                        self.buf = Vec::new();
                    }
                }
            }
            State::Skip { left } => {
                let take = (left.min(data.len() as u64)) as usize;
                *data = &data[take..];
                let left = left - take as u64;
                self.state = if left == 0 { State::Header } else { State::Skip { left } };
            }
            State::Lost => *data = &[],
        }
    }

    /// A frame header was read: decide whether its payload is needed.
    fn header(&mut self, h: FrameHeader, out: &mut Vec<Frame>) {
        let expecting_continuation = self.pending.is_some();
        if expecting_continuation != (h.kind == CONTINUATION) || !h.plausible() {
            // A header block interrupted, a stray CONTINUATION, or garbage.
            self.faults.malformed += 1;
            self.enter_lost();
            out.push(Frame::Lost {
                ktime_ns: self.frame_ktime,
            });
            return;
        }
        let needed = matches!(h.kind, HEADERS | CONTINUATION | PUSH_PROMISE | RST_STREAM | GOAWAY);
        if h.kind == DATA && h.flags & END_STREAM != 0 {
            out.push(Frame::DataEnd {
                stream: h.stream,
                ktime_ns: self.frame_ktime,
            });
        }
        if needed && (h.kind != GOAWAY || h.len >= 8) {
            // GOAWAY debug data is not needed: keep the first 8 bytes only.
            let h = if h.kind == GOAWAY {
                self.after_goaway = u64::from(h.len - 8);
                FrameHeader { len: 8, ..h }
            } else {
                h
            };
            self.state = State::Payload(h);
            if h.len == 0 {
                self.state = State::Header;
                self.frame(h, &[], out);
            }
        } else if h.len > 0 {
            self.state = State::Skip { left: u64::from(h.len) };
        }
    }

    /// A needed frame's payload is complete.
    fn frame(&mut self, h: FrameHeader, payload: &[u8], out: &mut Vec<Frame>) {
        let ktime_ns = self.frame_ktime;
        match h.kind {
            RST_STREAM => match payload.get(..4) {
                Some(code) => out.push(Frame::Reset {
                    stream: h.stream,
                    code: u32::from_be_bytes([code[0], code[1], code[2], code[3]]),
                    ktime_ns,
                }),
                None => self.faults.malformed += 1,
            },
            GOAWAY => {
                if let Some(b) = payload.get(..8) {
                    out.push(Frame::GoAway {
                        last_stream: u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff,
                        code: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                        ktime_ns,
                    });
                }
                let rest = std::mem::take(&mut self.after_goaway);
                if rest > 0 {
                    self.state = State::Skip { left: rest };
                }
            }
            HEADERS | PUSH_PROMISE => {
                let Some(fragment) = fragment(h, payload) else {
                    self.faults.malformed += 1;
                    // The table may have changed in what we cannot read.
                    self.hpack.lose_sync();
                    return;
                };
                let pending = Pending {
                    stream: h.stream,
                    end_stream: h.kind == HEADERS && h.flags & END_STREAM != 0,
                    promise: h.kind == PUSH_PROMISE,
                    bytes: Vec::new(),
                    too_big: false,
                    ktime_ns,
                };
                self.pending = Some(pending);
                self.append(fragment, h.flags & END_HEADERS != 0, out);
            }
            CONTINUATION => self.append(payload, h.flags & END_HEADERS != 0, out),
            _ => {}
        }
    }

    fn append(&mut self, fragment: &[u8], end: bool, out: &mut Vec<Frame>) {
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        if p.bytes.len() + fragment.len() > MAX_BLOCK_BYTES {
            p.too_big = true;
            p.bytes = Vec::new();
        }
        if !p.too_big {
            p.bytes.extend_from_slice(fragment);
        }
        if !end {
            return;
        }
        let Some(p) = self.pending.take() else {
            return;
        };
        let block = if p.too_big {
            self.faults.limited += 1;
            self.hpack.lose_sync();
            None
        } else {
            match self.hpack.decode(&p.bytes) {
                Ok(block) => {
                    self.faults.limited += u64::from(block.limited);
                    Some(block)
                }
                Err(_) => {
                    self.faults.malformed += 1;
                    self.hpack.lose_sync();
                    None
                }
            }
        };
        if !p.promise {
            out.push(Frame::Headers {
                stream: p.stream,
                block,
                end_stream: p.end_stream,
                ktime_ns: p.ktime_ns,
            });
        }
    }
}

/// The header block fragment of a HEADERS or PUSH_PROMISE payload (without
/// padding, priority or promised stream id).
fn fragment(h: FrameHeader, payload: &[u8]) -> Option<&[u8]> {
    let mut start = 0usize;
    let mut pad = 0usize;
    if h.flags & PADDED != 0 {
        pad = usize::from(*payload.first()?);
        start += 1;
    }
    if h.kind == HEADERS && h.flags & PRIORITY != 0 {
        start += 5;
    }
    if h.kind == PUSH_PROMISE {
        start += 4;
    }
    let end = payload.len().checked_sub(pad)?;
    payload.get(start..end)
}

#[cfg(test)]
mod tests;
