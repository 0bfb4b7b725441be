//! "Do no harm" on the real kernel (issue 10, kernel side): only sockets are
//! followed, every connection's addresses are right, peeks do not shift
//! pairing, fd lifecycle ends connections, HTTP is detected by grammar (also
//! a byte at a time), and request heads past the capture size are seen.
mod support;

use std::{collections::HashSet, time::Duration};

use serde_json::Value;
use support::*;

/// A raw Python HTTP/1.1 server in pod b: keep-alive, answers any method
/// with 200 and echoes the path's last segment as a status when it is a
/// number (`/s/201` -> 201). `peek` makes it `recv(MSG_PEEK)` first.
fn raw_server(pods: &PodPair, port: u16, peek: bool) -> Proc {
    let script = format!(
        r#"
import socket, threading
PEEK = {peek}
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("{ip}", {port})); l.listen(512)
def serve(c):
    buf = b""
    while True:
        if PEEK:
            if not c.recv(16, socket.MSG_PEEK): break
        chunk = c.recv(65536)
        if not chunk: break
        buf += chunk
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            line = head.lstrip(b"\r\n").split(b"\r\n")[0].split(b" ")
            last = line[1].rsplit(b"/", 1)[-1] if len(line) > 1 else b""
            code = int(last) if last.isdigit() and 200 <= int(last) < 600 else 200
            c.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % code)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#,
        ip = pods.ip_b,
        peek = if peek { "True" } else { "False" },
    );
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args(["-c", &script]);
    let p = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    p
}

/// Runs a Python client script in pod a; returns its stdout.
fn python_in(ns: &str, script: &str) -> String {
    let mut py = PodPair::cmd(ns, "python3");
    py.args(["-c", script]);
    run(py)
}

fn method(span: &Value) -> String {
    let original = attr_str(span, "http.request.method_original");
    if original.is_empty() {
        attr_str(span, "http.request.method").to_owned()
    } else {
        original.to_owned()
    }
}

fn servers(spans: &[Value]) -> Vec<&Value> {
    spans.iter().filter(|s| kind(s) == "SERVER").collect()
}

