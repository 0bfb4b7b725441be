//! Fuzz harnesses shared by the cargo-fuzz targets (nightly, libFuzzer) and
//! the stable fallback in `agent/tests/fuzz.rs`: each takes arbitrary
//! bytes, drives one stage with them and panics on a broken invariant.
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use meshless::{
    capture::{event::Comm, ConnKey, Event, EventBody, SocketInfo},
    correlate::{Correlator, Limits},
    http::{HttpStream, Item},
    privacy::HeaderPolicy,
    span::Span,
    stats::Stats,
};
use meshless_common::Direction;

/// A cursor over the fuzz input; yields zeros once exhausted.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// The HTTP parser fed `data` split into syscall-sized pieces chosen by
/// the input itself, with some pieces only partly captured. Invariants:
/// no panic, and no item loop without new input.
pub fn http_stream(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let (ctl, body) = data.split_at(data.len().min(8));
    let mut stream = HttpStream::new();
    let mut at = 0;
    let mut i = 0;
    let mut ktime = 1;
    while at < body.len() {
        let c = ctl[i % ctl.len()];
        i += 1;
        let n = (usize::from(c % 64) + 1).min(body.len() - at);
        let missing = if c >= 240 { u64::from(c - 239) * 100 } else { 0 };
        stream.push(Bytes::copy_from_slice(&body[at..at + n]), missing, ktime);
        at += n;
        ktime += 1_000;
        drain(&mut stream, body.len());
    }
    let _ = stream.close();
    drain(&mut stream, body.len());
}

fn drain(stream: &mut HttpStream, budget: usize) {
    let mut items = 0;
    while let Some(item) = stream.next_item() {
        items += 1;
        assert!(items <= 2 * budget + 16, "parser yields items without new input");
        if let Item::Head(head) = &item {
            // A bodiless response must be handled like the correlator does.
            let _ = head;
        }
    }
}

const CONNS: u32 = 4;
const CLIENT_PID: u32 = 100;
const SERVER_PID: u32 = 200;

/// One exchange's four events in causal order.
fn exchange_events(conn: u32, id: u32, t: u64) -> [Event; 4] {
    let method = ["GET", "POST", "PUT", "DELETE"][(id % 4) as usize];
    let path = format!("/c{conn}/r{id}");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    let resp = format!("HTTP/1.1 200 OK\r\nX-Echo: {method} {path}\r\nContent-Length: 0\r\n\r\n");
    let client = format!("127.0.0.1:{}", 40_000 + conn);
    let server = "127.0.0.2:8080".to_owned();
    [
        event(CLIENT_PID + conn, Direction::Egress, &req, t, &client, &server),
        event(SERVER_PID + conn, Direction::Ingress, &req, t + 1, &server, &client),
        event(SERVER_PID + conn, Direction::Egress, &resp, t + 2, &server, &client),
        event(CLIENT_PID + conn, Direction::Ingress, &resp, t + 3, &client, &server),
    ]
}

fn event(tgid: u32, direction: Direction, payload: &str, t: u64, local: &str, remote: &str) -> Event {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"fuzz");
    Event {
        ktime_ns: t,
        conn: ConnKey {
            tgid,
            fd: 7,
            conn_id: 1,
        },
        tid: tgid,
        cgroup_id: 1,
        comm: Comm(comm),
        new_conn: false,
        seq: 0,
        socket: SocketInfo {
            local: local.parse().ok(),
            remote: remote.parse().ok(),
            accepted: false,
            connected: false,
            ino: 0,
            tls: false,
        },
        ctx: None,
        body: EventBody::Data {
            direction,
            len: payload.len() as u64,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            sent_ns: 0,
        },
    }
}

/// Which faults the correlator harness may inject.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub lose: bool,
    pub duplicate: bool,
    pub reorder: bool,
    pub close: bool,
    pub split: bool,
    /// Events carry the kernel's per-connection numbers (taken in true
    /// order, also by lost events), which reveal loss.
    pub numbered: bool,
}

