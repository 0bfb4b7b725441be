//! Trace context: kernel-decided ids, headers the kernel could not see,
//! and same-node links through DNAT.
use std::sync::Arc;

use bytes::Bytes;
use meshless_common::Direction;

use super::*;
use crate::{
    capture::SocketInfo,
    privacy::HeaderPolicy,
    trace_context::{KernelCtx, ParentOrigin, SpanId, TraceId},
};

const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

struct Ev<'a> {
    tgid: u32,
    dir: Direction,
    bytes: &'a [u8],
    t: u64,
    local: &'a str,
    remote: &'a str,
    ctx: Option<KernelCtx>,
}

fn event(e: Ev<'_>) -> Event {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"proc");
    Event {
        ktime_ns: e.t,
        conn: ConnKey {
            tgid: e.tgid,
            fd: 3,
            conn_id: 1,
        },
        tid: e.tgid,
        cgroup_id: 1,
        comm: crate::capture::event::Comm(comm),
        new_conn: false,
        seq: 0,
        ctx: e.ctx,
        socket: SocketInfo {
            local: e.local.parse().ok(),
            remote: e.remote.parse().ok(),
            accepted: false,
            connected: false,
            ino: 0,
            tls: false,
        },
        body: EventBody::Data {
            direction: e.dir,
            len: e.bytes.len() as u64,
            payload: Bytes::copy_from_slice(e.bytes),
            sent_ns: 0,
        },
    }
}

fn kctx(trace: u8, span: u8, parent: Option<u8>, origin: ParentOrigin) -> KernelCtx {
    KernelCtx {
        trace_id: TraceId([trace; 16]),
        span_id: SpanId([span; 8]),
        parent: parent.map(|p| SpanId([p; 8])),
        sampled: true,
        origin,
        sent: true,
    }
}

fn correlator() -> Correlator {
    Correlator::new(Limits::default(), HeaderPolicy::default(), Arc::new(Stats::default()))
}

/// One exchange on one connection: request `req` in direction `dir`.
fn exchange(c: &mut Correlator, tgid: u32, kind: SpanKind, req: &[u8], ends: (&str, &str), ctx: Option<KernelCtx>) {
    let (req_dir, resp_dir) = match kind {
        SpanKind::Server => (Direction::Ingress, Direction::Egress),
        SpanKind::Client => (Direction::Egress, Direction::Ingress),
    };
    let mut spans = Vec::new();
    let (local, remote) = ends;
    c.handle(
        event(Ev {
            tgid,
            dir: req_dir,
            bytes: req,
            t: 10,
            local,
            remote,
            ctx,
        }),
        &mut spans,
    );
    c.handle(
        event(Ev {
            tgid,
            dir: resp_dir,
            bytes: RESP,
            t: 20,
            local,
            remote,
            ctx: None,
        }),
        &mut spans,
    );
    assert!(spans.is_empty() || spans.len() == 1);
    c.pending.extend(spans);
}

impl Correlator {
    fn done(&mut self) -> Vec<Span> {
        let mut spans = std::mem::take(&mut self.pending);
        self.flush(&mut spans);
        spans
    }
}

const GET: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn a_server_span_uses_the_ids_the_kernel_chose_from_the_callers_option() {
    let mut c = correlator();
    let k = kctx(1, 2, Some(3), ParentOrigin::TcpOption);
    exchange(
        &mut c,
        7,
        SpanKind::Server,
        GET,
        ("10.0.0.2:80", "10.0.0.1:5000"),
        Some(k),
    );
    let spans = c.done();
    assert_eq!(spans.len(), 1, "an option-linked span does not wait for a local client");
    let s = &spans[0];
    assert_eq!(
        (s.trace_id, s.span_id, s.parent_span_id),
        (k.trace_id, k.span_id, k.parent)
    );
    assert!(
        !s.parent_is_remote,
        "sampled like a root: the same trace-id ratio on every node"
    );
}

#[test]
fn an_option_saying_not_sampled_decides_like_a_remote_parent() {
    let mut c = correlator();
    let mut k = kctx(1, 2, Some(3), ParentOrigin::TcpOption);
    k.sampled = false;
    exchange(
        &mut c,
        7,
        SpanKind::Server,
        GET,
        ("10.0.0.2:80", "10.0.0.1:5000"),
        Some(k),
    );
    let s = &c.done()[0];
    assert!(s.parent_is_remote && !s.sampled);
}

#[test]
fn a_client_span_keeps_its_in_process_parent_from_the_kernel() {
    let mut c = correlator();
    let k = kctx(4, 5, Some(6), ParentOrigin::InProcess);
    exchange(
        &mut c,
        8,
        SpanKind::Client,
        GET,
        ("10.0.0.1:5000", "10.0.0.2:80"),
        Some(k),
    );
    let s = &c.done()[0];
    assert_eq!(
        (s.trace_id, s.span_id, s.parent_span_id),
        (k.trace_id, k.span_id, k.parent)
    );
    assert!(!s.parent_is_remote);
}

#[test]
fn an_apps_own_traceparent_is_the_parent_of_a_client_span_with_its_own_id() {
    let mut c = correlator();
    let req = b"GET /a HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
    let k = kctx(9, 10, None, ParentOrigin::None);
    exchange(
        &mut c,
        8,
        SpanKind::Client,
        req,
        ("10.0.0.1:5000", "10.0.0.2:80"),
        Some(k),
    );
    // The server on this node got the kernel's context through the option.
    let server = kctx(9, 11, Some(10), ParentOrigin::TcpOption);
    exchange(
        &mut c,
        9,
        SpanKind::Server,
        GET,
        ("10.0.0.2:80", "10.0.0.1:5000"),
        Some(server),
    );
    let spans = c.done();
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).expect("client");
    let srv = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server");
    assert_eq!(client.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(
        client.parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("b7ad6b7169203331")
    );
    assert_eq!(client.span_id, k.span_id, "never the header's span id");
    assert_eq!(
        srv.trace_id, client.trace_id,
        "the kernel's trace id is moved to the header's"
    );
    assert_eq!(srv.parent_span_id, Some(client.span_id));
}

