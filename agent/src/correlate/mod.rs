//! Stage 3: events → spans.
//!
//! Owns every tracked connection (its two HTTP streams and requests in
//! flight), matches responses to requests in FIFO order, and links the two
//! sides of a call that both run on this node: the client's k-th request on
//! a TCP connection is the server's k-th request on the mirrored connection,
//! so the server span becomes the client span's child without any header
//! being injected.
mod alias;
mod conn;
mod context;
mod link;
pub mod protocol;

use std::sync::Arc;

// foldhash: much faster than SipHash on the per-event path, still seeded.
use foldhash::HashMap;

use alias::Aliases;
use conn::Conn;
use link::{LinkKey, Links};
use protocol::{Exchange, Output, Response, Segment};

use crate::{
    capture::{names::ProcessNames, ConnKey, Event, EventBody},
    clock::Clock,
    privacy::HeaderPolicy,
    sockets,
    span::{Process, Span, SpanKind, Unanswered},
    stats::Stats,
};

/// Bounds on the correlator's state.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_conns: usize,
    /// Connections without traffic for this long are forgotten.
    pub idle_timeout_ns: u64,
    /// How long a server span waits for its local client side to show up.
    pub link_wait_ns: u64,
    /// Approximate bytes of per-connection state (buffers, pending
    /// requests) above which the least recently active connections are
    /// shed; 0 means no limit beyond `max_conns`.
    pub max_state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_conns: 65_536,
            idle_timeout_ns: 300 * 1_000_000_000,
            link_wait_ns: 200_000_000,
            max_state_bytes: 0,
        }
    }
}

impl Limits {
    /// The link wait for an agent that drains the ring buffer every
    /// `poll`: a client's event may come one drain after its server's, so
    /// the wait spans two drains when that is longer than the default.
    pub fn link_wait_for_poll(poll: std::time::Duration) -> u64 {
        let two_drains = u64::try_from(poll.as_nanos()).unwrap_or(u64::MAX / 2).saturating_mul(2);
        Self::default().link_wait_ns.max(two_drains)
    }
}

/// Bytes a tracked connection costs at least: its table slot (tables run
/// at most half full after growing), its boxed protocol state (HTTP/1, the
/// common case), the generation entry and small heap parts.
const CONN_FLOOR_BYTES: usize = 2 * std::mem::size_of::<(ConnKey, Conn)>() + CONN_PROTOCOL_BYTES + 512;
/// What an HTTP/1 connection's state holds beyond its table slot (two
/// parsers, queues, timestamps), measured with `size_of` before the
/// matcher moved behind a box.
const CONN_PROTOCOL_BYTES: usize = 1024;

/// How often idle connections and unclaimed link entries are swept.
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

pub struct Correlator {
    conns: HashMap<ConnKey, Conn>,
    /// Current generation (conn_id) of each tracked (tgid, fd); an entry
    /// lives exactly as long as its connection.
    generations: HashMap<(u32, u32), u64>,
    linking: Linking,
    env: SpanEnv,
    last_sweep_ns: u64,
    /// Sum of the connections' `state_bytes`, refreshed at each sweep.
    state_bytes: usize,
    /// Names of the processes seen (not of their threads).
    names: ProcessNames,
    /// Told about each process seen (it sets the kernel's linking policy).
    new_process: Option<std::sync::mpsc::SyncSender<crate::propagation::Seen>>,
    /// Asks the host for a socket's addresses the kernel did not report.
    lookup: SocketLookup,
    #[cfg(test)]
    pending: Vec<Span>,
}

/// What turning a connection's output into spans changes.
#[derive(Default)]
struct Linking {
    /// The two sides of same-node calls, matched.
    links: Links,
    /// Trace ids the kernel chose that a header replaced (see `alias.rs`).
    aliases: Aliases,
    /// What the current event produced: passed to the connection empty and
    /// emptied by [`absorb`] (see [`protocol::Protocol`]).
    out: Output,
}

/// What turning exchanges into spans needs besides the connection.
struct SpanEnv {
    clock: Clock,
    stats: Arc<Stats>,
    limits: Limits,
    headers: HeaderPolicy,
    /// The header fields HTTP/1 heads keep (from `headers`).
    kept: crate::http::KeptHeaders,
    /// Kernel time at which the events being handled reached the agent
    /// (see [`Correlator::arrived`]); 0 when not told.
    arrived_ns: u64,
}