impl Faults {
    pub const ALL: Faults = Faults {
        lose: true,
        duplicate: true,
        reorder: true,
        close: true,
        split: true,
        numbered: true,
    };
}

/// Result of one correlator run, for the caller's statistics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CorrelatorRun {
    pub events: usize,
    pub spans: usize,
}

/// The correlator fed the events of exchanges on a few connections,
/// interleaved, with events lost, duplicated, reordered and split as the
/// input says. Invariants: no panic; no span carries another request's
/// method or path (every response echoes its request, so a span whose
/// echo differs was paired wrongly); state is released once idle.
pub fn correlator(data: &[u8], faults: Faults) -> CorrelatorRun {
    let stats = Arc::new(Stats::default());
    let limits = Limits {
        max_conns: 64,
        ..Limits::default()
    };
    let policy = HeaderPolicy::new(&[], &["x-echo".to_owned()], &[]);
    let mut c = Correlator::new(limits, policy, stats.clone());
    let mut input = Input { data, pos: 0 };
    let mut queues: Vec<std::collections::VecDeque<Event>> = (0..CONNS).map(|_| Default::default()).collect();
    let mut next_id = [0u32; CONNS as usize];
    let mut generation = [1u64; CONNS as usize];
    let mut t = 1_000_000u64;
    let mut spans = Vec::new();
    let mut run = CorrelatorRun::default();
    let mut held: Option<Event> = None;
    let mut numbers = std::collections::HashMap::new();
    while !input.done() {
        let op = input.byte();
        let conn = u32::from(op & 3);
        let q = &mut queues[conn as usize];
        if q.is_empty() {
            let id = next_id[conn as usize];
            next_id[conn as usize] += 1;
            q.extend(exchange_events(conn, id, t).map(|mut e| {
                e.conn.conn_id = generation[conn as usize];
                e
            }));
        }
        t += 10_000;
        let Some(mut ev) = q.pop_front() else { continue };
        ev.ktime_ns = t;
        let mut number = |ev: &Event| match (&ev.body, faults.numbered) {
            (EventBody::Data { .. }, true) => {
                let n = numbers.entry(ev.conn).or_insert(0);
                *n += 1;
                *n
            }
            _ => 0,
        };
        ev.seq = number(&ev);
        match op >> 2 {
            // Lost event.
            0..=2 if faults.lose => continue,
            // Duplicated event.
            3..=4 if faults.duplicate => {
                run.events += 1;
                c.handle(ev.clone(), &mut spans);
            }
            // Reordered: held back and delivered after the next event.
            5..=6 if faults.reorder => {
                if let Some(prev) = held.replace(ev) {
                    run.events += 1;
                    c.handle(prev, &mut spans);
                }
                continue;
            }
            // The connection ends mid-exchange (both sides close); the
            // next exchange on this slot is a new connection.
            7 if faults.close => {
                for side in [CLIENT_PID, SERVER_PID] {
                    let mut close = ev.clone();
                    close.conn.tgid = side + conn;
                    close.tid = side + conn;
                    close.body = EventBody::Close;
                    run.events += 1;
                    c.handle(close, &mut spans);
                }
                q.clear();
                generation[conn as usize] += 1;
                continue;
            }
            // Split in two syscalls.
            8..=10 if faults.split => {
                if let EventBody::Data { direction, payload, .. } = &ev.body {
                    let cut = usize::from(input.byte()) % payload.len().max(1);
                    let (a, b) = (payload.slice(..cut), payload.slice(cut..));
                    let mut first = ev.clone();
                    first.body = EventBody::Data {
                        direction: *direction,
                        len: a.len() as u64,
                        payload: a,
                        sent_ns: 0,
                    };
                    run.events += 1;
                    c.handle(first, &mut spans);
                    ev.body = EventBody::Data {
                        direction: *direction,
                        len: b.len() as u64,
                        payload: b,
                        sent_ns: 0,
                    };
                    ev.seq = number(&ev);
                }
            }
            // Time passes (idle sweeps, link waits).
            11 => c.tick(t + u64::from(input.byte()) * 10_000_000, &mut spans),
            _ => {}
        }
        if let Some(prev) = held.take() {
            run.events += 1;
            c.handle(prev, &mut spans);
        }
        run.events += 1;
        c.handle(ev, &mut spans);
        check(&spans);
        run.spans += spans.len();
        spans.clear();
    }
    c.tick(t + 3_600_000_000_000, &mut spans);
    c.flush(&mut spans);
    check(&spans);
    run.spans += spans.len();
    let tracked = stats.conns_tracked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(tracked, 0, "connections still tracked an hour after the last event");
    run
}

