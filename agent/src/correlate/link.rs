//! Linking a server span to the client span of the same call when both
//! ends run on this node and no TCP option carried the context (propagation
//! off, or a connection older than the agent): matched by the client's
//! ip:port and the request index, which both ends agree on even when the
//! client dialled a Service IP that was DNATed to the server.
use std::{net::SocketAddr, sync::Arc};

use foldhash::HashMap;

use super::context::SpanContext;
use crate::{span::Span, trace_context::TraceId};

/// How long a client context waits for its server side.
const CLIENT_TTL_NS: u64 = 30 * 1_000_000_000;
/// Most client contexts kept; beyond it the oldest half is dropped.
const MAX_CLIENTS: usize = 200_000;
/// Most server spans held for their client (~600 bytes each: ~10 MB);
/// beyond it a span goes out unlinked at once.
pub const MAX_WAITING: usize = 16_384;

/// (client end, server end if loopback, request index on the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkKey {
    pub client: SocketAddr,
    pub server: Option<SocketAddr>,
    pub seq: u64,
}

impl LinkKey {
    /// The server end differs on the two sides under DNAT, so only the
    /// client end keys a call; loopback client ends repeat in every network
    /// namespace, and loopback is never DNATed, so there the server end
    /// keys too.
    pub fn new(client: SocketAddr, server: SocketAddr, seq: u64) -> Self {
        Self {
            client,
            server: server_part(client, server),
            seq,
        }
    }
}

/// Hashed as a few words (the derived hash fed the hasher each address
/// field apart: ~200 instructions a key, several keys a request). Equal
/// keys hash alike: only fields `Eq` compares are hashed.
impl std::hash::Hash for LinkKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let (client, client_port) = addr_words(&self.client);
        h.write_u128(client);
        let (server, server_port) = self.server.as_ref().map_or((0, 0), addr_words);
        h.write_u128(server);
        h.write_u64(client_port << 32 | server_port);
        h.write_u64(self.seq);
    }
}

/// An address as (IP bits, port with the family and presence above it).
fn addr_words(addr: &SocketAddr) -> (u128, u64) {
    match addr {
        SocketAddr::V4(a) => (u128::from(a.ip().to_bits()), 1 << 16 | u64::from(a.port())),
        SocketAddr::V6(a) => (a.ip().to_bits(), 2 << 16 | u64::from(a.port())),
    }
}

fn server_part(client: SocketAddr, server: SocketAddr) -> Option<SocketAddr> {
    client.ip().is_loopback().then_some(server)
}

/// A server seen on a connection: its process name, the address it
/// accepted on, and when.
type ServerSeen = (Arc<str>, SocketAddr, u64);

#[derive(Debug, Default)]
pub struct Links {
    /// Client requests seen: their context, time and process.
    clients: HashMap<LinkKey, (SpanContext, u64, ClientProcess)>,
    /// Server spans held for their client.
    waiting: HashMap<LinkKey, Held>,
    /// Server requests that may still adopt a local client's ids: their
    /// kernel trace id and time.
    started: HashMap<LinkKey, (TraceId, u64)>,
    /// Server processes by connection (its [`LinkKey`] at request index
    /// 0), for naming the peer of client spans. A server reads a request
    /// before the client can read the response, so this is always known
    /// in time.
    servers: HashMap<LinkKey, ServerSeen>,
}

/// A server span waiting for its client.
#[derive(Debug)]
struct Held {
    span: Span,
    deadline_ns: u64,
    /// It takes the client's ids (false: a header gave it ids, and it
    /// waits only for the client's name).
    adopt_ids: bool,
}

/// The local client process of a linked call: name, pid, cgroup id.
pub type ClientProcess = (Arc<str>, u32, u64);

fn adopt(span: &mut Span, client: &SpanContext, (comm, pid, cgroup_id): ClientProcess, ids: bool) {
    if ids {
        span.trace_id = client.trace_id;
        span.parent_span_id = Some(client.span_id);
        span.sampled = client.sampled;
        span.peer_process = Some((pid, cgroup_id));
    }
    span.peer_comm = Some(comm);
}