/// (local, remote) of socket `fd` of process `pid` with inode `ino`, as
/// the host answers it ([`sockets::lookup`]; a replay answers from its
/// recording or not at all).
pub type SocketLookup = fn(u32, u32, u64) -> Option<(std::net::SocketAddr, std::net::SocketAddr)>;

impl Correlator {
    pub fn new(limits: Limits, headers: HeaderPolicy, stats: Arc<Stats>) -> Self {
        Self::with_host(
            limits,
            headers,
            stats,
            crate::capture::names::from_proc,
            sockets::lookup,
        )
    }

    /// A correlator that asks `names` and `lookup` instead of /proc and
    /// the live sockets (replays, tests).
    pub fn with_host(
        limits: Limits,
        headers: HeaderPolicy,
        stats: Arc<Stats>,
        names: crate::capture::names::Source,
        lookup: SocketLookup,
    ) -> Self {
        Self {
            conns: HashMap::default(),
            generations: HashMap::default(),
            linking: Linking::default(),
            names: ProcessNames::new(names),
            new_process: None,
            lookup,
            #[cfg(test)]
            pending: Vec::new(),
            env: SpanEnv {
                clock: Clock::sample(),
                stats,
                limits,
                kept: headers.kept(),
                arrived_ns: 0,
                headers,
            },
            last_sweep_ns: 0,
            state_bytes: 0,
        }
    }

    /// Approximate bytes of per-connection state, as of the last sweep
    /// (cheap: read it as often as needed).
    pub fn state_bytes(&self) -> usize {
        self.state_bytes
    }

    /// Reports every new connection's process to `tx` (dropped when full).
    pub fn notify_new_processes(&mut self, tx: std::sync::mpsc::SyncSender<crate::propagation::Seen>) {
        self.new_process = Some(tx);
    }

    /// The events handled next reached the agent at kernel time `now_ns`.
    /// A server span waits for its same-node client for
    /// [`Limits::link_wait_ns`] from the later of its last event and this:
    /// when the agent is behind (a backlog in the ring buffer, a CPU
    /// starved by the traced apps), the client's event is not late, only
    /// still queued behind, and [`Self::tick`] runs on the clock.
    pub fn arrived(&mut self, now_ns: u64) {
        self.env.arrived_ns = now_ns;
    }

    /// Handles one event; finished spans are appended to `spans`.
    pub fn handle(&mut self, ev: Event, spans: &mut Vec<Span>) {
        let key = ev.conn;
        match ev.body {
            EventBody::Close => self.end_conn(key, Some(Unanswered::ConnectionClosed), ev.ktime_ns, spans),
            EventBody::Exec => {
                self.names.forget(key.tgid);
                if let Some(tx) = &self.new_process {
                    let _ = tx.try_send(crate::propagation::Seen::Exec(key.tgid));
                }
            }
            EventBody::Data {
                direction,
                len,
                payload,
                sent_ns,
            } => {
                self.retire_old_generation(key, spans);
                if !self.conns.contains_key(&key) {
                    self.make_room(spans);
                    let name = self.names.get(key.tgid, ev.tid, &ev.comm, ev.ktime_ns);
                    let process = Process {
                        pid: key.tgid,
                        tid: ev.tid,
                        name: name.name,
                        executable: name.executable,
                        thread: crate::capture::Comm::default(),
                        cgroup_id: ev.cgroup_id,
                    };
                    let conn = new_conn(&ev.conn, process, ev.socket, self.lookup);
                    self.conns.insert(key, conn);
                    self.generations.insert((key.tgid, key.fd), key.conn_id);
                    if let Some(tx) = &self.new_process {
                        let _ = tx.try_send(crate::propagation::Seen::Conn(key.tgid));
                    }
                }
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let order = conn.sequence.check(ev.seq);
                if order != crate::capture::Order::Next {
                    Stats::inc(&self.env.stats.event_sequence_gaps);
                    conn.events_lost(&mut self.linking.out);
                    absorb(&mut self.linking, &self.env, conn, spans);
                    if order == crate::capture::Order::Stale {
                        return;
                    }
                }
                conn.data(
                    Segment {
                        direction,
                        payload,
                        len,
                        ktime_ns: ev.ktime_ns,
                        sent_ns: crate::capture::event::sent_at(ev.ktime_ns, sent_ns),
                        thread: protocol::Thread {
                            tid: ev.tid,
                            comm: ev.comm,
                        },
                        ctx: ev.ctx,
                    },
                    &self.env.kept,
                    &mut self.linking.out,
                );
                // Disjoint fields: the connection stays in the table.
                absorb(&mut self.linking, &self.env, conn, spans);
            }
        }
        Stats::set(&self.env.stats.conns_tracked, self.conns.len() as u64);
    }

