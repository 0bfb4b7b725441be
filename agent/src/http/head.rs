//! Parsing one HTTP/1.x header block with `httparse`.
use smallvec::SmallVec;

use super::{
    memo,
    names::{looked_up, looked_up_any_case, LOOKED_UP},
    pool, Flow, Method,
};

/// Headers kept per message; a head with more has a nonzero
/// `Head::headers_dropped` (1: httparse stops at the limit, so how many
/// more is not known).
pub const MAX_HEADERS: usize = 64;
// `finish` marks the fields it keeps in one u64.
const _: () = assert!(MAX_HEADERS <= 64);
/// Longest header value kept (longer values are cut).
const MAX_VALUE: usize = 1024;
/// Longest request-target kept (exporters cut `url.path` shorter still);
/// bounds what each pending request holds.
pub const MAX_TARGET: usize = 8 * 1024;
/// Header bytes (names + values) kept per message beyond the headers that
/// framing and trace context need, which are always kept.
const MAX_KEPT_HEADER_BYTES: usize = 8 * 1024;
/// Headers framing and trace context need: never dropped for space (the
/// first names of [`LOOKED_UP`]).
const ESSENTIAL: &[&str] = LOOKED_UP.split_at(7).0;
/// Longest method token kept; RFC 9110 sets no limit, real methods are short.
const MAX_METHOD: usize = 64;

/// A request line or a status line (a request's target is the start of
/// [`Head::headers`]' buffer, see [`Head::target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadKind {
    Request { method: Method },
    Response { status: u16 },
}

/// A parsed message head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub kind: HeadKind,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names lower-cased, in order (after a request's target).
    pub headers: Headers,
    pub headers_dropped: usize,
    /// The header block was not seen to its end.
    pub truncated: bool,
    /// When the first byte was on its way: the syscall's return for bytes
    /// read, its start for bytes written (`crate::capture::event::sent_at`).
    pub start_ktime_ns: u64,
    /// The head began at the first byte of a syscall's payload (where the
    /// kernel decides a request's trace context).
    pub at_segment_start: bool,
    /// The whole head came in one syscall's bytes: nothing the other way
    /// can have come between its parts.
    pub in_one_segment: bool,
}

/// A request's target and the header fields of one message, in order, in
/// one buffer (target, then names and values back to back). The buffer
/// comes from and goes back to the thread's [`pool`]: a head costs no
/// allocation once the pool is warm (and its fields fit inline).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Headers {
    text: String,
    /// End of the request target that starts `text` (0 for a response).
    target_end: u32,
    /// (name end, value end) in `text`; a name starts where the previous
    /// field's value ends. Inline up to a typical header count.
    ends: SmallVec<[(u32, u32); 8]>,
    /// Where the first field named `LOOKED_UP[i]` is: 1 + its index (0:
    /// none; `u8::MAX`: too far down to say, found by a scan). The agent's
    /// lookups cost no scan, and most are of headers a message does not
    /// carry (`traceparent`, `b3`, `transfer-encoding`…).
    first: [u8; LOOKED_UP.len()],
}

/// Which header fields an HTTP/1 head keeps: all of them, or only those
/// the agent reads ([`LOOKED_UP`]) and those configured for capture. A
/// head's other fields (`Accept`, `Date`, `Server`, `Cache-Control`…) are
/// parsed over but not copied, lower-cased or checked for UTF-8.
#[derive(Debug, Clone, Default)]
pub struct KeptHeaders {
    /// None: every field is kept. Else the captured names (lower case).
    captured: Option<std::sync::Arc<[String]>>,
}

impl KeptHeaders {
    /// Keeps every field (tests, tools).
    pub fn all() -> Self {
        Self::default()
    }

    /// Keeps the fields the agent reads and `captured` (lower case).
    pub fn used_and(captured: impl IntoIterator<Item = String>) -> Self {
        Self {
            captured: Some(captured.into_iter().collect()),
        }
    }

