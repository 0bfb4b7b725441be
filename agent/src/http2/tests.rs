//! The HTTP/2 matcher through the correlator: spans per stream.
use std::sync::Arc;

use bytes::Bytes;
use meshless_common::Direction;

use crate::{
    capture::{event::Comm, ConnKey, Event, EventBody, SocketInfo},
    correlate::{Correlator, Limits},
    privacy::HeaderPolicy,
    span::{Span, SpanKind, Unanswered},
    stats::Stats,
};

const CLIENT: &str = "10.0.0.1:40000";
const SERVER: &str = "10.0.0.2:50051";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One side of a connection: its own HPACK encoders, one per direction.
struct Peer {
    tgid: u32,
    local: &'static str,
    remote: &'static str,
    requests: loona_hpack::Encoder<'static>,
    responses: loona_hpack::Encoder<'static>,
}

impl Peer {
    fn new(tgid: u32, local: &'static str, remote: &'static str) -> Self {
        Self {
            tgid,
            local,
            remote,
            requests: loona_hpack::Encoder::new(),
            responses: loona_hpack::Encoder::new(),
        }
    }

    fn event(&self, direction: Direction, bytes: Vec<u8>, t: u64) -> Event {
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(b"peer");
        Event {
            ktime_ns: t,
            conn: ConnKey {
                tgid: self.tgid,
                fd: 7,
                conn_id: 1,
            },
            tid: self.tgid,
            cgroup_id: 1,
            comm: Comm(raw),
            new_conn: false,
            seq: 0,
            ctx: None,
            socket: SocketInfo {
                local: self.local.parse().ok(),
                remote: self.remote.parse().ok(),
                accepted: false,
                connected: false,
                ino: 0,
                tls: false,
            },
            body: EventBody::Data {
                direction,
                len: bytes.len() as u64,
                payload: Bytes::from(bytes),
                sent_ns: 0,
            },
        }
    }

    fn request(&mut self, stream: u32, path: &str, grpc: bool, end: bool) -> Vec<u8> {
        let mut h = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "svc:50051"),
        ];
        if grpc {
            h.push(("content-type", "application/grpc"));
            h.push(("te", "trailers"));
        }
        let block = self
            .requests
            .encode(h.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        frame(1, 0x4 | u8::from(end), stream, &block)
    }

    fn response(&mut self, stream: u32, headers: &[(&str, &str)], end: bool) -> Vec<u8> {
        let block = self
            .responses
            .encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        frame(1, 0x4 | u8::from(end), stream, &block)
    }
}

fn correlator() -> (Correlator, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    (
        Correlator::new(Limits::default(), HeaderPolicy::default(), stats.clone()),
        stats,
    )
}

fn preface() -> Vec<u8> {
    let mut b = super::PREFACE.to_vec();
    b.extend(frame(4, 0, 0, &[]));
    b
}

#[test]
fn a_hundred_concurrent_streams_become_a_hundred_client_spans() {
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let mut out = preface();
    for i in 0..100u32 {
        out.extend(peer.request(2 * i + 1, &format!("/items/{i}"), false, true));
    }
    c.handle(peer.event(Direction::Egress, out, 10), &mut spans);
    // Answered in reverse order, each with a DATA frame that ends it.
    for i in (0..100u32).rev() {
        let mut back = peer.response(2 * i + 1, &[(":status", "200")], false);
        back.extend(frame(0, 1, 2 * i + 1, b"ok"));
        c.handle(peer.event(Direction::Ingress, back, 100 + u64::from(i)), &mut spans);
    }
    assert_eq!(spans.len(), 100);
    for s in &spans {
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(s.protocol_version, "2");
        assert_eq!(s.status_code, Some(200));
        let i: u64 = s.target().trim_start_matches("/items/").parse().expect("path");
        assert_eq!(s.end_unix_nano - s.start_unix_nano, 100 + i - 10, "paired by stream id");
    }
}