    /// Periodic work: releases server spans whose client never showed up;
    /// once a second also forgets idle connections and stale link entries.
    pub fn tick(&mut self, now_ktime_ns: u64, spans: &mut Vec<Span>) {
        self.env.clock = Clock::sample();
        spans.extend(self.linking.links.expired(now_ktime_ns));
        if now_ktime_ns.saturating_sub(self.last_sweep_ns) < SWEEP_EVERY_NS {
            return;
        }
        self.last_sweep_ns = now_ktime_ns;
        let idle_before = now_ktime_ns.saturating_sub(self.env.limits.idle_timeout_ns);
        let idle: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.last_ktime_ns < idle_before)
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            Stats::inc(&self.env.stats.conns_evicted);
            self.end_conn(key, Some(Unanswered::Timeout), now_ktime_ns, spans);
        }
        self.shed(spans);
        // Give back table space after a surge of connections.
        if self.conns.capacity() > 4 * self.conns.len().max(1024) {
            self.conns.shrink_to_fit();
            self.generations.shrink_to_fit();
        }
        self.linking.links.purge(now_ktime_ns);
        self.linking.aliases.purge(now_ktime_ns);
        self.names.purge(now_ktime_ns);
        Stats::set(&self.env.stats.process_names_cached, self.names.len() as u64);
        Stats::set(&self.env.stats.process_names_evictions, self.names.evictions);
        Stats::set(&self.env.stats.process_names_stand_ins, self.names.stand_ins);
        Stats::set(&self.env.stats.conns_tracked, self.conns.len() as u64);
    }

    /// Spans are held until a deadline only a tick can see pass.
    pub fn has_waiting(&self) -> bool {
        self.linking.links.has_waiting()
    }

    /// Emits everything still held (shutdown).
    pub fn flush(&mut self, spans: &mut Vec<Span>) {
        spans.extend(self.linking.links.expired(u64::MAX));
    }

    /// A new connection on a reused fd ends the one before it.
    fn retire_old_generation(&mut self, key: ConnKey, spans: &mut Vec<Span>) {
        match self.generations.get(&(key.tgid, key.fd)) {
            Some(&old_id) if old_id != key.conn_id => self.end_conn(
                ConnKey { conn_id: old_id, ..key },
                Some(Unanswered::ConnectionClosed),
                0,
                spans,
            ),
            _ => {}
        }
    }

    fn make_room(&mut self, spans: &mut Vec<Span>) {
        // The table itself (slots sized for the largest count it ever held)
        // and each connection's fixed part must fit the correlator's share
        // too, not only what `shed` measures once a second.
        let by_budget = match self.env.limits.max_state_bytes {
            0 => usize::MAX,
            bytes => bytes / CONN_FLOOR_BYTES,
        };
        if self.conns.len() < self.env.limits.max_conns.min(by_budget) {
            return;
        }
        let oldest = self.conns.iter().min_by_key(|(_, c)| c.last_ktime_ns).map(|(k, _)| *k);
        if let Some(key) = oldest {
            Stats::inc(&self.env.stats.conns_evicted);
            if self.conns.len() >= by_budget {
                self.env.stats.budget.shed(crate::budget::Reason::CorrelateBudget, 1);
            }
            self.end_conn(key, None, 0, spans);
        }
    }

    /// Measures the per-connection state and, over `max_state_bytes`,
    /// drops the least recently active connections (counted) until it is
    /// back under 90% of the limit.
    fn shed(&mut self, spans: &mut Vec<Span>) {
        let mut sizes: Vec<(u64, usize, ConnKey)> = self
            .conns
            .iter()
            .map(|(k, c)| (c.last_ktime_ns, c.state_bytes(), *k))
            .collect();
        self.state_bytes = sizes.iter().map(|(_, b, _)| b).sum();
        let limit = self.env.limits.max_state_bytes;
        if limit > 0 && self.state_bytes > limit {
            sizes.sort_unstable();
            let target = limit / 10 * 9;
            for (_, bytes, key) in sizes {
                if self.state_bytes <= target {
                    break;
                }
                self.state_bytes -= bytes;
                Stats::inc(&self.env.stats.correlator_shed_conns);
                self.env.stats.budget.shed(crate::budget::Reason::CorrelateBudget, 1);
                self.end_conn(key, None, 0, spans);
            }
        }
        Stats::set(&self.env.stats.correlator_state_bytes, self.state_bytes as u64);
        self.env
            .stats
            .budget
            .set_used(crate::budget::Share::Correlate, self.state_bytes as u64);
    }

    /// Forgets a connection, ending what its close delimits; requests
    /// still waiting become spans that say `why` (or are dropped if None).
    fn end_conn(&mut self, key: ConnKey, why: Option<Unanswered>, at_ktime_ns: u64, spans: &mut Vec<Span>) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        if self.generations.get(&(key.tgid, key.fd)) == Some(&key.conn_id) {
            self.generations.remove(&(key.tgid, key.fd));
        }
        conn.close(why, at_ktime_ns, &mut self.linking.out);
        let unanswered = self
            .linking
            .out
            .exchanges
            .iter()
            .filter(|e| matches!(e.response, Response::Missing(_)))
            .count();
        Stats::add(&self.env.stats.spans_unanswered, unanswered as u64);
        absorb(&mut self.linking, &self.env, &conn, spans);
    }
}

