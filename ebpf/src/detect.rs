//! HTTP/1.x detection by grammar on the first bytes of a stream, and the
//! per-fd look-ahead that lets a request written a byte at a time be seen.
//!
//! A request starts with an RFC 9110 method token, a space and the first
//! byte of a request-target ('/', '*', or an alphanumeric or '[' for the
//! absolute and authority forms); a response starts with "HTTP/1.". Up to
//! four leading CR/LF bytes are tolerated (RFC 9112 §2.2). Userspace parses
//! fully; this only keeps the kernel from following streams that are
//! certainly not HTTP. (The HTTP/2 preface is left out until userspace
//! parses HTTP/2: following it would only cost.)
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

#[inline(always)]
fn tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
        )
}

#[inline(always)]
fn target_start(c: u8) -> bool {
    c == b'/' || c == b'*' || c == b'[' || c.is_ascii_alphanumeric()
}

/// Classifies the first `n` valid bytes of `b`.
#[inline(always)]
pub fn classify(b: &[u8; WINDOW], n: usize) -> Http {
    let mut s = 0;
    while s < MAX_LEADING_CRLF && s < n && (b[s] == b'\r' || b[s] == b'\n') {
        s += 1;
    }
    if s >= n {
        return if s < MAX_LEADING_CRLF { Http::NeedMore } else { Http::No };
    }
    if b[s] == b'\r' || b[s] == b'\n' {
        return Http::No;
    }
    match response_prefix(b, s, n) {
        Http::No => {}
        other => return other,
    }
    // The method token, then one space, then the start of the target.
    let mut i = s;
    while i < WINDOW {
        if i >= n {
            return Http::NeedMore;
        }
        let c = b[i];
        if c == b' ' {
            if i == s {
                return Http::No;
            }
            let t = i + 1;
            if t >= n || t >= WINDOW {
                return if t < WINDOW { Http::NeedMore } else { Http::No };
            }
            return if target_start(b[t]) { Http::Request } else { Http::No };
        }
        if !tchar(c) {
            return Http::No;
        }
        i += 1;
    }
    Http::No
}

/// "HTTP/1." at `s`: Response; a proper prefix of it: NeedMore.
#[inline(always)]
fn response_prefix(b: &[u8; WINDOW], s: usize, n: usize) -> Http {
    const STATUS: &[u8; 7] = b"HTTP/1.";
    for (j, want) in STATUS.iter().enumerate() {
        let i = s + j;
        if i >= n || i >= WINDOW {
            // Every byte seen matched; "HTTP" alone could still be a method.
            return if j <= 4 { Http::No } else { Http::NeedMore };
        }
        if b[i] != *want {
            return Http::No;
        }
    }
    Http::Response
}

/// Reads up to WINDOW bytes at user address `src`; returns how many.
#[inline(always)]
pub fn read_head(dst: &mut [u8; WINDOW], src: u64, avail: u64) -> usize {
    let n = if avail > WINDOW as u64 {
        WINDOW
    } else {
        avail as usize
    };
    let len = (n & (WINDOW * 2 - 1)) as u32;
    if len == 0 || len > WINDOW as u32 {
        return 0;
    }
    // SAFETY: dst has room for WINDOW bytes and len <= WINDOW.
    let ret = unsafe { generated::bpf_probe_read_user(dst.as_mut_ptr().cast(), len, src as *const _) };
    if ret == 0 { n } else { 0 }
}

/// `held` (the look-ahead, `held_len` bytes) followed by `cur` (`cur_len`
/// bytes), cut to WINDOW; returns the combined length.
#[inline(always)]
pub fn join(held: &[u8; WINDOW], held_len: usize, cur: &[u8; WINDOW], cur_len: usize, out: &mut [u8; WINDOW]) -> usize {
    let held_len = if held_len > WINDOW { WINDOW } else { held_len };
    for j in 0..WINDOW {
        out[j] = if j < held_len {
            held[j]
        } else {
            cur[(j - held_len) & (WINDOW - 1)]
        };
    }
    let total = held_len + cur_len;
    if total > WINDOW { WINDOW } else { total }
}
