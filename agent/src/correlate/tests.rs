use std::sync::Arc;

use bytes::Bytes;
use meshless_common::Direction;

use super::*;
use crate::{capture::SocketInfo, privacy::HeaderPolicy};

const CLIENT: &str = "10.0.0.1:40000";
const SERVER: &str = "10.0.0.2:80";

fn data(tgid: u32, fd: u32, dir: Direction, bytes: &'static [u8], t: u64, local: &str, remote: &str) -> Event {
    Event {
        ktime_ns: t,
        conn: ConnKey { tgid, fd, conn_id: 1 },
        tid: tgid,
        cgroup_id: 1,
        comm: comm(&format!("p{tgid}")),
        new_conn: false,
        ctx: None,
        socket: SocketInfo {
            local: local.parse().ok(),
            remote: remote.parse().ok(),
            accepted: false,
            connected: false,
        },
        body: EventBody::Data {
            direction: dir,
            len: bytes.len() as u64,
            payload: Bytes::from_static(bytes),
        },
    }
}

fn comm(name: &str) -> crate::capture::event::Comm {
    let mut raw = [0u8; 16];
    raw[..name.len()].copy_from_slice(name.as_bytes());
    crate::capture::event::Comm(raw)
}

fn correlator() -> Correlator {
    Correlator::new(Limits::default(), HeaderPolicy::default(), Arc::new(Stats::default()))
}

const REQ: &[u8] = b"GET /items/42 HTTP/1.1\r\nHost: x\r\nx-request-id: r-1\r\n\r\n";
const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[test]
fn links_the_server_span_to_the_local_client_span() {
    let mut c = correlator();
    let mut spans = Vec::new();
    // Server reads before the client's write event is processed: order must not matter.
    c.handle(data(2, 5, Direction::Ingress, REQ, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    assert!(spans.is_empty(), "server span waits for its client side");
    c.handle(data(1, 3, Direction::Egress, REQ, 5, CLIENT, SERVER), &mut spans);
    c.handle(data(1, 3, Direction::Ingress, RESP, 25, CLIENT, SERVER), &mut spans);
    assert_eq!(spans.len(), 2);
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server span");
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).expect("client span");
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(client.parent_span_id, None);
    assert_eq!(server.name(), "GET /items/*");
    assert_eq!(server.status_code, Some(200));
    assert_eq!(server.client, CLIENT.parse().ok());
    assert_eq!(client.server, SERVER.parse().ok());
    assert_eq!(server.end_unix_nano - server.start_unix_nano, 10);
}

#[test]
fn a_server_span_without_a_local_client_is_released_after_the_wait() {
    let mut c = correlator();
    let mut spans = Vec::new();
    c.handle(data(2, 5, Direction::Ingress, REQ, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    c.tick(20 + Limits::default().link_wait_ns, &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, None);
}

#[test]
fn incoming_traceparent_makes_the_server_span_its_child() {
    let mut c = correlator();
    let mut spans = Vec::new();
    let req: &'static [u8] = b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\n\r\n";
    c.handle(data(2, 5, Direction::Ingress, req, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        spans[0].parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(spans[0].trace_state.as_deref(), Some("k=v"));
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut c = correlator();
    let mut spans = Vec::new();
    c.handle(
        data(
            1,
            3,
            Direction::Egress,
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            1,
            CLIENT,
            SERVER,
        ),
        &mut spans,
    );
    c.handle(
        data(
            1,
            3,
            Direction::Ingress,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            2,
            CLIENT,
            SERVER,
        ),
        &mut spans,
    );
    c.handle(
        data(
            1,
            3,
            Direction::Ingress,
            b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
            3,
            CLIENT,
            SERVER,
        ),
        &mut spans,
    );
    let got: Vec<_> = spans.iter().map(|s| (s.path().to_owned(), s.status_code)).collect();
    assert_eq!(
        got,
        [
            ("/a".into(), Some(200)),
            ("/b".into(), Some(404)),
            ("/c".into(), Some(500))
        ]
    );
    assert!(
        spans[1].is_error() && spans[2].is_error(),
        "4xx and 5xx are errors on client spans"
    );
}

#[test]
fn close_ends_a_response_delimited_by_close_and_counts_unanswered() {
    let stats = Arc::new(Stats::default());
    let mut c = Correlator::new(Limits::default(), HeaderPolicy::default(), stats.clone());
    let mut spans = Vec::new();
    c.handle(
        data(
            1,
            3,
            Direction::Egress,
            b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
            1,
            CLIENT,
            SERVER,
        ),
        &mut spans,
    );
    c.handle(
        data(
            1,
            3,
            Direction::Ingress,
            b"HTTP/1.0 200 OK\r\n\r\nbody",
            2,
            CLIENT,
            SERVER,
        ),
        &mut spans,
    );
    assert!(spans.is_empty());
    let close = Event {
        body: EventBody::Close,
        ..data(1, 3, Direction::Egress, b"", 3, CLIENT, SERVER)
    };
    c.handle(close, &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].protocol_version, "1.0");
    assert_eq!(stats.spans_unanswered.load(std::sync::atomic::Ordering::Relaxed), 1);
}
