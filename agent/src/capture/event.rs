//! Decoding ring-buffer records into owned events.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use meshless_common::{
    ConnAddrs, Direction, EventHeader, EventKind, AF_INET, AF_INET6, FLAG_ACCEPTED, FLAG_CONNECTED, FLAG_LOCAL_ADDR,
    FLAG_NEW_CONN, FLAG_REMOTE_ADDR, FLAG_TLS, FLAG_UNCONFIRMED, HEADER_SIZE,
};

/// Identity of one connection: a (process, fd) pair and the kernel's
/// generation number for it, so a reused fd is a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
    pub conn_id: u64,
}

/// What the kernel said about a socket when it started tracking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketInfo {
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub accepted: bool,
    pub connected: bool,
    /// Socket inode (`socket:[N]`) as the kernel read it; 0 when unknown.
    pub ino: u64,
    /// The payload is TLS plaintext read at the TLS library (HTTPS).
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    Data {
        direction: Direction,
        /// Bytes the syscall moved.
        len: u64,
        /// The captured prefix of those bytes.
        payload: Bytes,
        /// Egress: when the sending call began, before the bytes could
        /// leave (`EventHeader::sent_ns`); 0 when not taken, then
        /// `ktime_ns` stands for it (see [`sent_at`]).
        sent_ns: u64,
    },
    Close,
    /// The process started a new program.
    Exec,
}

/// One decoded kernel event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub ktime_ns: u64,
    pub conn: ConnKey,
    pub tid: u32,
    pub cgroup_id: u64,
    pub comm: Comm,
    pub new_conn: bool,
    /// The kernel's number for this event on its connection (0:
    /// unnumbered), see [`super::Sequence`].
    pub seq: u32,
    pub socket: SocketInfo,
    /// Ids the kernel chose for the request this payload starts, if any.
    pub ctx: Option<crate::trace_context::KernelCtx>,
    pub body: EventBody,
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the {HEADER_SIZE}-byte header")]
    Short(usize),
    #[error("record announces {announced} payload bytes but carries {carried}")]
    Payload { announced: usize, carried: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown direction {0}")]
    Direction(u32),
}

/// Payloads of many events in shared chunks: copying a payload out of the
/// ring buffer costs no allocation of its own (a chunk is allocated per
/// [`ARENA_CHUNK`] bytes). A chunk lives until the last event cut from it
/// is dropped; payloads are consumed in the pass that correlates their
/// batch, so that is about one batch.
#[derive(Debug, Default)]
pub struct Arena {
    chunk: bytes::BytesMut,
}

/// Bytes per arena chunk (a drained batch at 5k requests/s is ~70 KiB).
pub const ARENA_CHUNK: usize = 64 * 1024;

impl Arena {
    /// A copy of `data` in the current chunk (a new chunk when it is full).
    pub fn copy(&mut self, data: &[u8]) -> Bytes {
        if data.is_empty() {
            return Bytes::new();
        }
        if self.chunk.capacity() - self.chunk.len() < data.len() {
            // Events still hold the old chunk; it is freed with the last.
            self.chunk = bytes::BytesMut::with_capacity(ARENA_CHUNK.max(data.len()));
        }
        self.chunk.extend_from_slice(data);
        self.chunk.split().freeze()
    }
}

/// When the bytes of a data event that exited at `ktime_ns` were on their
/// way: `sent_ns` if the kernel took it (and it is not later), else the
/// exit. An ingress event's exit is after its bytes arrived and an egress
/// event's `sent_ns` before they left, so between the two ends of a
/// connection these times keep cause before effect, whatever order the
/// events came in.
pub fn sent_at(ktime_ns: u64, sent_ns: u64) -> u64 {
    if sent_ns != 0 && sent_ns <= ktime_ns {
        sent_ns
    } else {
        ktime_ns
    }
}

impl Event {
    /// Decodes one ring-buffer record (header + payload), its payload
    /// copied on its own.
    pub fn decode(record: &[u8]) -> Result<Event, DecodeError> {
        Self::decode_with(record, Bytes::copy_from_slice)
    }

