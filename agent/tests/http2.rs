//! HTTP/2 (h2c) on a real kernel: clients with prior knowledge (curl,
//! h2load) against nginx serving h2c, many streams on one connection, and
//! curl switching a connection to h2c with `Upgrade: h2c` (a Go server).
mod support;

use std::{collections::HashSet, time::Duration};

use support::{chain::go_echo, *};

const PORT: u16 = 8082;

/// nginx 1.22 serving HTTP/2 without TLS (prior knowledge only).
fn start_nginx_h2c(ns: &str, ip: &str, dir: &std::path::Path) -> Proc {
    let server = format!(
        r#"listen {ip}:{PORT} http2;
    location /ok {{ return 200 "ok\n"; }}
    location = /fail {{ return 503; }}"#
    );
    start_nginx_with(ns, dir, "http2_max_concurrent_streams 256;", &server)
}

#[test]
fn a_hundred_concurrent_h2c_streams_on_one_connection_give_exactly_a_hundred_span_pairs() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-h2c");
    let agent = Agent::start();
    let _nginx = start_nginx_h2c(&pods.b, &pods.ip_b, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    // h2load (nghttp2, the library curl uses): one connection, 100
    // streams in flight, each with its own path.
    let base = format!("http://{}:{PORT}", pods.ip_b);
    let mut urls: Vec<String> = (0..99).map(|i| format!("{base}/ok/{i}")).collect();
    urls.push(format!("{base}/fail"));
    let list = scratch.0.join("urls.txt");
    std::fs::write(&list, urls.join("\n") + "\n").expect("url list");
    let mut load = PodPair::cmd(&pods.a, "h2load");
    load.args(["-n", "100", "-c", "1", "-m", "100", "-i", &list.display().to_string()]);
    let report = run(load);
    assert!(report.contains("100 done") && report.contains("99 2xx"), "{report}");

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 200, Duration::from_secs(15));
    let servers: Vec<_> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<_> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    assert_eq!(
        (servers.len(), clients.len()),
        (100, 100),
        "stderr: {:?}",
        agent.stderr()
    );
    for side in [&servers, &clients] {
        let paths: HashSet<&str> = side.iter().map(|s| attr_str(s, "url.path")).collect();
        assert_eq!(paths.len(), 100, "every stream its own path: {paths:?}");
        assert!(side.iter().all(|s| attr_str(s, "network.protocol.version") == "2"));
        let fail = side
            .iter()
            .find(|s| attr_str(s, "url.path") == "/fail")
            .expect("/fail span");
        assert_eq!(attr_u64(fail, "http.response.status_code"), 503);
        // A status, when there is one, is never another stream's.
        let wrong: Vec<_> = side
            .iter()
            .filter(|s| attr_str(s, "url.path") != "/fail")
            .filter(|s| !attr(s, "http.response.status_code").is_null())
            .filter(|s| attr_u64(s, "http.response.status_code") != 200)
            .map(|s| (kind(s), attr_str(s, "url.path")))
            .collect();
        assert!(wrong.is_empty(), "{wrong:?}");
        // nginx writes a burst of responses as one writev of many iovecs;
        // the kernel walks up to 64 of them (bpf_loop), so every response
        // head is captured.
        let uncaptured: Vec<_> = side
            .iter()
            .filter(|s| attr(s, "http.response.status_code").is_null())
            .map(|s| (kind(s), attr_str(s, "url.path")))
            .collect();
        assert!(uncaptured.is_empty(), "responses uncaptured: {uncaptured:?}");
    }
    let ports: HashSet<u64> = clients.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(ports.len(), 1, "all streams on one connection");
}

#[test]
fn curl_with_prior_knowledge_gives_an_h2_span_pair() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-h2c-curl");
    let agent = Agent::start();
    let _nginx = start_nginx_h2c(&pods.b, &pods.ip_b, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let mut curl = PodPair::cmd(&pods.a, "curl");
    let url = format!("http://{}:{PORT}/ok/curl?x=1", pods.ip_b);
    curl.args(["-s", "--http2-prior-knowledge", "-o", "/dev/null", &url]);
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for s in &spans {
        assert_eq!(attr_str(s, "url.path"), "/ok/curl");
        assert_eq!(attr_str(s, "http.request.method"), "GET");
        assert_eq!(attr_u64(s, "http.response.status_code"), 200);
        assert_eq!(attr_str(s, "network.protocol.version"), "2");
    }
    let comms: HashSet<&str> = spans.iter().map(|s| attr_str(s, "process.executable.name")).collect();
    assert_eq!(comms, HashSet::from(["curl", "nginx"]));
}

