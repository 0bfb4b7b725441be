//! One tracked connection: who owns it, where its ends are, and the
//! protocol state that parses it (chosen from its first payload).
use std::net::SocketAddr;

use super::protocol::{self, Output, Protocol, Segment};
use crate::span::{Process, SpanKind, Unanswered};

#[derive(Debug)]
pub struct Conn {
    pub process: Process,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub last_ktime_ns: u64,
    /// Its payload is TLS plaintext (HTTPS).
    pub tls: bool,
    /// Where the kernel's event numbering of this connection stands.
    pub sequence: crate::capture::Sequence,
    /// Decided by the first data event.
    protocol: Option<Box<dyn Protocol>>,
    /// Events were lost before the protocol was chosen: it is told so
    /// before its first bytes (what came before them may have answered
    /// them, see `Http1::lost_until_ns`).
    lost_first: bool,
}

impl Conn {
    pub fn new(process: Process, local: Option<SocketAddr>, remote: Option<SocketAddr>) -> Self {
        Self {
            process,
            local,
            remote,
            last_ktime_ns: 0,
            tls: false,
            sequence: crate::capture::Sequence::default(),
            protocol: None,
            lost_first: false,
        }
    }

    /// (client, server) addresses of this connection for a span of `kind`.
    pub fn endpoints(&self, kind: SpanKind) -> (Option<SocketAddr>, Option<SocketAddr>) {
        match kind {
            SpanKind::Server => (self.remote, self.local),
            SpanKind::Client => (self.local, self.remote),
        }
    }

    /// Approximate heap bytes this connection holds.
    pub fn state_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.protocol.as_ref().map_or(0, |p| p.state_bytes())
    }

    /// Feeds one syscall's bytes (a new connection's heads keep `kept`).
    pub fn data(&mut self, segment: Segment, kept: &crate::http::KeptHeaders, out: &mut Output) {
        self.last_ktime_ns = self.last_ktime_ns.max(segment.ktime_ns);
        self.process.tid = segment.thread.tid;
        let protocol = self
            .protocol
            .get_or_insert_with(|| protocol::detect(&segment.payload, segment.direction, kept));
        if std::mem::take(&mut self.lost_first) {
            protocol.events_lost(out);
        }
        protocol.data(segment, out);
        if let Some(request) = out.upgrade.take() {
            self.protocol = Some(Box::new(crate::http2::Http2::upgraded(request)));
        }
    }

    /// The socket closed or was forgotten (see [`Protocol::close`]).
    pub fn close(&mut self, why: Option<Unanswered>, at_ktime_ns: u64, out: &mut Output) {
        self.last_ktime_ns = self.last_ktime_ns.max(at_ktime_ns);
        if let Some(p) = &mut self.protocol {
            p.close(why, at_ktime_ns, out);
        }
    }

    /// Events of this connection were lost: pairing restarts.
    pub fn events_lost(&mut self, out: &mut Output) {
        match &mut self.protocol {
            Some(p) => p.events_lost(out),
            None => self.lost_first = true,
        }
    }
}