    /// Decodes one record, its payload copied into `arena`.
    pub fn decode_in(record: &[u8], arena: &mut Arena) -> Result<Event, DecodeError> {
        Self::decode_with(record, |p| arena.copy(p))
    }

    fn decode_with(record: &[u8], copy: impl FnOnce(&[u8]) -> Bytes) -> Result<Event, DecodeError> {
        if record.len() < HEADER_SIZE {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: EventHeader is plain old data; the length was checked and
        // read_unaligned copes with any alignment.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let carried = record.len() - HEADER_SIZE;
        let announced = h.captured as usize;
        if announced > carried {
            return Err(DecodeError::Payload { announced, carried });
        }
        let body = match h.kind {
            k if k == EventKind::Data as u32 => EventBody::Data {
                direction: match h.direction {
                    d if d == Direction::Ingress as u32 => Direction::Ingress,
                    d if d == Direction::Egress as u32 => Direction::Egress,
                    d => return Err(DecodeError::Direction(d)),
                },
                len: u64::from(h.len),
                payload: copy(&record[HEADER_SIZE..HEADER_SIZE + announced]),
                sent_ns: h.sent_ns,
            },
            k if k == EventKind::Close as u32 => EventBody::Close,
            k if k == EventKind::Exec as u32 => EventBody::Exec,
            k => return Err(DecodeError::Kind(k)),
        };
        Ok(Event {
            ktime_ns: h.ktime_ns,
            conn: ConnKey {
                tgid: h.tgid,
                fd: h.fd,
                conn_id: h.conn_id,
            },
            tid: h.tid,
            cgroup_id: h.cgroup_id,
            comm: Comm(h.comm),
            new_conn: h.flags & FLAG_NEW_CONN != 0,
            seq: h.seq,
            socket: SocketInfo {
                local: addr(&h.addrs, FLAG_LOCAL_ADDR),
                remote: addr(&h.addrs, FLAG_REMOTE_ADDR),
                accepted: h.flags & FLAG_ACCEPTED != 0,
                connected: h.flags & FLAG_CONNECTED != 0,
                ino: h.sock_ino,
                tls: h.flags & FLAG_TLS != 0,
            },
            ctx: crate::trace_context::KernelCtx::from_wire(&h.ctx),
            body,
        })
    }
}

/// (tgid, fd) of a record the kernel sent for an fd it could not classify
/// as a socket or not (FLAG_UNCONFIRMED): userspace must answer.
pub fn unconfirmed(record: &[u8]) -> Option<(u32, u32)> {
    if record.len() < HEADER_SIZE {
        return None;
    }
    // SAFETY: as in Event::decode.
    let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
    (h.flags & FLAG_UNCONFIRMED != 0).then_some((h.tgid, h.fd))
}

/// A thread's `comm` as the kernel gave it (kept inline: no allocation per
/// event or span).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    /// The comm of `name` (cut to the kernel's 15 bytes, like `prctl`).
    pub fn new(name: &str) -> Self {
        let mut comm = [0; 16];
        let n = crate::http::cut(name, 15).len();
        comm[..n].copy_from_slice(&name.as_bytes()[..n]);
        Comm(comm)
    }

    /// The bytes up to its NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    pub fn is_empty(&self) -> bool {
        self.0[0] == 0
    }

    /// The name up to its NUL; non-UTF-8 bytes are replaced (borrowed,
    /// no allocation, when it is valid UTF-8).
    pub fn to_str_lossy(&self) -> std::borrow::Cow<'_, str> {
        match crate::text::str_of(self.as_bytes()) {
            Ok(name) => std::borrow::Cow::Borrowed(name),
            Err(_) => String::from_utf8_lossy(self.as_bytes()),
        }
    }

    /// The name up to its NUL, owned; non-UTF-8 bytes are replaced.
    pub fn to_string_lossy(&self) -> String {
        self.to_str_lossy().into_owned()
    }
}