/// Turns what a connection produced into spans, linking the two sides of
/// same-node calls.
/// Leaves `out` empty for the next event.
fn absorb(linking: &mut Linking, env: &SpanEnv, conn: &Conn, spans: &mut Vec<Span>) {
    let Linking { links, aliases, out } = linking;
    let counts = [
        (&env.stats.http_malformed, &out.malformed),
        (&env.stats.http_orphan_responses, &out.orphans),
        (&env.stats.http_early_responses, &out.early_answers),
        (&env.stats.http_pairing_resyncs, &out.resyncs),
        (&env.stats.http_pending_overflows, &out.overflows),
        (&env.stats.http_duplicate_events, &out.duplicates),
        (&env.stats.http_header_limits, &out.limited),
    ];
    for (counter, n) in counts {
        Stats::add(counter, *n);
    }
    for (from, to) in out.aliases.drain(..) {
        aliases.insert(from, to, conn.last_ktime_ns);
    }
    let now = conn.last_ktime_ns;
    if !out.server_requests.is_empty() {
        if let (Some(client), Some(server)) = conn.endpoints(SpanKind::Server) {
            links.server_seen(client, server, &conn.process.name, now);
            // A server request that will adopt a local client's ids moves
            // to the client's trace now, before the calls it makes are seen:
            // they inherit the kernel's trace id for it.
            for (seq, ctx) in out.server_requests.iter().filter(|(_, c)| !c.fixed) {
                if let Some(to) = links.server_started(LinkKey::new(client, server, *seq), ctx.trace_id, now) {
                    aliases.insert(ctx.trace_id, to, now);
                }
            }
        }
    }
    if let (Some(client), Some(server)) = conn.endpoints(SpanKind::Client) {
        for (seq, ctx) in out.client_requests.drain(..) {
            let key = LinkKey::new(client, server, seq);
            let process = (conn.process.name.clone(), conn.process.pid, conn.process.cgroup_id);
            let (done, alias) = links.client_seen(key, ctx, now, process);
            if let Some(from) = alias {
                aliases.insert(from, ctx.trace_id, now);
            }
            if let Some(mut span) = done {
                aliases.apply(&mut span);
                spans.push(span);
            }
        }
    }
    for ex in out.exchanges.drain(..) {
        Stats::inc(&env.stats.spans_created);
        let link = link_key(conn, &ex);
        let adopt_ids = !ex.request.ctx.fixed;
        // Built where it will be handed on, and finished there (a span is
        // ~600 bytes: each move was a `memcpy`).
        spans.push(build_span(conn, ex, &env.clock, &env.headers));
        let Some(span) = spans.last_mut() else {
            continue;
        };
        aliases.apply(span);
        if let (SpanKind::Client, Some(client), Some(server)) = (span.kind, span.client, span.server) {
            if let Some((comm, real)) = links.server_of(client, server) {
                span.peer_comm = Some(comm);
                span.resolved_server = (real != server).then_some(real);
            }
        }
        if let Some(key) = link {
            if !links.server_done(key, span, adopt_ids) {
                if links.holding_all_it_may() {
                    Stats::inc(&env.stats.link_wait_overflows);
                } else if let Some(held) = spans.pop() {
                    let from = conn.last_ktime_ns.max(env.arrived_ns);
                    let deadline = from.saturating_add(env.limits.link_wait_ns);
                    links.hold(key, held, deadline, adopt_ids);
                }
            }
        }
    }
    // Empty for the next event, whatever was not drained above (requests
    // of a connection whose addresses are unknown link nothing).
    out.clear();
}