#[test]
fn request_shaped_writes_to_dev_null_a_pipe_and_a_file_are_never_followed() {
    let _serial = serial();
    let agent = Agent::start();
    let before = scrape(&agent);
    let rss_before = agent.rss_kib();
    let dir = Scratch::new("hygiene-flood");
    let script = format!(
        r#"
import os, time
req = b"GET / HTTP/1.1\r\nHost: flood\r\n\r\n"
null = os.open("/dev/null", os.O_WRONLY)
r, w = os.pipe()
os.set_blocking(r, False)
f = os.open("{dir}/flood.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
n = 0
end = time.time() + 6
while time.time() < end:
    for _ in range(1000):
        os.write(null, req)
        os.write(w, req)
        os.write(f, req)
        n += 3
    try:
        while os.read(r, 65536): pass
    except BlockingIOError:
        pass
    os.lseek(f, 0, 0)
print(n)
"#,
        dir = dir.0.display()
    );
    let out = run({
        let mut c = std::process::Command::new("python3");
        c.args(["-c", &script]);
        c
    });
    let writes: f64 = out.trim().parse().expect("write count");
    assert!(writes > 10_000.0, "the flood ran ({writes} writes)");
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape(&agent);
    let delta = |name: &str| metric_sum(&after, name, &[]) - metric_sum(&before, name, &[]);
    let rss = agent.rss_kib();
    eprintln!(
        "flood: {writes} writes, events_sent +{}, non_socket_fds +{}, unconfirmed +{}, RSS {rss_before} -> {rss} KiB",
        delta("meshless_kernel_events_sent_total"),
        delta("meshless_kernel_non_socket_fds_total"),
        delta("meshless_kernel_unconfirmed_events_total"),
    );
    assert!(
        delta("meshless_kernel_non_socket_fds_total") >= 3.0,
        "the three fds were found not to be sockets"
    );
    assert!(
        delta("meshless_kernel_unconfirmed_events_total") <= 3.0,
        "at most one event per non-socket fd"
    );
    assert!(
        delta("meshless_kernel_events_sent_total") < writes / 10.0,
        "{} events for {writes} writes",
        delta("meshless_kernel_events_sent_total")
    );
    assert!(rss < 100 * 1024, "agent RSS {rss} KiB (was {rss_before} KiB)");
}

#[test]
fn a_server_that_peeks_before_reading_pairs_every_response_with_its_request() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8401;
    let _server = raw_server(&pods, port, true);
    let script = format!(
        r#"
import socket
s = socket.create_connection(("{ip}", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for code in (201, 202, 203):
    s.sendall(b"GET /s/%d HTTP/1.1\r\nHost: x\r\n\r\n" % code)
    data = b""
    while not data.endswith(b"ok"):
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 %d" % code), data
s.close()
"#,
        ip = pods.ip_b
    );
    python_in(&pods.a, &script);
    let spans = agent.collect(to_server(&pods.ip_b, port), 6, Duration::from_secs(10));
    let server = servers(&spans);
    assert_eq!(server.len(), 3, "{spans:#?}");
    for s in server {
        let path = attr_str(s, "url.path");
        let status = attr_u64(s, "http.response.status_code");
        assert_eq!(path, format!("/s/{status}"), "{s:#?}");
    }
}

#[test]
fn a_node_server_accepting_without_sockaddr_reports_every_client_port() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8402;
    let mut node = PodPair::cmd(&pods.b, "/usr/bin/node");
    node.args([
        "-e",
        &format!(
            "require('http').createServer((q, r) => r.end('ok')).listen({port}, '{}')",
            pods.ip_b
        ),
    ]);
    let _server = spawn(node);
    wait_port(&pods.a, &pods.ip_b, port);
    let n = 300;
    let script = format!(
        r#"
import socket
ports = []
for i in range({n}):
    s = socket.create_connection(("{ip}", {port}))
    ports.append(s.getsockname()[1])
    s.sendall(b"GET /one/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk: break
        data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data
    s.close()
print(" ".join(map(str, ports)))
"#,
        ip = pods.ip_b
    );
    let ports: HashSet<u64> = python_in(&pods.a, &script)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert_eq!(ports.len(), n);
    let spans = agent.wait_for(
        to_server(&pods.ip_b, port),
        |s| servers(s).len() >= n,
        Duration::from_secs(20),
    );
    let right = servers(&spans)
        .iter()
        .filter(|s| attr_str(s, "client.address") == pods.ip_a && ports.contains(&attr_u64(s, "client.port")))
        .count();
    eprintln!("node: {right} of {n} server spans with the right client ip:port");
    assert!(
        right >= n - 1,
        "{right} of {n} server spans have the right client ip:port ({} server spans)",
        servers(&spans).len()
    );
}

#[test]
fn requests_with_methods_outside_the_common_list_are_traced() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8403;
    let _server = raw_server(&pods, port, false);
    let methods = ["REPORT", "PURGE", "QUERY", "M-SEARCH", "LINK"];
    let script = format!(
        r#"
import socket
for m in {methods:?}:
    s = socket.create_connection(("{ip}", {port}))
    s.sendall(m.encode() + b" /m HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        data += s.recv(4096)
    s.close()
"#,
        ip = pods.ip_b
    );
    python_in(&pods.a, &script);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2 * methods.len(), Duration::from_secs(10));
    let seen: HashSet<String> = servers(&spans).iter().map(|s| method(s)).collect();
    for m in methods {
        assert!(seen.contains(m), "no server span for {m}: {seen:?}");
    }
}

#[test]
fn a_request_written_one_byte_per_write_and_after_an_empty_line_gives_a_span() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8404;
    let _server = raw_server(&pods, port, false);
    let script = format!(
        r#"
import socket, time
s = socket.create_connection(("{ip}", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for b in b"\r\nGET /bytewise/202 HTTP/1.1\r\nHost: x\r\n\r\n":
    s.send(bytes([b]))
    time.sleep(0.002)
data = b""
while not data.endswith(b"ok"):
    data += s.recv(4096)
assert data.startswith(b"HTTP/1.1 202"), data
s.close()
"#,
        ip = pods.ip_b
    );
    python_in(&pods.a, &script);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "client and server span: {spans:#?}");
    for s in &spans {
        assert_eq!(attr_str(s, "url.path"), "/bytewise/202", "{s:#?}");
        assert_eq!(attr_u64(s, "http.response.status_code"), 202);
    }
}

#[test]
fn traceparent_after_a_3_kb_cookie_is_honoured() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8405;
    let _server = raw_server(&pods, port, false);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let cookie = format!("session={}", "c".repeat(3000));
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        "-H",
        &format!("Cookie: {cookie}"),
        "-H",
        &format!("traceparent: 00-{trace}-{parent}-01"),
        &format!("http://{}:{port}/big/200", pods.ip_b),
    ]);
    run(curl);
    let spans = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(10));
    let server = servers(&spans);
    assert_eq!(server.len(), 1, "{spans:#?}");
    assert_eq!(server[0]["trace_id"], trace, "{:#?}", server[0]);
    // The server's parent is the header's span, or curl's client span
    // when that is the header's child (trace context in TCP options).
    let client = spans.iter().find(|s| kind(s) == "CLIENT");
    let via_client = client.is_some_and(|c| {
        c["parent_span_id"] == parent && server[0]["parent_span_id"] == c["span_id"] && c["trace_id"] == trace
    });
    assert!(server[0]["parent_span_id"] == parent || via_client, "{spans:#?}");
}

