//! Same-node linking: a server span waits for its local client's request
//! (its ids, or only its name when a header gave the ids), how long it
//! waits, and how many may wait.
use meshless_common::Direction;

use super::{
    tests::{correlator, counter, data, CLIENT, REQ, RESP, SERVER},
    *,
};

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
fn a_server_span_waits_for_its_client_from_when_the_agent_got_it() {
    // The agent is behind by a second: the client's event is queued behind
    // the server's, not late, and the span still links.
    let wait = Limits::default().link_wait_ns;
    let mut c = correlator();
    let mut spans = Vec::new();
    c.arrived(1_000_000_000);
    c.handle(data(2, 5, Direction::Ingress, REQ, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    c.tick(20 + wait + 1, &mut spans);
    assert!(spans.is_empty(), "the wait counts from when the agent got the events");
    c.arrived(1_000_000_000 + wait / 2);
    c.handle(data(1, 3, Direction::Egress, REQ, 25, CLIENT, SERVER), &mut spans);
    c.handle(data(1, 3, Direction::Ingress, RESP, 30, CLIENT, SERVER), &mut spans);
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server span");
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).expect("client span");
    assert_eq!(server.parent_span_id, Some(client.span_id));
    // With no client, the wait ends a link wait after the agent got it.
    let mut spans = Vec::new();
    let other = "10.0.0.9:40001";
    c.arrived(2_000_000_000);
    c.handle(data(2, 6, Direction::Ingress, REQ, 40, SERVER, other), &mut spans);
    c.handle(data(2, 6, Direction::Egress, RESP, 50, SERVER, other), &mut spans);
    c.tick(2_000_000_000 + wait - 1, &mut spans);
    assert!(spans.is_empty());
    c.tick(2_000_000_000 + wait, &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, None);
}

#[test]
fn the_link_wait_spans_two_drains_of_a_slow_poll() {
    use std::time::Duration;
    let default = Limits::default().link_wait_ns;
    assert_eq!(Limits::link_wait_for_poll(Duration::from_millis(50)), default);
    assert_eq!(Limits::link_wait_for_poll(Duration::from_millis(500)), 1_000_000_000);
}

#[test]
fn incoming_traceparent_makes_the_server_span_its_child() {
    let mut c = correlator();
    let mut spans = Vec::new();
    let req: &'static [u8] = b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\n\r\n";
    c.handle(data(2, 5, Direction::Ingress, req, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    assert!(spans.is_empty(), "it waits for a local client's name");
    c.tick(20 + Limits::default().link_wait_ns, &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].peer_comm, None);
    assert_eq!(spans[0].trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        spans[0].parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(spans[0].trace_state.as_deref(), Some("k=v"));
}

#[test]
fn a_server_span_with_header_ids_keeps_them_and_names_a_client_whose_event_came_late() {
    // The client's write returned (and its event came) after the server
    // had answered: the server span keeps the header's ids and still names
    // its client, as metrics' source workload needs.
    let mut c = correlator();
    let mut spans = Vec::new();
    let req: &'static [u8] =
        b"GET / HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
    c.handle(data(2, 5, Direction::Ingress, req, 10, SERVER, CLIENT), &mut spans);
    c.handle(data(2, 5, Direction::Egress, RESP, 20, SERVER, CLIENT), &mut spans);
    c.handle(data(1, 3, Direction::Egress, req, 25, CLIENT, SERVER), &mut spans);
    c.handle(data(1, 3, Direction::Ingress, RESP, 30, CLIENT, SERVER), &mut spans);
    assert_eq!(spans.len(), 2);
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).expect("server span");
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).expect("client span");
    assert_eq!(server.peer_comm, Some(client.process.name.clone()));
    assert_eq!(server.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        server.parent_span_id.map(|p| p.to_string()).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(
        server.peer_process, None,
        "ids came from the header, not the local client"
    );
}

#[test]
fn server_spans_held_for_their_client_are_bounded() {
    let mut c = correlator();
    let mut spans = Vec::new();
    let n = link::MAX_WAITING + 10;
    for i in 0..n {
        let client = format!("10.0.{}.{}:40000", i / 250, i % 250);
        let t = 10 + i as u64 * 10;
        let mut ev = data(2, 5, Direction::Ingress, REQ, t, SERVER, &client);
        ev.conn.conn_id = i as u64 + 1;
        c.handle(ev, &mut spans);
        let mut ev = data(2, 5, Direction::Egress, RESP, t + 5, SERVER, &client);
        ev.conn.conn_id = i as u64 + 1;
        c.handle(ev, &mut spans);
    }
    assert_eq!(spans.len(), 10, "past the bound, spans go out unlinked at once");
    assert_eq!(counter(&c, |s| &s.link_wait_overflows), 10);
    c.flush(&mut spans);
    assert_eq!(spans.len(), n);
}
