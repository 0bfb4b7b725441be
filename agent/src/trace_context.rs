//! W3C Trace Context (`traceparent`, `tracestate`) and id generation.
use std::fmt;

/// A 16-byte trace id (never all zero).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// An 8-byte span id (never all zero).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    pub fn random() -> Self {
        loop {
            let id: [u8; 16] = rand::random();
            if id != [0; 16] {
                return Self(id);
            }
        }
    }
}

impl SpanId {
    pub fn random() -> Self {
        loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                return Self(id);
            }
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// A parsed `traceparent` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub parent_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses per W3C Trace Context level 1; None for anything invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim();
        let mut parts = v.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version.eq_ignore_ascii_case("ff") {
            return None;
        }
        let version = u8::from_str_radix(version, 16).ok()?;
        // Version 00 has exactly four fields; later versions may add more.
        if version == 0 && parts.next().is_some() {
            return None;
        }
        if flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId(hex_array(trace)?);
        let parent_id = SpanId(hex_array(parent)?);
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id.0 == [0; 16] || parent_id.0 == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }
}

/// Where a kernel-decided context found its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentOrigin {
    /// No parent: a new trace.
    None,
    /// A `traceparent` header in the request.
    Header,
    /// The caller's TCP option (meshless on the caller's node).
    TcpOption,
    /// The inbound request this process was serving.
    InProcess,
}

/// The ids the kernel chose for a request when it saw it (see
/// ebpf/src/context.rs); userspace uses them and never makes up others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelCtx {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub origin: ParentOrigin,
    /// The ids also went to the peer in a TCP option.
    pub sent: bool,
}

impl KernelCtx {
    /// Decodes the wire form; None when the event starts no request.
    pub fn from_wire(c: &meshless_common::TraceCtx) -> Option<Self> {
        use meshless_common as m;
        if c.flags & m::CTX_VALID == 0 || c.trace_id == [0; 16] || c.span_id == [0; 8] {
            return None;
        }
        let parent = (c.flags & m::CTX_PARENT != 0 && c.parent_id != [0; 8]).then_some(SpanId(c.parent_id));
        let origin = match c.flags {
            _ if parent.is_none() => ParentOrigin::None,
            f if f & m::CTX_FROM_HEADER != 0 => ParentOrigin::Header,
            f if f & m::CTX_FROM_OPTION != 0 => ParentOrigin::TcpOption,
            f if f & m::CTX_IN_PROCESS != 0 => ParentOrigin::InProcess,
            _ => ParentOrigin::None,
        };
        Some(Self {
            trace_id: TraceId(c.trace_id),
            span_id: SpanId(c.span_id),
            parent: if origin == ParentOrigin::None { None } else { parent },
            sampled: c.flags & m::CTX_SAMPLED != 0,
            origin,
            sent: c.flags & m::CTX_SENT != 0,
        })
    }
}

/// A Zipkin B3 context (`b3` single header or `x-b3-*` headers), as Istio
/// and Zipkin meshes send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct B3 {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl B3 {
    /// From `b3: {traceid}-{spanid}[-{sampled}[-{parent}]]`.
    pub fn parse_single(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let trace = parts.next()?;
        let span = parts.next()?;
        let sampled = parts.next().is_none_or(|s| s == "1" || s == "d");
        Some(Self {
            trace_id: b3_trace(trace)?,
            span_id: SpanId(hex_array(span)?),
            sampled,
        })
    }

    /// From `x-b3-traceid`, `x-b3-spanid` and the optional `x-b3-sampled`.
    pub fn parse_multi(trace: &str, span: &str, sampled: Option<&str>) -> Option<Self> {
        Some(Self {
            trace_id: b3_trace(trace.trim())?,
            span_id: SpanId(hex_array(span.trim())?),
            sampled: sampled.is_none_or(|s| s.trim() == "1" || s.trim().eq_ignore_ascii_case("true")),
        })
    }
}

/// B3 trace ids are 64 or 128 bits; 64-bit ones are left-padded with zeros.
fn b3_trace(s: &str) -> Option<TraceId> {
    let id = match s.len() {
        32 => hex_array::<16>(s)?,
        16 => {
            let low: [u8; 8] = hex_array(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(TraceId(id))
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_traceparent() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
        assert!(tp.sampled);
    }

    #[test]
    fn parses_b3_single_and_multi_headers() {
        let b3 = B3::parse_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").expect("b3");
        assert_eq!(b3.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(b3.span_id.to_string(), "e457b5a2e4d86bd1");
        assert!(b3.sampled);
        let short = B3::parse_multi("64fe8b2a57d3eff7", "e457b5a2e4d86bd1", Some("0")).expect("b3");
        assert_eq!(short.trace_id.to_string(), "000000000000000064fe8b2a57d3eff7");
        assert!(!short.sampled);
        assert_eq!(B3::parse_single("0"), None);
        assert_eq!(B3::parse_single("xyz-e457b5a2e4d86bd1"), None);
    }

    #[test]
    fn a_kernel_context_without_the_valid_flag_is_none() {
        let mut c = meshless_common::TraceCtx {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: [3; 8],
            flags: 0,
            _pad: 0,
        };
        assert_eq!(KernelCtx::from_wire(&c), None);
        c.flags = meshless_common::CTX_VALID | meshless_common::CTX_PARENT | meshless_common::CTX_FROM_OPTION;
        let k = KernelCtx::from_wire(&c).expect("valid");
        assert_eq!(k.origin, ParentOrigin::TcpOption);
        assert_eq!(k.parent, Some(SpanId([3; 8])));
        assert!(!k.sampled);
    }

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        assert!(TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x").is_some());
    }
}