impl From<&str> for Comm {
    fn from(name: &str) -> Self {
        Comm::new(name)
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

fn addr(a: &ConnAddrs, which: u32) -> Option<SocketAddr> {
    if a.valid & which == 0 {
        return None;
    }
    let (bytes, port) = if which == FLAG_LOCAL_ADDR {
        (a.local, a.local_port)
    } else {
        (a.remote, a.remote_port)
    };
    let ip = match a.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        AF_INET6 => {
            let v6 = Ipv6Addr::from(bytes);
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(h: EventHeader, payload: &[u8]) -> Vec<u8> {
        // SAFETY: viewing a POD struct as bytes.
        let raw = unsafe { std::slice::from_raw_parts((&h as *const EventHeader).cast::<u8>(), HEADER_SIZE) };
        let mut v = raw.to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn header() -> EventHeader {
        EventHeader {
            ktime_ns: 5,
            conn_id: 9,
            cgroup_id: 1,
            tgid: 100,
            tid: 101,
            fd: 3,
            kind: EventKind::Data as u32,
            direction: Direction::Egress as u32,
            syscall: 2,
            len: 10,
            captured: 4,
            flags: FLAG_NEW_CONN | FLAG_CONNECTED,
            seq: 7,
            addrs: ConnAddrs {
                family: AF_INET6,
                local_port: 4000,
                remote_port: 80,
                valid: FLAG_LOCAL_ADDR | FLAG_REMOTE_ADDR,
                local: Ipv6Addr::LOCALHOST.octets(),
                remote: Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets(),
                ..ConnAddrs::default()
            },
            sock_ino: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            ctx: meshless_common::TraceCtx::default(),
            sent_ns: 4,
        }
    }

    #[test]
    fn decodes_a_data_record_with_ipv6_and_mapped_ipv4() {
        let ev = Event::decode(&record(header(), b"GET ")).expect("decodes");
        assert_eq!(ev.comm.to_string_lossy(), "curl");
        assert_eq!(ev.socket.local, Some("[::1]:4000".parse().expect("addr")));
        assert_eq!(ev.socket.remote, Some("10.0.0.2:80".parse().expect("addr")));
        assert!(ev.new_conn && ev.socket.connected && !ev.socket.accepted);
        assert_eq!(ev.seq, 7);
        assert_eq!(
            ev.body,
            EventBody::Data {
                direction: Direction::Egress,
                len: 10,
                payload: Bytes::from_static(b"GET "),
                sent_ns: 4,
            }
        );
    }

    #[test]
    fn payloads_decoded_into_an_arena_are_equal_to_their_own_copies_and_outlive_chunk_changes() {
        let mut arena = Arena::default();
        let big = vec![b'x'; ARENA_CHUNK / 2 + 1];
        let records = [record(header(), b"GET "), {
            let mut h = header();
            h.captured = big.len() as u32;
            record(h, &big)
        }];
        // Three rounds: the third event does not fit the first chunk.
        let decoded: Vec<Event> = records
            .iter()
            .cycle()
            .take(6)
            .map(|r| Event::decode_in(r, &mut arena).expect("decodes"))
            .collect();
        for (ev, r) in decoded.iter().zip(records.iter().cycle()) {
            assert_eq!(ev, &Event::decode(r).expect("decodes"));
        }
    }

    #[test]
    fn comm_is_cut_like_the_kernel_and_read_back_without_its_nuls() {
        assert_eq!(Comm::new("nginx").to_str_lossy(), "nginx");
        assert_eq!(Comm::new("a-very-long-thread-name").to_str_lossy(), "a-very-long-thr");
        assert!(Comm::default().is_empty() && !Comm::new("x").is_empty());
    }

    #[test]
    fn rejects_short_and_inconsistent_records() {
        assert_eq!(Event::decode(&[0; 8]), Err(DecodeError::Short(8)));
        assert_eq!(
            Event::decode_in(&[0; 8], &mut Arena::default()),
            Err(DecodeError::Short(8))
        );
        let mut h = header();
        h.captured = 100;
        assert!(matches!(
            Event::decode(&record(h, b"GET ")),
            Err(DecodeError::Payload { .. })
        ));
        let mut h = header();
        h.kind = 77;
        assert_eq!(Event::decode(&record(h, b"GET ")), Err(DecodeError::Kind(77)));
    }
}
