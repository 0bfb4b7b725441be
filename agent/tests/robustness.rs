//! Do no harm, on the real kernel: traffic that tries to blow up metric
//! cardinality, clients that give up, pipelined responses larger than the
//! capture, and request-target forms that are not a plain path.
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// A raw HTTP/1.1 server in pod b: answers every complete request in what
/// it has read with one `sendall` (so pipelined responses coalesce), echoes
/// the path as the body (3000 bytes for `/big…`), waits 3 s for `/slow`.
/// Empty lines before a request line are skipped (RFC 9112 section 2.2).
fn raw_server(pods: &PodPair, port: u16) -> Proc {
    let serve = r#"
def serve(c):
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        buf += d
        out = b""
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            head = head.lstrip(b"\r\n")
            if not head:
                continue
            parts = head.split(b"\r\n")[0].split(b" ")
            target = parts[1] if len(parts) > 1 else b"/"
            if b"slow" in target:
                time.sleep(3)
            body = b"x" * 3000 if b"/big" in target else target
            out += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        if out:
            try:
                c.sendall(out)
            except OSError:
                break
    c.close()
"#;
    python_conn_server(pods, port, serve)
}

/// Runs a Python client in pod a with `IP`/`PORT` defined.
fn client(pods: &PodPair, port: u16, body: &str) {
    let script = format!(
        "import socket, time\nIP = {ip:?}\nPORT = {port}\n{body}",
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &script]);
    run(py);
}

fn client_spans(agent: &Agent, pods: &PodPair, port: u16, n: usize) -> Vec<Value> {
    let to = to_server(&pods.ip_b, port);
    agent.collect(move |s| to(s) && kind(s) == "CLIENT", n, Duration::from_secs(15))
}

/// Label sets of one histogram family whose labels match.
fn series(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Vec<String> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| format!("{:?}", s.labels))
        .collect()
}

#[test]
fn three_thousand_method_tokens_on_one_connection_stay_bounded_in_metrics() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8301;
    let _server = raw_server(&pods, port);
    client(
        &pods,
        port,
        r#"
s = socket.create_connection((IP, PORT))
def ask(method):
    s.sendall(method.encode() + b" /m HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"/m"):
        data += s.recv(4096)
ask("GET")
for i in range(3000):
    ask("X%04d" % i)
s.close()
"#,
    );
    let spans = agent.wait_for(
        to_server(&pods.ip_b, port),
        |s| s.len() >= 2 * 3001,
        Duration::from_secs(30),
    );
    assert!(spans.len() >= 2 * 3000, "{} spans", spans.len());
    let other = spans
        .iter()
        .find(|s| attr_str(s, "http.request.method_original") == "X0042")
        .expect("a span for method X0042");
    assert_eq!(attr_str(other, "http.request.method"), "_OTHER");
    assert_eq!(other["name"], "_OTHER /m");
    let scrape = scrape(&agent);
    let port_s = port.to_string();
    let server_series = series(
        &scrape,
        "http_server_request_duration_seconds",
        &[("server_port", &port_s)],
    );
    assert!(
        (1..=3).contains(&server_series.len()),
        "GET and _OTHER only: {server_series:#?}"
    );
    let others = metric_sum(
        &scrape,
        "http_server_request_duration_seconds",
        &[("server_port", &port_s), ("http_request_method", "_OTHER")],
    );
    assert_eq!(others, 3000.0);
    let client_series = series(
        &scrape,
        "http_client_request_duration_seconds",
        &[("server_port", &port_s)],
    );
    assert!((1..=3).contains(&client_series.len()), "{client_series:#?}");
}

