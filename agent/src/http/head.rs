//! Parsing one HTTP/1.x header block with `httparse`.
use super::Flow;

/// Headers kept per message; the rest are counted in `Head::headers_dropped`.
pub const MAX_HEADERS: usize = 64;
/// Longest header value kept (longer values are cut).
const MAX_VALUE: usize = 1024;

/// A request line or a status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadKind {
    Request { method: String, target: String },
    Response { status: u16 },
}

/// A parsed message head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub kind: HeadKind,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub headers_dropped: usize,
    /// The header block was not seen to its end.
    pub truncated: bool,
    /// Time of the syscall that carried the first byte.
    pub start_ktime_ns: u64,
    /// The head began at the first byte of a syscall's payload (where the
    /// kernel decides a request's trace context).
    pub at_segment_start: bool,
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
    pub fn flow(&self) -> Flow {
        match self.kind {
            HeadKind::Request { .. } => Flow::Requests,
            HeadKind::Response { .. } => Flow::Responses,
        }
    }

    /// First value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn method(&self) -> Option<&str> {
        match &self.kind {
            HeadKind::Request { method, .. } => Some(method),
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

/// True when `data` begins like a message of `flow` (or of either kind).
pub fn starts_message(data: &[u8], flow: Option<Flow>) -> bool {
    let response = data.starts_with(b"HTTP/1.");
    let request = || {
        let Some(sp) = data.iter().take(16).position(|&b| b == b' ') else {
            return false;
        };
        sp > 0
            && data[..sp].iter().all(|b| b.is_ascii_uppercase())
            && data
                .get(sp + 1)
                .is_some_and(|&b| b == b'/' || b == b'*' || b.is_ascii_alphabetic())
    };
    match flow {
        Some(Flow::Responses) => response,
        Some(Flow::Requests) => request(),
        None => response || request(),
    }
}

/// Parses a header block. With `truncated`, a block cut short is accepted
/// as long as its start line is complete.
pub fn parse(block: &[u8], truncated: bool, flow: Option<Flow>) -> Result<Head, &'static str> {
    let is_response = match flow {
        Some(Flow::Responses) => true,
        Some(Flow::Requests) => false,
        None => block.starts_with(b"HTTP/"),
    };
    // A cut block may end mid-line; parse only its complete lines.
    let block = if truncated {
        match block.iter().rposition(|&b| b == b'\n') {
            Some(i) => &block[..=i],
            None => return Err("start line cut short"),
        }
    } else {
        block
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if is_response {
        let mut resp = httparse::Response::new(&mut headers);
        let status = resp.parse(block);
        let (Some(code), Some(version)) = (resp.code, resp.version) else {
            return Err(status.err().map_or("incomplete status line", error_name));
        };
        finish(
            HeadKind::Response { status: code },
            version,
            resp.headers,
            status,
            truncated,
        )
    } else {
        let mut req = httparse::Request::new(&mut headers);
        let status = req.parse(block);
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(status.err().map_or("incomplete request line", error_name));
        };
        let kind = HeadKind::Request {
            method: method.to_owned(),
            target: path.to_owned(),
        };
        finish(kind, version, req.headers, status, truncated)
    }
}

fn finish(
    kind: HeadKind,
    version: u8,
    raw: &[httparse::Header<'_>],
    status: httparse::Result<usize>,
    truncated: bool,
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
    let headers = raw
        .iter()
        .take_while(|h| !h.name.is_empty())
        .map(|h| {
            let value = &h.value[..h.value.len().min(MAX_VALUE)];
            (h.name.to_ascii_lowercase(), String::from_utf8_lossy(value).into_owned())
        })
        .collect();
    Ok(Head {
        kind,
        version,
        headers,
        headers_dropped,
        truncated,
        start_ktime_ns: 0,
        at_segment_start: false,
    })
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