#[test]
fn a_proxy_forwarding_its_callers_traceparent_parents_the_client_span_in_process() {
    let mut c = correlator();
    let req = b"GET /a HTTP/1.1\r\ntraceparent: 00-0909090909090909090909090909090a-0101010101010101-01\r\n\r\n";
    let mut k = kctx(9, 12, Some(13), ParentOrigin::InProcess);
    k.trace_id = TraceId(*b"\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x09\x0a");
    exchange(
        &mut c,
        8,
        SpanKind::Client,
        req,
        ("10.0.0.1:5000", "10.0.0.2:80"),
        Some(k),
    );
    let s = &c.done()[0];
    assert_eq!((s.span_id, s.parent_span_id), (k.span_id, k.parent));
}

#[test]
fn a_b3_header_sets_the_trace_when_the_kernel_saw_no_parent() {
    let mut c = correlator();
    let req = b"GET /a HTTP/1.1\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n";
    let k = kctx(1, 2, None, ParentOrigin::None);
    exchange(
        &mut c,
        7,
        SpanKind::Server,
        req,
        ("10.0.0.2:80", "10.0.0.1:5000"),
        Some(k),
    );
    let s = &c.done()[0];
    assert_eq!(s.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(
        s.parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("e457b5a2e4d86bd1")
    );
    assert_eq!(s.span_id, k.span_id);
}

#[test]
fn a_b3_header_of_another_trace_than_the_option_makes_the_server_a_child_of_the_apps_span() {
    // As the kernel does for `traceparent`: the caller's app named its own
    // span, which is the parent; the option (the caller's CLIENT span,
    // which becomes that span's sibling in the app's trace) loses.
    let mut c = correlator();
    let req = b"GET /a HTTP/1.1\r\nb3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\r\n";
    let k = kctx(1, 2, Some(3), ParentOrigin::TcpOption);
    exchange(
        &mut c,
        7,
        SpanKind::Server,
        req,
        ("10.0.0.2:80", "10.0.0.1:5000"),
        Some(k),
    );
    let s = &c.done()[0];
    assert_eq!(s.trace_id.to_string(), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(
        s.parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("e457b5a2e4d86bd1")
    );
    assert_eq!(s.span_id, k.span_id);
}

#[test]
fn without_options_a_call_through_a_dnatted_service_ip_still_links_on_this_node() {
    let mut c = correlator();
    // The client dialled the Service IP; the server sees its pod address.
    exchange(
        &mut c,
        1,
        SpanKind::Client,
        GET,
        ("10.1.0.5:40000", "10.96.0.10:80"),
        None,
    );
    exchange(
        &mut c,
        2,
        SpanKind::Server,
        GET,
        ("10.1.0.9:8080", "10.1.0.5:40000"),
        None,
    );
    let spans = c.done();
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).expect("client");
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server");
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(
        client.server,
        "10.96.0.10:80".parse().ok(),
        "the client span keeps what it dialled"
    );
}

#[test]
fn loopback_calls_in_two_namespaces_with_the_same_ports_do_not_link_across() {
    let mut c = correlator();
    exchange(
        &mut c,
        1,
        SpanKind::Client,
        GET,
        ("127.0.0.1:40000", "127.0.0.1:80"),
        None,
    );
    exchange(
        &mut c,
        2,
        SpanKind::Server,
        GET,
        ("127.0.0.1:8080", "127.0.0.1:40000"),
        None,
    );
    let spans = c.done();
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server");
    assert_eq!(server.parent_span_id, None);
}

#[test]
fn with_propagation_off_a_servers_own_calls_follow_it_into_its_local_clients_trace() {
    let mut c = correlator();
    let mut spans = Vec::new();
    let (cli, srv, down) = ("10.0.0.1:5000", "10.0.0.2:80", "10.0.0.3:90");
    let k_client = kctx(1, 2, None, ParentOrigin::None);
    let k_server = kctx(3, 4, None, ParentOrigin::None);
    let k_child = kctx(3, 5, Some(4), ParentOrigin::InProcess);
    let ev = |tgid, dir, bytes, t, local, remote, ctx| {
        event(Ev {
            tgid,
            dir,
            bytes,
            t,
            local,
            remote,
            ctx,
        })
    };
    c.handle(ev(1, Direction::Egress, GET, 10, cli, srv, Some(k_client)), &mut spans);
    c.handle(ev(2, Direction::Ingress, GET, 11, srv, cli, Some(k_server)), &mut spans);
    // The server calls downstream while serving, then answers.
    for mut e in [
        ev(2, Direction::Egress, GET, 12, "10.0.0.2:6000", down, Some(k_child)),
        ev(2, Direction::Ingress, RESP, 13, "10.0.0.2:6000", down, None),
    ] {
        e.conn.fd = 4;
        c.handle(e, &mut spans);
    }
    c.handle(ev(2, Direction::Egress, RESP, 14, srv, cli, None), &mut spans);
    c.handle(ev(1, Direction::Ingress, RESP, 15, cli, srv, None), &mut spans);
    c.flush(&mut spans);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(
        spans.iter().all(|s| s.trace_id == k_client.trace_id),
        "one trace: {spans:#?}"
    );
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server");
    assert_eq!(server.parent_span_id, Some(k_client.span_id));
    assert!(spans
        .iter()
        .any(|s| s.span_id == k_child.span_id && s.parent_span_id == Some(k_server.span_id)));
}