    /// Whether `other` keeps the same fields: the same rules object (or
    /// both keep every field).
    pub fn same_rules(&self, other: &KeptHeaders) -> bool {
        match (&self.captured, &other.captured) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether a field named `name` (any case) whose index in
    /// [`LOOKED_UP`] is `known` is kept.
    fn keeps(&self, name: &str, known: Option<u32>) -> bool {
        let Some(captured) = &self.captured else {
            return true;
        };
        known.is_some()
            || captured
                .iter()
                .any(|n| n.len() == name.len() && n.eq_ignore_ascii_case(name))
    }
}

impl Headers {
    pub fn with_capacity(fields: usize, bytes: usize) -> Self {
        Self::with_target("", fields, bytes)
    }

    /// Headers after a request target (`target` cut to [`MAX_TARGET`]);
    /// `bytes` is the room for the fields.
    pub fn with_target(target: &str, fields: usize, bytes: usize) -> Self {
        let target = cut(target, MAX_TARGET);
        let mut text = pool::take(target.len() + bytes);
        text.push_str(target);
        Self {
            text,
            target_end: target.len() as u32,
            ends: SmallVec::with_capacity(fields),
            first: [0; LOOKED_UP.len()],
        }
    }

    /// A request's target and its fields (tests, HTTP/2 heads).
    pub fn request<'a>(target: &str, fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut headers = Self::with_target(target, 0, 0);
        for (n, v) in fields {
            headers.push(n, v);
        }
        headers
    }

    /// A copy whose buffer comes from the thread's [`pool`] (the derived
    /// `clone` allocates a new one).
    pub fn pooled_clone(&self) -> Self {
        let mut text = pool::take(self.text.len());
        text.push_str(&self.text);
        Self {
            text,
            target_end: self.target_end,
            ends: self.ends.clone(),
            first: self.first,
        }
    }

    /// Becomes a copy of `other`, in its own buffers.
    fn clone_from_pooled(&mut self, other: &Headers) {
        self.text.clear();
        self.text.push_str(&other.text);
        self.target_end = other.target_end;
        self.ends.clear();
        self.ends.extend_from_slice(&other.ends);
        self.first = other.first;
    }

    /// The request target (empty for a response).
    pub fn target(&self) -> &str {
        &self.text[..self.target_end as usize]
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity()
            + if self.ends.spilled() {
                self.ends.capacity() * 8
            } else {
                0
            }
    }

    /// Appends a field as given (a field past 4 GiB of header text is
    /// dropped: offsets are 32-bit).
    pub fn push(&mut self, name: &str, value: &str) {
        self.push_with(name, value, false);
    }

    /// Appends a field, its name lower-cased.
    pub fn push_lowercase(&mut self, name: &str, value: &str) {
        self.push_with(name, value, true);
    }

    fn push_with(&mut self, name: &str, value: &str, lowercase: bool) {
        // The names looked up are lower case: a lower-cased name matches
        // one exactly when the name as given matches it in any case.
        let index = if lowercase {
            looked_up_any_case(name)
        } else {
            looked_up(name)
        };
        self.push_indexed(name, value, lowercase, index);
    }

    /// Appends a field whose index in [`LOOKED_UP`] is `index`, its name
    /// lower-cased when `lowercase`.
    fn push_indexed(&mut self, name: &str, value: &str, lowercase: bool, index: Option<u32>) {
        // A looked-up name matched in any case is that name in lower case
        // (the same length): copied as such, not lowered byte by byte.
        let (name, lowercase) = match index {
            Some(i) if lowercase => (LOOKED_UP[i as usize], false),
            _ => (name, lowercase),
        };
        let start = self.text.len();
        let (Ok(name_end), Ok(value_end)) = (
            u32::try_from(start + name.len()),
            u32::try_from(start + name.len() + value.len()),
        ) else {
            return;
        };
        self.text.push_str(name);
        if lowercase {
            self.text[start..].make_ascii_lowercase();
        }
        if let Some(first) = index.map(|i| &mut self.first[i as usize]).filter(|f| **f == 0) {
            *first = u8::try_from(self.ends.len() + 1).unwrap_or(u8::MAX);
        }
        self.text.push_str(value);
        self.ends.push((name_end, value_end));
    }