/// `curl --http2` on http:// asks to switch with `Upgrade: h2c`: the first
/// request goes out as HTTP/1.1, the server answers 101 and then that
/// request's response on HTTP/2 stream 1; the next request on the same
/// connection is HTTP/2 stream 3. Both requests get a span on each side
/// with their own path and status, and nothing else is made of the
/// connection (no span for the 101, no stream mistaken for another).
#[test]
fn an_upgrade_to_h2c_gives_a_span_pair_per_request_on_both_protocols() {
    const UPGRADE_PORT: u16 = 8083;
    let _serial = serial();
    let pods = PodPair::new();
    let bin = go_echo().display().to_string();
    let agent = Agent::start();
    let _server = spawn({
        let mut cmd = PodPair::cmd(&pods.b, &bin);
        cmd.args(["h2c", &format!("{}:{UPGRADE_PORT}", pods.ip_b)]);
        cmd
    });
    wait_port(&pods.a, &pods.ip_b, UPGRADE_PORT);

    let base = format!("http://{}:{UPGRADE_PORT}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-sv", "--http2", "-o", "/dev/null", "-o", "/dev/null"])
        .arg(format!("{base}/up/first"))
        .arg(format!("{base}/missing/second"));
    let out = curl.output().expect("curl runs");
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(trace.contains("101"), "curl did not switch protocols:\n{trace}");

    let spans = agent.collect(to_server(&pods.ip_b, UPGRADE_PORT), 4, Duration::from_secs(10));
    let mut got: Vec<(&str, &str, u64, &str)> = spans
        .iter()
        .map(|s| {
            (
                kind(s),
                attr_str(s, "url.path"),
                attr_u64(s, "http.response.status_code"),
                attr_str(s, "network.protocol.version"),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("CLIENT", "/missing/second", 404, "2"),
            ("CLIENT", "/up/first", 200, "2"),
            ("SERVER", "/missing/second", 404, "2"),
            ("SERVER", "/up/first", 200, "2"),
        ],
        "{spans:#?}"
    );
    for s in &spans {
        assert_eq!(attr_str(s, "http.request.method"), "GET");
    }
}

/// An agent started while an HTTP/2 connection is open (its preface and
/// the HPACK dynamic tables built before the agent) follows the
/// connection from its next request on: static-table and literal fields
/// are read, references into the tables it never saw stay unknown (the
/// span says so), and no span ever carries another request's path.
#[test]
fn an_agent_started_on_an_open_h2c_connection_traces_it_without_a_wrong_path() {
    use std::io::{BufRead, BufReader, Write};
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-h2c-mid");
    let _nginx = start_nginx_h2c(&pods.b, &pods.ip_b, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/h2/session.js");
    let mut node = PodPair::cmd(&pods.a, "node");
    node.args([
        script.to_str().expect("utf-8 path"),
        &format!("http://{}:{PORT}", pods.ip_b),
    ]);
    let mut node = Proc(
        node.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn node"),
    );
    let mut out = BufReader::new(node.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("node says ready");
    assert_eq!(line.trim(), "ready", "the session's first requests worked");

    let agent = Agent::start();
    writeln!(node.0.stdin.as_mut().expect("stdin")).expect("go on");
    line.clear();
    out.read_line(&mut line).expect("node says done");
    assert_eq!(line.trim(), "done", "the session's later requests worked");

    // 6 requests after the agent started; both ends traced.
    let spans = agent.collect(to_server(&pods.ip_b, PORT), 12, Duration::from_secs(15));
    let sent = [
        "/ok/repeat",
        "/ok/repeat-post",
        "/ok/after-0",
        "/ok/after-1",
        "/ok/after-2",
    ];
    for side in ["SERVER", "CLIENT"] {
        let mine: Vec<_> = spans.iter().filter(|s| kind(s) == side).collect();
        let paths: Vec<&str> = mine.iter().map(|s| attr_str(s, "url.path")).collect();
        let unknown = mine.iter().filter(|s| attr_str(s, "url.path").is_empty());
        assert!(
            paths.iter().all(|p| p.is_empty() || sent.contains(p)),
            "{side}: a path never sent: {paths:?}"
        );
        assert!(
            unknown.clone().all(|s| attr(s, "meshless.capture.truncated") == true),
            "{side}: a span with an unknown path says it is incomplete"
        );
        for i in 0..3 {
            let p = format!("/ok/after-{i}");
            let after: Vec<_> = mine.iter().filter(|s| attr_str(s, "url.path") == p).collect();
            assert!(
                after.len() == 1
                    && attr_str(after[0], "http.request.method") == "GET"
                    && attr_u64(after[0], "http.response.status_code") == 200,
                "{side}: {p} traced once, right: {after:#?}\nall paths: {paths:?}"
            );
        }
        for s in &mine {
            let method = attr_str(s, "http.request.method");
            let expected = if attr_str(s, "url.path") == "/ok/repeat-post" {
                "POST"
            } else {
                "GET"
            };
            assert!(
                attr_str(s, "url.path").is_empty() || method == expected,
                "{side}: {} with method {method}",
                attr_str(s, "url.path")
            );
        }
        assert!(mine.len() <= 6, "{side}: at most one span per request: {paths:?}");
    }
}