/// The link key of a server exchange, whose ids (unless they came from a
/// header) and peer name may come from a local client.
fn link_key(conn: &Conn, ex: &Exchange) -> Option<LinkKey> {
    if ex.request.kind != SpanKind::Server {
        return None;
    }
    match conn.endpoints(SpanKind::Server) {
        (Some(client), Some(server)) => Some(LinkKey::new(client, server, ex.request.seq)),
        _ => None,
    }
}

fn new_conn(key: &ConnKey, process: Process, socket: crate::capture::SocketInfo, lookup: SocketLookup) -> Conn {
    let (mut local, mut remote) = (socket.local, socket.remote);
    if local.is_none() || remote.is_none() {
        // The kernel side could not learn the addresses (e.g. accept4 with a
        // NULL sockaddr, or a socket older than the agent): ask the socket.
        if let Some((l, r)) = lookup(key.tgid, key.fd, socket.ino) {
            local = local.or(Some(l));
            remote = remote.or(Some(r));
        }
    }
    let mut conn = Conn::new(process, local, remote);
    conn.tls = socket.tls;
    conn
}

fn build_span(conn: &Conn, ex: Exchange, clock: &Clock, headers: &HeaderPolicy) -> Span {
    let Exchange {
        mut request,
        response,
        end_ktime_ns,
        rpc,
    } = ex;
    let (client, server) = conn.endpoints(request.kind);
    let start = request.head.start_ktime_ns;
    let end = end_ktime_ns
        .max(response.head().map_or(0, |h| h.start_ktime_ns))
        .max(start);
    let ctx = request.ctx;
    let trace_state = request
        .head
        .header("tracestate")
        .filter(|_| ctx.remote_parent)
        .map(str::to_owned);
    let request_headers = headers.request(&request.head.headers);
    // The exchange ends here: the method moves into the span; the heads'
    // buffers go back to the pool once target and user agent are copied.
    let method = match &mut request.head.kind {
        crate::http::HeadKind::Request { method } => std::mem::take(method),
        crate::http::HeadKind::Response { .. } => crate::http::Method::default(),
    };
    let text = crate::span::RequestText::new(request.head.headers.target(), request.head.header("user-agent"));
    Span {
        trace_id: ctx.trace_id,
        span_id: ctx.span_id,
        parent_span_id: ctx.parent,
        sampled: ctx.sampled,
        parent_is_remote: ctx.remote_parent,
        trace_state,
        kind: request.kind,
        start_unix_nano: clock.to_unix_nanos(start),
        end_unix_nano: clock.to_unix_nanos(end),
        method,
        request: text,
        status_code: response.head().and_then(|h| h.status()),
        protocol_version: request.version,
        tls: conn.tls,
        rpc,
        client,
        server,
        process: Process {
            tid: request.thread.tid,
            thread: request.thread.comm,
            ..conn.process.clone()
        },
        peer_comm: None,
        peer_process: None,
        resolved_server: None,
        k8s: None,
        peer_k8s: None,
        request_headers,
        response_headers: response.head().map_or_else(Vec::new, |h| headers.response(&h.headers)),
        truncated: request.head.truncated
            || match &response {
                Response::Seen(h) => h.truncated,
                Response::Uncaptured => true,
                Response::Missing(_) => false,
            },
        unanswered: match response {
            Response::Missing(why) => Some(why),
            Response::Seen(_) | Response::Uncaptured => None,
        },
    }
}

#[cfg(test)]
mod context_tests;
#[cfg(test)]
mod link_tests;
#[cfg(test)]
mod tests;