    /// (name, value) of every field, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.spans()
            .map(|(start, name_end, value_end)| (&self.text[start..name_end], &self.text[name_end..value_end]))
    }

    /// (name start, name end, value end) of every field in `text`.
    fn spans(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let starts = std::iter::once(self.target_end as usize).chain(self.ends.iter().map(|&(_, v)| v as usize));
        starts
            .zip(&self.ends)
            .map(|(start, &(name_end, value_end))| (start, name_end as usize, value_end as usize))
    }

    /// First value of a header (exact name).
    pub fn get(&self, name: &str) -> Option<&str> {
        if let Some(i) = looked_up(name) {
            match self.first[i as usize] {
                0 => return None,
                u8::MAX => {}
                at => {
                    let (name_end, value_end) = self.ends[usize::from(at) - 1];
                    return Some(&self.text[name_end as usize..value_end as usize]);
                }
            }
        }
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl Drop for Headers {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.text));
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::default();
        for (n, v) in iter {
            headers.push(n.as_ref(), v.as_ref());
        }
        headers
    }
}

impl From<Vec<(String, String)>> for Headers {
    fn from(v: Vec<(String, String)>) -> Self {
        v.into_iter().collect()
    }
}

/// How the end of a message's body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Head {
    /// A copy whose header buffer comes from the thread's pool.
    pub fn pooled_clone(&self) -> Self {
        Self {
            kind: self.kind.clone(),
            headers: self.headers.pooled_clone(),
            ..*self
        }
    }

    /// Becomes a copy of `other`, reusing its own header buffer.
    pub fn clone_from_pooled(&mut self, other: &Head) {
        let mut headers = std::mem::take(&mut self.headers);
        headers.clone_from_pooled(&other.headers);
        *self = Head {
            kind: other.kind.clone(),
            headers,
            ..*other
        };
    }

    pub fn flow(&self) -> Flow {
        match self.kind {
            HeadKind::Request { .. } => Flow::Requests,
            HeadKind::Response { .. } => Flow::Responses,
        }
    }

    /// First value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    pub fn method(&self) -> Option<&str> {
        match &self.kind {
            HeadKind::Request { method } => Some(method.as_str()),
            HeadKind::Response { .. } => None,
        }
    }

    /// A request's target (path and query, as sent).
    pub fn target(&self) -> Option<&str> {
        match self.kind {
            HeadKind::Request { .. } => Some(self.headers.target()),
            HeadKind::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.kind {
            HeadKind::Response { status } => Some(status),
            HeadKind::Request { .. } => None,
        }
    }

    /// Body framing per RFC 9112 section 6.3 (HEAD/1xx/204/304 are decided by the caller).
    pub fn framing(&self) -> Framing {
        let chunked = self.header("transfer-encoding").is_some_and(|te| {
            te.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        });
        if chunked {
            return Framing::Chunked;
        }
        if let Some(len) = self.header("content-length") {
            return match len.trim().parse::<u64>() {
                Ok(0) => Framing::None,
                Ok(n) => Framing::Length(n),
                Err(_) => Framing::UntilClose,
            };
        }
        match self.kind {
            HeadKind::Request { .. } => Framing::None,
            HeadKind::Response { status } if status < 200 || status == 204 || status == 304 => Framing::None,
            HeadKind::Response { .. } => Framing::UntilClose,
        }
    }
}

/// RFC 9110 `tchar`: the characters of a method token.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// True when `data` begins like a message of `flow` (or of either kind):
/// a status line, or any method token, a space and the start of a
/// request-target (origin, absolute, authority or asterisk form). Empty
/// lines before it are allowed (RFC 9112 section 2.2).
pub fn starts_message(data: &[u8], flow: Option<Flow>) -> bool {
    let skip = data.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let data = &data[skip..];
    let response = data.starts_with(b"HTTP/1.");
    let request = || {
        let Some(sp) = data.iter().take(MAX_METHOD + 1).position(|&b| b == b' ') else {
            return false;
        };
        sp > 0
            && data[..sp].iter().all(|&b| is_tchar(b))
            && data
                .get(sp + 1)
                .is_some_and(|&b| b == b'/' || b == b'*' || b == b'[' || b.is_ascii_alphanumeric())
    };
    match flow {
        Some(Flow::Responses) => response,
        Some(Flow::Requests) => request(),
        None => response || request(),
    }
}