#[test]
fn an_answer_whose_event_came_before_its_request_still_answers_it() {
    // A Go client: the answers to streams 1 and 3 were read before the
    // writes of their requests got to their exits (sent at 10 and 30).
    let (mut c, stats) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let mut first = preface();
    first.extend(peer.request(5, "/items/5", false, true));
    c.handle(peer.event(Direction::Egress, first, 5), &mut spans);
    let mut back = peer.response(1, &[(":status", "201")], false);
    back.extend(frame(0, 1, 1, b"ok"));
    c.handle(peer.event(Direction::Ingress, back, 20), &mut spans);
    let back = peer.response(3, &[(":status", "404")], false);
    c.handle(peer.event(Direction::Ingress, back, 40), &mut spans);
    let (one, three) = (
        peer.request(1, "/items/1", false, true),
        peer.request(3, "/items/3", false, true),
    );
    let mut late = peer.event(Direction::Egress, one, 50);
    let mut later = peer.event(Direction::Egress, three, 55);
    for (ev, sent) in [(&mut late, 10), (&mut later, 30)] {
        if let EventBody::Data { sent_ns, .. } = &mut ev.body {
            *sent_ns = sent;
        }
    }
    c.handle(late, &mut spans);
    c.handle(later, &mut spans);
    // Stream 3's body ends after its request came.
    c.handle(peer.event(Direction::Ingress, frame(0, 1, 3, b"no"), 60), &mut spans);
    let five = peer.response(5, &[(":status", "200")], true);
    c.handle(peer.event(Direction::Ingress, five, 70), &mut spans);
    spans.sort_by_key(|s| s.target().to_string());
    let got: Vec<_> = spans
        .iter()
        .map(|s| {
            (
                s.target().to_string(),
                s.status_code,
                s.end_unix_nano - s.start_unix_nano,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/items/1".to_string(), Some(201), 10),
            ("/items/3".to_string(), Some(404), 30),
            ("/items/5".to_string(), Some(200), 65),
        ]
    );
    let early = stats.http_early_responses.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(early, 2);
    assert_eq!(
        stats.http_orphan_responses.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn answers_on_streams_whose_requests_never_come_are_bounded_and_counted() {
    let (mut c, stats) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    c.handle(peer.event(Direction::Egress, preface(), 5), &mut spans);
    for i in 0..100u32 {
        let back = peer.response(2 * i + 1, &[(":status", "200")], true);
        c.handle(peer.event(Direction::Ingress, back, 10 + u64::from(i)), &mut spans);
    }
    assert!(c.state_bytes() < 64 * 1024, "{} bytes kept", c.state_bytes());
    let close = Event {
        body: EventBody::Close,
        ..peer.event(Direction::Egress, Vec::new(), 200)
    };
    c.handle(close, &mut spans);
    assert!(spans.is_empty());
    assert_eq!(
        stats.http_orphan_responses.load(std::sync::atomic::Ordering::Relaxed),
        100
    );
}

fn grpc_call(peer: &mut Peer, stream: u32, trailers: &[(&str, &str)]) -> (Vec<u8>, Vec<u8>) {
    let mut req = peer.request(stream, "/helloworld.Greeter/SayHello", true, false);
    req.extend(frame(0, 1, stream, &[0, 0, 0, 0, 2, 8, 1]));
    let mut resp = peer.response(
        stream,
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    resp.extend(frame(0, 0, stream, &[0, 0, 0, 0, 0]));
    resp.extend(peer.response(stream, trailers, true));
    (req, resp)
}

#[test]
fn a_grpc_server_span_carries_service_method_and_trailer_status() {
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(2, SERVER, CLIENT);
    let (req, resp) = grpc_call(&mut peer, 1, &[("grpc-status", "0")]);
    let mut first = preface();
    first.extend(req);
    c.handle(peer.event(Direction::Ingress, first, 10), &mut spans);
    c.handle(peer.event(Direction::Egress, resp, 20), &mut spans);
    c.flush(&mut spans);
    assert_eq!(spans.len(), 1);
    let s: &Span = &spans[0];
    assert_eq!(s.kind, SpanKind::Server);
    let rpc = s.rpc.as_ref().expect("grpc");
    assert_eq!(rpc.service, "helloworld.Greeter");
    assert_eq!(rpc.method, "SayHello");
    assert_eq!(rpc.grpc_status, Some(0));
    assert_eq!(s.name(), "helloworld.Greeter/SayHello");
    assert!(!s.is_error());
}

#[test]
fn a_trailers_only_error_sets_the_grpc_status() {
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let mut out = preface();
    out.extend(peer.request(1, "/pkg.Svc/Missing", true, true));
    c.handle(peer.event(Direction::Egress, out, 10), &mut spans);
    let back = peer.response(
        1,
        &[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "12"),
        ],
        true,
    );
    c.handle(peer.event(Direction::Ingress, back, 20), &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].rpc.as_ref().and_then(|r| r.grpc_status), Some(12));
    assert!(spans[0].is_error());
    assert_eq!(spans[0].error_type().as_deref(), Some("12"));
}

#[test]
fn rst_stream_and_goaway_end_spans_with_an_error_type() {
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let mut out = preface();
    for stream in [1, 3, 5] {
        out.extend(peer.request(stream, "/x", false, true));
    }
    c.handle(peer.event(Direction::Egress, out, 10), &mut spans);
    // The client cancels stream 1; the server goes away after stream 3.
    c.handle(
        peer.event(Direction::Egress, frame(3, 0, 1, &8u32.to_be_bytes()), 20),
        &mut spans,
    );
    let mut goaway = 3u32.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes());
    c.handle(peer.event(Direction::Ingress, frame(7, 0, 0, &goaway), 30), &mut spans);
    let why = |p: u32| {
        let _ = p;
        spans.iter().map(|s| s.unanswered).collect::<Vec<_>>()
    };
    assert_eq!(why(0), vec![Some(Unanswered::Reset), Some(Unanswered::GoAway)]);
    assert_eq!(spans[0].error_type().as_deref(), Some("stream_reset"));
}

#[test]
fn an_agent_started_mid_connection_never_takes_a_path_from_a_stale_table() {
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    // Before the agent, the client's encoder indexed ":path /old/path" at
    // 62. The agent sees the connection from here on: POST and http are
    // static (0x83, 0x86), the path a dynamic reference it never saw.
    let again = frame(1, 0x5, 3, &[0x83, 0x86, 0xbe]);
    c.handle(peer.event(Direction::Egress, again, 10), &mut spans);
    let new = peer.request(5, "/new", false, true);
    c.handle(peer.event(Direction::Egress, new, 11), &mut spans);
    for (stream, t) in [(3u32, 20u64), (5, 21)] {
        let back = peer.response(stream, &[(":status", "200")], true);
        c.handle(peer.event(Direction::Ingress, back, t), &mut spans);
    }
    assert_eq!(spans.len(), 2);
    let old = &spans[0];
    assert_eq!(old.method, "POST", "static entries are known");
    assert_eq!(old.target(), "", "unknown, not guessed");
    assert!(old.truncated, "marked as incomplete");
    assert_eq!(spans[1].target(), "/new", "literals after the start are read");
}

#[test]
fn malformed_frames_are_counted_not_fatal() {
    let (mut c, stats) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let mut out = preface();
    out.extend(frame(9, 4, 1, &[0x82])); // stray CONTINUATION
    c.handle(peer.event(Direction::Egress, out, 10), &mut spans);
    let next = peer.request(3, "/after", false, true);
    c.handle(peer.event(Direction::Egress, next, 20), &mut spans);
    let back = peer.response(3, &[(":status", "204")], true);
    c.handle(peer.event(Direction::Ingress, back, 30), &mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].target(), "/after");
    assert!(stats.http_malformed.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[test]
fn an_h2c_upgrade_answers_the_upgrade_request_on_stream_one() {
    let (mut c, _) = correlator();
    let mut spans = Vec::new();
    let mut peer = Peer::new(1, CLIENT, SERVER);
    let upgrade = b"GET /up HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    c.handle(peer.event(Direction::Egress, upgrade.to_vec(), 10), &mut spans);
    let switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    c.handle(peer.event(Direction::Ingress, switching.to_vec(), 20), &mut spans);
    let mut out = preface();
    out.extend(peer.request(3, "/second", false, true));
    c.handle(peer.event(Direction::Egress, out, 30), &mut spans);
    let mut back = frame(4, 0, 0, &[]);
    back.extend(peer.response(1, &[(":status", "200")], true));
    back.extend(peer.response(3, &[(":status", "404")], true));
    c.handle(peer.event(Direction::Ingress, back, 40), &mut spans);
    let got: Vec<(&str, Option<u16>, &str)> = spans
        .iter()
        .map(|s| (s.target(), s.status_code, s.protocol_version))
        .collect();
    assert_eq!(got, vec![("/up", Some(200), "2"), ("/second", Some(404), "2")]);
}
