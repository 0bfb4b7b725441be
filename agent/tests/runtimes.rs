//! Go net/http and Node.js http: different syscall patterns (read/write,
//! writev, epoll, accept4 without a peer sockaddr) and chunked responses.
mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use support::*;

/// Builds the Go fixture once with Debian's Go.
fn goapp() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("goapp");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goapp/main.go");
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gocache");
    let mut cmd = Command::new("go");
    cmd.args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "");
    run(cmd);
    out
}

#[test]
fn go_client_to_go_server_gives_linked_spans() {
    let _serial = serial();
    let bin = goapp();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 9090;
    let mut server = PodPair::cmd(&pods.b, bin.to_str().expect("utf-8 path"));
    server.args(["server", &format!("{}:{port}", pods.ip_b)]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    for (path, n) in [("/hello", 3), ("/boom", 2)] {
        let mut client = PodPair::cmd(&pods.a, bin.to_str().expect("utf-8 path"));
        client.args(["client", &format!("http://{}:{port}{path}", pods.ip_b), &n.to_string()]);
        run(client);
    }
    let spans = agent.collect(to_server(&pods.ip_b, port), 10, Duration::from_secs(10));
    assert_eq!(spans.len(), 10, "{spans:#?}");
    for (path, status, n) in [("/hello", 200, 3), ("/boom", 500, 2)] {
        for k in ["SERVER", "CLIENT"] {
            let side: Vec<_> = spans
                .iter()
                .filter(|s| kind(s) == k && attr_str(s, "url.path") == path)
                .collect();
            assert_eq!(side.len(), n, "{k} {path}");
            assert!(
                side.iter().all(|s| attr_u64(s, "http.response.status_code") == status),
                "{k} {path}: {side:#?}"
            );
            assert!(side.iter().all(|s| attr_str(s, "process.executable.name") == "goapp"));
        }
    }
    let linked = spans.iter().filter(|s| kind(s) == "SERVER").all(|s| {
        spans
            .iter()
            .any(|c| kind(c) == "CLIENT" && c["span_id"] == s["parent_span_id"] && c["trace_id"] == s["trace_id"])
    });
    assert!(linked, "{spans:#?}");
}

/// The kernel dates written bytes at the call's start too (`sent_ns`):
/// what keeps an answer a Go client reads on another thread from passing
/// the request that asked for it. Checked in the raw records.
#[test]
fn written_bytes_carry_when_their_write_began() {
    let _serial = serial();
    let bin = goapp();
    let pods = PodPair::new();
    let rec = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sent-{}.mlrec", std::process::id()));
    let agent = Agent::start_with(&["--record", rec.to_str().expect("utf-8 path")]);
    let port = 9091;
    let mut server = PodPair::cmd(&pods.b, bin.to_str().expect("utf-8 path"));
    server.args(["server", &format!("{}:{port}", pods.ip_b)]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    let mut client = PodPair::cmd(&pods.a, bin.to_str().expect("utf-8 path"));
    client.args(["client", &format!("http://{}:{port}/hello", pods.ip_b), "3"]);
    run(client);
    let spans = agent.collect(to_server(&pods.ip_b, port), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}");
    drop(agent);
    let bytes = std::fs::read(&rec).expect("the recording");
    let _ = std::fs::remove_file(&rec);
    let (mut egress, mut ingress) = (0, 0);
    for record in meshless::capture::record::records(&bytes).expect("a whole recording") {
        let Ok(ev) = meshless::capture::Event::decode(record) else {
            continue;
        };
        let ours = [ev.socket.local, ev.socket.remote]
            .iter()
            .any(|a| a.is_some_and(|a| a.port() == port));
        let meshless::capture::EventBody::Data { direction, sent_ns, .. } = ev.body else {
            continue;
        };
        if !ours {
            continue;
        }
        match direction {
            meshless_common::Direction::Egress => {
                assert!(
                    sent_ns > 0 && sent_ns <= ev.ktime_ns && ev.ktime_ns - sent_ns < 1_000_000_000,
                    "a write dated {sent_ns} ns at its start and {} ns at its exit",
                    ev.ktime_ns
                );
                egress += 1;
            }
            meshless_common::Direction::Ingress => {
                assert_eq!(sent_ns, 0, "a read carries no start time");
                ingress += 1;
            }
        }
    }
    // Three requests and three answers each way at least.
    assert!(egress >= 6 && ingress >= 6, "{egress} writes, {ingress} reads recorded");
}

#[test]
fn node_server_with_chunked_response_is_traced_from_curl() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 3000;
    let script = format!(
        r#"
const http = require('http');
http.createServer((req, res) => {{
  if (req.url === '/chunked') {{
    res.writeHead(200, {{'Content-Type': 'text/plain'}});
    res.write('first chunk ');
    setTimeout(() => {{ res.write('x'.repeat(5000)); setTimeout(() => res.end(' last'), 50); }}, 50);
  }} else {{
    res.writeHead(201, {{'Content-Type': 'text/plain'}});
    res.end('created');
  }}
}}).listen({port}, '{ip}');
"#,
        ip = pods.ip_b
    );
    let mut node = PodPair::cmd(&pods.b, "node");
    node.args(["-e", &script]);
    let _node = spawn(node);
    wait_port(&pods.a, &pods.ip_b, port);
    let url = |p: &str| format!("http://{}:{port}{p}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        &url("/chunked"),
        "-o",
        "/dev/null",
        &url("/made"),
    ]);
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, port), 4, Duration::from_secs(10));
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server_chunked = spans
        .iter()
        .find(|s| kind(s) == "SERVER" && attr_str(s, "url.path") == "/chunked")
        .expect("node span");
    assert_eq!(attr_str(server_chunked, "process.executable.name"), "node");
    assert_eq!(
        attr_str(server_chunked, "client.address"),
        pods.ip_a,
        "peer found although libuv passes no sockaddr to accept4"
    );
    let dur = server_chunked["end_time_unix_nano"].as_u64().unwrap_or(0)
        - server_chunked["start_time_unix_nano"].as_u64().unwrap_or(0);
    assert!(
        dur >= 90_000_000,
        "the span lasts until the last chunk (~100 ms), got {dur} ns"
    );
    let made = spans
        .iter()
        .find(|s| kind(s) == "SERVER" && attr_str(s, "url.path") == "/made")
        .expect("second request");
    assert_eq!(attr_u64(made, "http.response.status_code"), 201);
    let client_chunked = spans
        .iter()
        .find(|s| kind(s) == "CLIENT" && attr_str(s, "url.path") == "/chunked")
        .expect("curl span");
    assert_eq!(server_chunked["parent_span_id"], client_chunked["span_id"]);
}