/// The head at the start of `data` (more bytes may follow it), or what is
/// wrong with it, and its length, when httparse finds it complete and it
/// ends with a blank CRLF line: what [`parse`] would say of the block a
/// search for CRLFCRLF finds. None otherwise: the caller finds the end
/// itself and calls [`parse`].
pub fn parse_leading(
    data: &[u8],
    flow: Option<Flow>,
    kept: &KeptHeaders,
) -> Option<(Result<Head, &'static str>, usize)> {
    // A head's lines hold no CR or LF, so the first blank line ends it:
    // where a search for CRLFCRLF would have found the end too (and with
    // none in `data` there is no such head).
    let end = super::find_head_end(data)?;
    // httparse reads a head no further than its end: the same bytes up to
    // there parse the same whatever follows them.
    let miss = match memo::get(&data[..end], flow, kept) {
        Ok(head) => return Some((Ok(head), end)),
        Err(miss) => miss,
    };
    let parsed = parse_leading_fresh(data, flow, kept);
    if let Some((Ok(head), len)) = &parsed {
        if *len == end {
            memo::put(miss, &data[..end], flow, kept, head);
        }
    }
    parsed
}

/// [`parse_leading`] without the memo.
pub(super) fn parse_leading_fresh(
    data: &[u8],
    flow: Option<Flow>,
    kept: &KeptHeaders,
) -> Option<(Result<Head, &'static str>, usize)> {
    parse_complete(data, is_response(data, flow), false, kept).filter(|(_, len)| data[..*len].ends_with(b"\r\n\r\n"))
}

/// Parses a header block. With `truncated`, a block cut short is accepted
/// as long as its start line is complete.
pub fn parse(block: &[u8], truncated: bool, flow: Option<Flow>, kept: &KeptHeaders) -> Result<Head, &'static str> {
    let is_response = is_response(block, flow);
    // A cut block may end mid-line; parse only its complete lines.
    let block = if truncated {
        match block.iter().rposition(|&b| b == b'\n') {
            Some(i) => &block[..=i],
            None => return Err("start line cut short"),
        }
    } else {
        block
    };
    if let Some((parsed, _)) = parse_complete(block, is_response, truncated, kept) {
        return parsed;
    }
    // Not complete (cut short, too many fields, an error): parsed again
    // into zeroed headers, where httparse leaves the fields it read
    // before stopping.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if is_response {
        let mut resp = httparse::Response::new(&mut headers);
        let status = resp.parse(block);
        response(&resp, status, truncated, kept)
    } else {
        let mut req = httparse::Request::new(&mut headers);
        let status = req.parse(block);
        request(&req, status, truncated, kept)
    }
}

fn is_response(data: &[u8], flow: Option<Flow>) -> bool {
    match flow {
        Some(Flow::Responses) => true,
        Some(Flow::Requests) => false,
        None => data.starts_with(b"HTTP/"),
    }
}

/// A head that httparse finds complete, parsed into uninitialized headers
/// (the 2 KiB array is not zeroed first), and its length; None when it
/// is not complete.
fn parse_complete(
    block: &[u8],
    is_response: bool,
    truncated: bool,
    kept: &KeptHeaders,
) -> Option<(Result<Head, &'static str>, usize)> {
    let mut uninit = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let config = httparse::ParserConfig::default();
    if is_response {
        let mut resp = httparse::Response::new(&mut []);
        let status = config.parse_response_with_uninit_headers(&mut resp, block, &mut uninit);
        let Ok(httparse::Status::Complete(len)) = status else {
            return None;
        };
        Some((response(&resp, status, truncated, kept), len))
    } else {
        let mut req = httparse::Request::new(&mut []);
        let status = config.parse_request_with_uninit_headers(&mut req, block, &mut uninit);
        let Ok(httparse::Status::Complete(len)) = status else {
            return None;
        };
        Some((request(&req, status, truncated, kept), len))
    }
}