impl Links {
    /// A client request was seen; returns a waiting server span it
    /// completes, and the kernel trace id of a started server request that
    /// moves to the client's trace.
    pub fn client_seen(
        &mut self,
        key: LinkKey,
        ctx: SpanContext,
        ktime_ns: u64,
        process: ClientProcess,
    ) -> (Option<Span>, Option<TraceId>) {
        let alias = self.started.remove(&key).map(|(t, _)| t);
        if let Some(mut held) = self.waiting.remove(&key) {
            adopt(&mut held.span, &ctx, process, held.adopt_ids);
            return (Some(held.span), alias);
        }
        self.clients.insert(key, (ctx, ktime_ns, process));
        (None, alias)
    }

    /// A server request that may adopt a local client's ids was seen: the
    /// client's trace id if that client is already known.
    pub fn server_started(&mut self, key: LinkKey, kernel_trace: TraceId, ktime_ns: u64) -> Option<TraceId> {
        if let Some((ctx, _, _)) = self.clients.get(&key) {
            return Some(ctx.trace_id);
        }
        if self.started.len() < MAX_CLIENTS {
            self.started.insert(key, (kernel_trace, ktime_ns));
        }
        None
    }

    /// A server process read a request on the connection `client`→`server`.
    pub fn server_seen(&mut self, client: SocketAddr, server: SocketAddr, comm: &Arc<str>, ktime_ns: u64) {
        self.servers
            .insert(LinkKey::new(client, server, 0), (comm.clone(), server, ktime_ns));
    }

    /// The server process of the connection `client`→`server`, if on this
    /// node, and the address it accepted on (a pod's, when the client
    /// dialled a Service IP).
    pub fn server_of(&self, client: SocketAddr, server: SocketAddr) -> Option<(Arc<str>, SocketAddr)> {
        self.servers
            .get(&LinkKey::new(client, server, 0))
            .map(|(comm, real, _)| (comm.clone(), *real))
    }

    /// A server exchange finished: true if it goes out now, linked to its
    /// client (or, with `adopt_ids` false, keeping the ids a header gave it
    /// and taking only the client's name); false if the client is not known
    /// yet and it must [`Self::hold`] for it. A span with its own ids waits
    /// too: the client's write may return (and its event come) after the
    /// server answered, and without the client the span and its metrics
    /// would name no source.
    /// The span is changed where it lies: it is a large struct, and moving
    /// it in and out showed in the profile.
    pub fn server_done(&mut self, key: LinkKey, span: &mut Span, adopt_ids: bool) -> bool {
        self.started.remove(&key);
        if let Some((ctx, _, comm)) = self.clients.remove(&key) {
            adopt(span, &ctx, comm, adopt_ids);
            return true;
        }
        false
    }

    /// Holds a server span [`Self::server_done`] could not link yet until
    /// its client shows up or `deadline_ns` passes.
    pub fn hold(&mut self, key: LinkKey, span: Span, deadline_ns: u64, adopt_ids: bool) {
        self.waiting.insert(
            key,
            Held {
                span,
                deadline_ns,
                adopt_ids,
            },
        );
    }

    /// [`MAX_WAITING`] spans are held: the next goes out unlinked at once.
    pub fn holding_all_it_may(&self) -> bool {
        self.waiting.len() >= MAX_WAITING
    }

    /// Server spans whose wait is over, released as they are.
    /// Server spans are waiting for their local client (a tick releases
    /// them at their deadline).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    pub fn expired(&mut self, now_ns: u64) -> Vec<Span> {
        let due: Vec<LinkKey> = self
            .waiting
            .iter()
            .filter(|(_, held)| held.deadline_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        due.into_iter()
            .filter_map(|k| self.waiting.remove(&k))
            .map(|held| held.span)
            .collect()
    }

    /// Forgets client contexts nobody claimed (the server was elsewhere).
    pub fn purge(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(CLIENT_TTL_NS);
        self.clients.retain(|_, (_, t, _)| *t >= cutoff);
        self.servers.retain(|_, (_, _, t)| *t >= cutoff);
        self.started.retain(|_, (_, t)| *t >= cutoff);
        if self.clients.len() > MAX_CLIENTS {
            let mut times: Vec<u64> = self.clients.values().map(|(_, t, _)| *t).collect();
            times.sort_unstable();
            let median = times[times.len() / 2];
            self.clients.retain(|_, (_, t, _)| *t > median);
        }
        if self.servers.len() > MAX_CLIENTS {
            self.servers.clear();
        }
    }
}