#[test]
fn a_client_that_gives_up_before_the_response_gets_a_span_with_error_type() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8302;
    let _server = raw_server(&pods, port);
    client(
        &pods,
        port,
        r#"
import struct
# Times out, then closes.
s = socket.create_connection((IP, PORT), timeout=0.5)
s.sendall(b"GET /slow-timeout HTTP/1.1\r\nHost: x\r\n\r\n")
try:
    s.recv(4096)
except socket.timeout:
    pass
s.close()
# Resets the connection (SO_LINGER 0).
s = socket.create_connection((IP, PORT))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.sendall(b"GET /slow-reset HTTP/1.1\r\nHost: x\r\n\r\n")
time.sleep(0.2)
s.close()
"#,
    );
    let spans = client_spans(&agent, &pods, port, 2);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for s in &spans {
        assert!(attr_str(s, "url.path").starts_with("/slow-"));
        assert_eq!(attr_str(s, "error.type"), "connection_closed");
        assert_eq!(s["status"]["code"], "ERROR");
        assert!(s["attributes"].get("http.response.status_code").is_none(), "{s:#?}");
    }
    let scrape = scrape(&agent);
    let port_s = port.to_string();
    let errors = metric_sum(
        &scrape,
        "http_client_request_duration_seconds",
        &[("server_port", &port_s), ("error_type", "connection_closed")],
    );
    assert_eq!(errors, 2.0);
    let istio = metric_sum(
        &scrape,
        "istio_requests_total",
        &[("reporter", "source"), ("response_code", "0"), ("response_flags", "DC")],
    );
    assert!(
        istio >= 2.0,
        "istio_requests_total with response_code 0 and DC: {istio}"
    );
}

#[test]
fn pipelined_responses_larger_than_the_capture_give_every_client_span() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8303;
    let _server = raw_server(&pods, port);
    client(
        &pods,
        port,
        r#"
s = socket.create_connection((IP, PORT))
s.sendall(b"".join(b"GET /big%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4)))
time.sleep(0.3)
data = b""
while data.count(b"HTTP/1.1 200") < 4 or not data.endswith(b"x" * 3000):
    data += s.recv(65536)
s.close()
"#,
    );
    let spans = client_spans(&agent, &pods, port, 4);
    let mut paths: Vec<&str> = spans.iter().map(|s| attr_str(s, "url.path")).collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/big0", "/big1", "/big2", "/big3"], "{spans:#?}");
    for s in &spans {
        if let Some(code) = s["attributes"].get("http.response.status_code") {
            assert_eq!(code, 200, "a status is the request's own");
        } else {
            assert_eq!(attr(s, "meshless.capture.truncated"), &serde_json::json!(true));
            assert_ne!(s["status"]["code"], "ERROR", "an uncaptured response is no error");
        }
    }
}

#[test]
fn absolute_and_authority_form_targets_give_url_path_and_server_address() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8304;
    let _server = raw_server(&pods, port);
    client(
        &pods,
        port,
        r#"
for req in [b"GET http://shop.test:8080/cart?id=1 HTTP/1.1\r\nHost: shop.test:8080\r\n\r\n",
            b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n"]:
    s = socket.create_connection((IP, PORT))
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    time.sleep(0.1)
    s.close()
"#,
    );
    // server.address is the target's host here, so select by the client pod.
    let ip_a: &str = &pods.ip_a;
    let spans = agent.collect(
        move |s| attr_str(s, "client.address") == ip_a,
        4,
        Duration::from_secs(15),
    );
    assert_eq!(spans.len(), 4, "{spans:#?}");
    for s in spans.iter().filter(|s| attr_str(s, "http.request.method") == "GET") {
        assert_eq!(attr_str(s, "url.path"), "/cart");
        assert_eq!(attr_str(s, "server.address"), "shop.test");
        assert_eq!(attr_u64(s, "server.port"), 8080);
        assert_eq!(s["name"], "GET /cart");
    }
    for s in spans.iter().filter(|s| attr_str(s, "http.request.method") == "CONNECT") {
        assert!(s["attributes"].get("url.path").is_none(), "{s:#?}");
        assert_eq!(attr_str(s, "server.address"), "db.test");
        assert_eq!(attr_u64(s, "server.port"), 5432);
        assert_eq!(s["name"], "CONNECT");
    }
}

#[test]
fn a_request_preceded_by_empty_lines_gives_a_span() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8305;
    let _server = raw_server(&pods, port);
    client(
        &pods,
        port,
        r#"
s = socket.create_connection((IP, PORT))
for req in [b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\nGET /after-empty-lines HTTP/1.1\r\nHost: x\r\n\r\n"]:
    s.sendall(req)
    data = b""
    while not data.endswith(req.split(b" ")[1]):
        data += s.recv(4096)
s.close()
"#,
    );
    let to = to_server(&pods.ip_b, port);
    let spans = agent.collect(
        move |s| to(s) && attr_str(s, "url.path") == "/after-empty-lines",
        2,
        Duration::from_secs(15),
    );
    assert_eq!(spans.len(), 2, "client and server span: {spans:#?}");
}