/// No span may carry another exchange's request.
fn check(spans: &[Span]) {
    for s in spans {
        let Some((_, echo)) = s.response_headers.iter().find(|(k, _)| k == "x-echo") else {
            continue;
        };
        let seen = format!("{} {}", s.method, s.path());
        assert_eq!(&seen, echo, "span paired with another request's response: {s:?}");
        let conn = s.process.pid % 100;
        assert!(
            s.path().starts_with(&format!("/c{conn}/")),
            "span on the wrong connection: {s:?}"
        );
    }
}

/// The HTTP/2 parser and stream matcher fed `data` (after the client
/// preface) as both directions of one connection, split into syscalls and
/// partly uncaptured as the input says. Invariants: no panic; a bounded
/// number of spans (at most one per stream header block seen); state
/// bounded while open and released on close.
pub fn http2(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let (ctl, body) = data.split_at(data.len().min(8));
    let stats = Arc::new(Stats::default());
    let mut c = Correlator::new(Limits::default(), HeaderPolicy::default(), stats.clone());
    let mut spans: Vec<Span> = Vec::new();
    let mut t = 1_000u64;
    let preface = meshless::http2::PREFACE;
    c.handle(
        event(
            CLIENT_PID,
            Direction::Egress,
            "",
            t,
            "127.0.0.1:40000",
            "127.0.0.2:8080",
        )
        .with_payload(preface, 0),
        &mut spans,
    );
    let mut at = 0;
    let mut i = 0;
    while at < body.len() {
        let k = ctl[i % ctl.len()];
        i += 1;
        let n = (usize::from(k % 128) + 1).min(body.len() - at);
        let missing = if k >= 250 { u64::from(k - 249) * 300 } else { 0 };
        let direction = if k & 0x80 != 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        t += 1_000;
        let ev = event(CLIENT_PID, direction, "", t, "127.0.0.1:40000", "127.0.0.2:8080")
            .with_payload(&body[at..at + n], missing);
        c.handle(ev, &mut spans);
        at += n;
        assert!(
            c.state_bytes() < 4 * 1024 * 1024,
            "state grows without bound: {}",
            c.state_bytes()
        );
    }
    assert!(spans.len() <= body.len() / 9 + 1, "more spans than frames");
    let mut close = event(
        CLIENT_PID,
        Direction::Egress,
        "",
        t + 1,
        "127.0.0.1:40000",
        "127.0.0.2:8080",
    );
    close.body = EventBody::Close;
    c.handle(close, &mut spans);
    c.tick(t + 10_000_000_000, &mut spans);
    assert!(spans.len() <= body.len() / 9 + 1, "more spans than frames");
}

trait WithPayload {
    fn with_payload(self, payload: &[u8], missing: u64) -> Self;
}

impl WithPayload for Event {
    fn with_payload(mut self, payload: &[u8], missing: u64) -> Self {
        if let EventBody::Data { direction, .. } = self.body {
            self.body = EventBody::Data {
                direction,
                len: payload.len() as u64 + missing,
                payload: Bytes::copy_from_slice(payload),
                sent_ns: 0,
            };
        }
        self
    }
}
