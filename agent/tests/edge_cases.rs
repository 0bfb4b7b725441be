//! Awkward traffic on the real kernel: headers in many small writes, header
//! blocks larger than the capture, incoming trace context, non-HTTP bytes.
mod support;

use std::time::Duration;

use support::*;

/// Starts `python3 -m http.server` in pod b and returns it.
fn python_server(pods: &PodPair, port: u16) -> Proc {
    let mut server = PodPair::cmd(&pods.b, "python3");
    // HTTP/1.1 so the connection stays open between requests.
    server.args([
        "-c",
        &format!(
            "import http.server as h\nh.SimpleHTTPRequestHandler.protocol_version='HTTP/1.1'\nh.ThreadingHTTPServer(('{}', {port}), h.SimpleHTTPRequestHandler).serve_forever()",
            pods.ip_b
        ),
    ]);
    server.current_dir("/");
    let p = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    p
}

#[test]
fn request_headers_arriving_in_many_small_writes_give_one_span_pair() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8101;
    let _server = python_server(&pods, port);
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{ip}", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
req = b"GET /etc/hostname HTTP/1.1\r\nHost: x\r\nUser-Agent: slow-writer/1.0\r\nX-Request-Id: slow-1\r\n\r\n"
for i in range(0, len(req), 7):
    s.sendall(req[i:i+7])
    time.sleep(0.01)
data = b""
while b"\r\n\r\n" not in data:
    data += s.recv(4096)
assert data.startswith(b"HTTP/1.1 200"), data
s.close()
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &script]);
    run(py);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for s in &spans {
        assert_eq!(attr_str(s, "url.path"), "/etc/hostname");
        assert_eq!(attr_str(s, "user_agent.original"), "slow-writer/1.0");
        assert_eq!(
            attr(s, "http.request.header.x-request-id"),
            &serde_json::json!(["slow-1"])
        );
        assert_eq!(attr_u64(s, "http.response.status_code"), 200);
    }
}

#[test]
fn header_block_larger_than_the_capture_keeps_method_and_path_and_is_marked_truncated() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8102;
    let _server = python_server(&pods, port);
    let fill = "a".repeat(12_000); // past the 8 KiB head capture (2 KiB + continuations)
    let url = format!("http://{}:{port}/etc/hostname", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-o", "/dev/null", "-H", &format!("X-Fill: {fill}"), &url]);
    run(curl);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for s in &spans {
        assert_eq!(attr_str(s, "http.request.method"), "GET");
        assert_eq!(attr_str(s, "url.path"), "/etc/hostname");
        assert_eq!(attr_u64(s, "http.response.status_code"), 200);
        assert_eq!(attr(s, "meshless.capture.truncated"), &serde_json::json!(true));
    }
}

#[test]
fn incoming_traceparent_makes_the_server_span_its_child() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8103;
    let _server = python_server(&pods, port);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let url = format!("http://{}:{port}/etc/hostname", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "-H",
        &format!("traceparent: 00-{trace}-{parent}-01"),
        "-H",
        "tracestate: vendor=abc",
        &url,
    ]);
    run(curl);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans.iter().find(|s| kind(s) == "SERVER").expect("server span");
    assert_eq!(server["trace_id"], trace);
    assert_eq!(server["parent_span_id"], parent);
    assert_eq!(server["trace_state"], "vendor=abc");
    assert_ne!(server["span_id"], parent);
    let client = spans.iter().find(|s| kind(s) == "CLIENT").expect("client span");
    assert_eq!(
        client["trace_id"], trace,
        "the caller's outgoing context names the trace"
    );
    assert_eq!(
        client["parent_span_id"], parent,
        "the app's own span (named in its header) is the client span's parent"
    );
    assert_ne!(client["span_id"], parent, "no two spans share an id");
}

/// Istio/Zipkin meshes send B3 instead of W3C: the single `b3` header and
/// the `x-b3-*` set both make the server span a child of the caller's span.
#[test]
fn incoming_b3_single_and_multi_headers_make_the_server_span_their_child() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8107;
    let _server = python_server(&pods, port);
    let cases = [
        (
            "/etc/hostname",
            "80f198ee56343ba864fe8b2a57d3eff7",
            "e457b5a2e4d86bd1",
            vec!["b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1".to_owned()],
        ),
        (
            "/etc/os-release",
            "463ac35c9f6413ad48485a3953bb6124",
            "a2fb4a1d1a96d312",
            vec![
                "X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124".to_owned(),
                "X-B3-SpanId: a2fb4a1d1a96d312".to_owned(),
                "X-B3-Sampled: 1".to_owned(),
            ],
        ),
    ];
    for (path, trace, parent, headers) in &cases {
        let url = format!("http://{}:{port}{path}", pods.ip_b);
        let mut curl = PodPair::cmd(&pods.a, "curl");
        curl.args(["-s", "-o", "/dev/null"]);
        for h in headers {
            curl.args(["-H", h]);
        }
        curl.arg(&url);
        run(curl);
        let path = *path;
        let spans = agent.collect(
            |s| to_server(&pods.ip_b, port)(s) && attr_str(s, "url.path") == path,
            2,
            Duration::from_secs(10),
        );
        let server = spans.iter().find(|s| kind(s) == "SERVER").expect("server span");
        assert_eq!(server["trace_id"], *trace, "{path}: {server:#?}");
        assert_eq!(server["parent_span_id"], *parent, "{path}: {server:#?}");
        assert_ne!(server["span_id"], *parent);
    }
}

#[test]
fn non_http_bytes_and_a_tls_client_hello_produce_no_span_and_no_error() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8104;
    let sink = format!(
        r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("{ip}", {port})); l.listen(16)
def serve(c):
    while c.recv(65536): c.sendall(b"\x00\x01binary reply")
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,)).start()
"#,
        ip = pods.ip_b
    );
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args(["-c", &sink]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    let client = format!(
        r#"
import os, socket
hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\x00\x00\x02\x13\x01\x01\x00"
for payload in [os.urandom(3000), hello, b"\x00\x00\x00\x01GET / nothing", b"HTTP/9 garbage\r\n\r\n"]:
    s = socket.create_connection(("{ip}", {port}))
    s.sendall(payload)
    s.recv(100)
    s.close()
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &client]);
    run(py);
    let spans = agent.settle(to_server(&pods.ip_b, port), Duration::from_secs(1));
    assert!(spans.is_empty(), "{spans:#?}");
    let (status, stderr) = agent.stop();
    assert!(status.success());
    let errors: Vec<_> = stderr
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}
