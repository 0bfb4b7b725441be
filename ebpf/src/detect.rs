//! HTTP/1.x detection by grammar on the first bytes of a stream, and the
//! per-fd look-ahead that lets a request written a byte at a time be seen.
//!
//! A request starts with an RFC 9110 method token, a space and the first
//! byte of a request-target ('/', '*', or an alphanumeric or '[' for the
//! absolute and authority forms); a response starts with "HTTP/1.". Up to
//! four leading CR/LF bytes are tolerated (RFC 9112 §2.2). Userspace parses
//! fully; this only keeps the kernel from following streams that are
//! certainly not HTTP. The HTTP/2 client preface ("PRI * HTTP/2.0") passes
//! as a request line; [`is_h2_preface`] marks such connections so their
//! frames are captured past the first MAX_CAPTURE bytes of a syscall, and
//! [`is_h2_headers`] finds HTTP/2 connections that were open before.
use aya_ebpf::helpers::generated;

/// Bytes of a stream the detector looks at (and the look-ahead holds).
pub const WINDOW: usize = 16;
/// Leading CR/LF bytes tolerated before a request line.
const MAX_LEADING_CRLF: usize = 4;

/// What the first bytes of a stream say.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Http {
    Request,
    Response,
    /// The bytes so far are a prefix of a request or response line.
    NeedMore,
    No,
}

impl Http {
    pub fn maybe(self) -> bool {
        self != Http::No
    }
}

/// Byte classes, looked up in one table: branching on every token
/// character would multiply the verifier's paths per byte.
const TOKEN: u8 = 1;
const SPACE: u8 = 2;
const CRLF: u8 = 4;
/// May start a request-target ('/', '*', '[', alphanumeric).
const TARGET: u8 = 8;

const fn byte_classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        let alnum = b.is_ascii_alphanumeric();
        if alnum
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            )
        {
            t[c] |= TOKEN;
        }
        if alnum || matches!(b, b'/' | b'*' | b'[') {
            t[c] |= TARGET;
        }
        if b == b' ' {
            t[c] |= SPACE;
        }
        if b == b'\r' || b == b'\n' {
            t[c] |= CRLF;
        }
        c += 1;
    }
    t
}

static CLASSES: [u8; 256] = byte_classes();

/// `b[i]` without a bounds-check panic path (the verifier rejects those):
/// every caller already keeps `i < WINDOW`.
#[inline(always)]
fn at(b: &[u8; WINDOW], i: usize) -> u8 {
    b[i & (WINDOW - 1)]
}

#[inline(always)]
fn class(c: u8) -> u8 {
    // SAFETY: u8 indexes a 256-entry table; volatile keeps it a load.
    unsafe { core::ptr::read_volatile(CLASSES.as_ptr().add(c as usize)) }
}

/// Classifies the first `n` valid bytes of `b`. (Not inlined: verified
/// once per caller rather than once per inlined copy.)
#[inline(never)]
pub fn classify(b: &[u8; WINDOW], n: usize) -> Http {
    let n = if n > WINDOW { WINDOW } else { n };
    let mut s = 0;
    for _ in 0..MAX_LEADING_CRLF {
        if s < n && class(at(b, s)) & CRLF != 0 {
            s += 1;
        }
    }
    if s >= n {
        return if s < MAX_LEADING_CRLF { Http::NeedMore } else { Http::No };
    }
    match response_prefix(b, s, n) {
        Http::No => {}
        other => return other,
    }
    // The method token, then one space, then the start of the target.
    let mut i = s;
    for _ in 0..WINDOW {
        if i >= n {
            return Http::NeedMore;
        }
        let k = class(at(b, i));
        if k & TOKEN == 0 {
            if k & SPACE == 0 || i == s {
                return Http::No;
            }
            let t = i + 1;
            if t >= n {
                return if t < WINDOW { Http::NeedMore } else { Http::No };
            }
            return if class(at(b, t)) & TARGET != 0 {
                Http::Request
            } else {
                Http::No
            };
        }
        i += 1;
    }
    Http::No
}

/// The first WINDOW bytes of the HTTP/2 client connection preface.
const H2_PREFACE: [u8; WINDOW] = *b"PRI * HTTP/2.0\r\n";

/// True when the stream's first `n` bytes begin the HTTP/2 preface.
#[inline(always)]
pub fn is_h2_preface(b: &[u8; WINDOW], n: usize) -> bool {
    n >= WINDOW && *b == H2_PREFACE
}

/// True when the bytes begin an HTTP/2 HEADERS frame (a whole header
/// block: END_HEADERS set; only defined flags; a client-initiated stream;
/// a length within the default maximum frame size). This is how a
/// connection opened before the agent started (its preface long gone) is
/// recognised: a new request's HEADERS usually starts a write. Random or
/// TLS bytes match with odds of about one in 10^9 per syscall, and
/// userspace still has to decode the block.
#[inline(always)]
pub fn is_h2_headers(b: &[u8; WINDOW], n: usize) -> bool {
    const END_HEADERS: u8 = 0x4;
    const DEFINED: u8 = 0x1 | END_HEADERS | 0x8 | 0x20;
    let len = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
    n >= 10
        && b[3] == 1
        && b[4] & END_HEADERS != 0
        && b[4] & !DEFINED == 0
        && b[5] & 0x80 == 0
        && b[8] & 1 == 1
        && len > 0
        && len <= 16384
}

/// "HTTP/1." at `s`: Response; a proper prefix of it: NeedMore.
#[inline(always)]
fn response_prefix(b: &[u8; WINDOW], s: usize, n: usize) -> Http {
    const STATUS: [u8; 7] = *b"HTTP/1.";
    let mut matched = 0;
    for j in 0..STATUS.len() {
        let i = s + j;
        if i >= n || at(b, i) != STATUS[j] {
            break;
        }
        matched += 1;
    }
    if matched == STATUS.len() {
        Http::Response
    } else if matched > 4 && s + matched >= n {
        // "HTTP/" so far; "HTTP" alone could still be a method.
        Http::NeedMore
    } else {
        Http::No
    }
}

/// Reads up to `room` (<= WINDOW) bytes at user address `src`, of which
/// `avail` are valid, to `dst`, which must have WINDOW bytes of room;
/// returns how many were read.
#[inline(always)]
pub fn read_head(dst: *mut u8, room: usize, src: u64, avail: u64) -> usize {
    let room = if room > WINDOW { WINDOW } else { room };
    let n = if avail > room as u64 { room } else { avail as usize };
    let len = (n & (WINDOW * 2 - 1)) as u32;
    if len == 0 || len > WINDOW as u32 {
        return 0;
    }
    // SAFETY: dst has room for WINDOW bytes and len <= WINDOW.
    let ret = unsafe { generated::bpf_probe_read_user(dst.cast(), len, src as *const _) };
    if ret == 0 { len as usize } else { 0 }
}