#[test]
fn dup2_over_a_followed_fd_and_fd_reuse_give_no_wrong_span() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8406;
    let _server = raw_server(&pods, port, false);
    let script = format!(
        r#"
import os, socket
def exchange(fd, path):
    os.write(fd, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok"):
        data += os.read(fd, 4096)
first = socket.create_connection(("{ip}", {port}))
exchange(first.fileno(), b"/first")
second = socket.create_connection(("{ip}", {port}))
os.dup2(second.fileno(), first.fileno())
exchange(first.fileno(), b"/second")
third_fd = first.fileno()
first.close()
# The fd number now names a file: request-shaped bytes there are no span.
f = os.open("/dev/null", os.O_WRONLY)
os.write(f, b"GET /not-a-socket HTTP/1.1\r\n\r\n")
os.close(f)
third = socket.create_connection(("{ip}", {port}))
exchange(third.fileno(), b"/third")
print(second.getsockname()[1], third.getsockname()[1], third_fd, third.fileno())
"#,
        ip = pods.ip_b
    );
    let out = python_in(&pods.a, &script);
    let nums: Vec<u64> = out.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    assert_eq!(nums.len(), 4, "{out}");
    let (second_port, third_port) = (nums[0], nums[1]);
    let spans = agent.collect(to_server(&pods.ip_b, port), 6, Duration::from_secs(10));
    let clients: Vec<&Value> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    assert_eq!(clients.len(), 3, "{spans:#?}");
    for s in &clients {
        let path = attr_str(s, "url.path");
        let want = match path {
            "/second" => second_port,
            "/third" => third_port,
            "/first" => continue,
            other => panic!("unexpected client span {other}: {s:#?}"),
        };
        assert_eq!(attr_u64(s, "client.port"), want, "{path}: {s:#?}");
    }
    for s in servers(&spans) {
        let path = attr_str(s, "url.path");
        assert!(["/first", "/second", "/third"].contains(&path), "{s:#?}");
    }
}