/// A response head from what httparse read.
fn response(
    resp: &httparse::Response<'_, '_>,
    status: httparse::Result<usize>,
    truncated: bool,
    kept: &KeptHeaders,
) -> Result<Head, &'static str> {
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err(status.err().map_or("incomplete status line", error_name));
    };
    finish(
        HeadKind::Response { status: code },
        "",
        version,
        &*resp.headers,
        status,
        truncated,
        kept,
    )
}

/// A request head from what httparse read.
fn request(
    req: &httparse::Request<'_, '_>,
    status: httparse::Result<usize>,
    truncated: bool,
    kept: &KeptHeaders,
) -> Result<Head, &'static str> {
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(status.err().map_or("incomplete request line", error_name));
    };
    if method.len() > MAX_METHOD {
        return Err("method token too long");
    }
    let raw = &*req.headers;
    let glued = raw
        .iter()
        .take_while(|h| !h.name.is_empty())
        .any(|h| h.value.ends_with(b" HTTP/1.1") || h.value.ends_with(b" HTTP/1.0"));
    if glued {
        // A request line inside the header block: the bytes between two
        // requests were lost and the second was appended to the first.
        return Err("request line inside a header block");
    }
    let kind = HeadKind::Request {
        method: Method::new(method),
    };
    finish(kind, path, version, raw, status, truncated, kept)
}

fn finish(
    kind: HeadKind,
    target: &str,
    version: u8,
    raw: &[httparse::Header<'_>],
    status: httparse::Result<usize>,
    truncated: bool,
    kept: &KeptHeaders,
) -> Result<Head, &'static str> {
    let mut headers_dropped = 0;
    match status {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if truncated => {}
        Ok(httparse::Status::Partial) => return Err("incomplete header block"),
        Err(httparse::Error::TooManyHeaders) => headers_dropped = 1,
        Err(_) if truncated => {}
        Err(e) => return Err(error_name(e)),
    }
    let raw = &raw[..raw.iter().take_while(|h| !h.name.is_empty()).count()];
    // Each name is matched against the looked-up ones once, in any case
    // (indices fit a byte: LOOKED_UP has 16 names).
    let mut known = [None::<u8>; MAX_HEADERS];
    let mut keep: u64 = 0;
    for (i, h) in raw.iter().enumerate() {
        let index = looked_up_any_case(h.name);
        known[i] = index.map(|k| k as u8);
        keep |= u64::from(kept.keeps(h.name, index)) << i;
    }
    let known = |i: usize| known[i].map(u32::from);
    let fields = || raw.iter().enumerate().filter(move |(i, _)| keep >> i & 1 == 1);
    fn value_of<'h>(h: &httparse::Header<'h>) -> &'h [u8] {
        &h.value[..h.value.len().min(MAX_VALUE)]
    }
    // Sized once: the target and all kept fields go into one buffer (one
    // allocation per head while the fields fit inline).
    let bytes: usize = fields().map(|(_, h)| h.name.len() + value_of(h).len()).sum();
    let bytes = bytes.min(MAX_KEPT_HEADER_BYTES + 2 * MAX_VALUE);
    let mut headers = Headers::with_target(target, keep.count_ones() as usize, bytes);
    let mut kept_bytes = 0;
    for (i, h) in fields() {
        let value = value_of(h);
        kept_bytes += h.name.len() + value.len();
        let essential = known(i).is_some_and(|k| (k as usize) < ESSENTIAL.len());
        if kept_bytes > MAX_KEPT_HEADER_BYTES && !essential {
            headers_dropped += 1;
            continue;
        }
        match crate::text::str_of(value) {
            Ok(v) => headers.push_indexed(h.name, v, true, known(i)),
            Err(_) => headers.push_indexed(h.name, &String::from_utf8_lossy(value), true, known(i)),
        }
    }
    Ok(Head {
        kind,
        version,
        headers,
        headers_dropped,
        truncated,
        start_ktime_ns: 0,
        at_segment_start: false,
        in_one_segment: false,
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn error_name(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported HTTP version",
    }
}
