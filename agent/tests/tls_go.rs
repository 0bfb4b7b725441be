//! HTTPS in Go programs: `crypto/tls.(*Conn).Read/Write` uprobes give the
//! same spans as plain HTTP (Go client → Go server → Go server, curl → Go
//! server, Go client → nginx), on by default (`--tls auto`); a stripped Go
//! HTTPS server is logged and left alone.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;
use support::*;

const FRONT: u16 = 8443;
const BACK: u16 = 8444;

/// The fixture (tests/fixtures/gotls) built by Go 1.26 once per test binary,
/// with the given `-ldflags`.
fn gotls(ldflags: &'static str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().expect("build lock");
    if let Some((_, path)) = built.iter().find(|(f, _)| *f == ldflags) {
        return path.clone();
    }
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = tmp.join(if ldflags.is_empty() { "gotls" } else { "gotls-stripped" });
    let go = if Path::new("/usr/local/go/bin/go").exists() {
        "/usr/local/go/bin/go"
    } else {
        "go"
    };
    let mut cmd = Command::new(go);
    cmd.args(["build", "-ldflags", ldflags, "-o"])
        .arg(&out)
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gotls/main.go"))
        .env("GOCACHE", tmp.join("gocache"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "");
    run(cmd);
    built.push((ldflags, out.clone()));
    out
}

fn go_server(bin: &Path, ns: &str, ip: &str, port: u16, downstream: Option<&str>) -> Proc {
    let addr = format!("{ip}:{port}");
    let mut cmd = PodPair::cmd(ns, bin.to_str().expect("utf-8 path"));
    cmd.args(["server", &addr]);
    cmd.args(downstream);
    spawn(cmd)
}

fn split(spans: &[Value]) -> (Vec<&Value>, Vec<&Value>) {
    (
        spans.iter().filter(|s| kind(s) == "SERVER").collect(),
        spans.iter().filter(|s| kind(s) == "CLIENT").collect(),
    )
}

/// Each server span's parent is a client span of the same trace.
fn assert_parented(servers: &[&Value], clients: &[&Value]) {
    for s in servers {
        let parent = s["parent_span_id"]
            .as_str()
            .unwrap_or_else(|| panic!("server span without parent: {s:#?}"));
        assert!(
            clients
                .iter()
                .any(|c| c["span_id"] == parent && c["trace_id"] == s["trace_id"]),
            "{s:#?}"
        );
    }
}

fn want(paths: &[(&str, u64)]) -> Vec<(String, u64)> {
    let mut w: Vec<(String, u64)> = paths.iter().map(|(p, s)| ((*p).to_owned(), *s)).collect();
    w.sort();
    w
}

#[test]
fn go_https_client_and_servers_started_after_the_agent_give_linked_https_spans_on_keepalive_with_a_404() {
    let _serial = serial();
    let pods = PodPair::new();
    let bin = gotls("");
    let agent = Agent::start();
    let back_url = format!("https://{}:{BACK}", pods.ip_b);
    let _back = go_server(&bin, &pods.b, &pods.ip_b, BACK, None);
    let _front = go_server(&bin, &pods.b, &pods.ip_b, FRONT, Some(&back_url));
    assert!(
        wait_log(&agent, &["Go executable: tracing HTTPS (crypto/tls)", "go1."]),
        "{:?}",
        agent.stderr()
    );
    wait_port(&pods.a, &pods.ip_b, FRONT);
    wait_port(&pods.a, &pods.ip_b, BACK);

    let base = format!("https://{}:{FRONT}", pods.ip_b);
    let urls: Vec<String> = ["/a", "/b", "/missing", "/c"]
        .iter()
        .map(|p| format!("{base}{p}"))
        .collect();
    let mut client = PodPair::cmd(&pods.a, bin.to_str().expect("utf-8 path"));
    client.arg("client").args(&urls);
    assert_eq!(run(client), "200\n200\n404\n200\n");

    let expected = want(&[("/a", 200), ("/b", 200), ("/c", 200), ("/missing", 404)]);
    let front = agent.collect(to_server(&pods.ip_b, FRONT), 8, Duration::from_secs(10));
    assert_eq!(front.len(), 8, "{front:#?}\n{:?}", agent.stderr());
    let (servers, clients) = split(&front);
    assert_eq!(statuses(&servers), expected);
    assert_eq!(statuses(&clients), expected);
    assert!(front.iter().all(|s| attr_str(s, "url.scheme") == "https"), "{front:#?}");
    assert!(front.iter().all(|s| attr_str(s, "tls.protocol.name") == "tls"));
    assert!(front.iter().all(|s| attr_str(s, "process.executable.name") == "gotls"));
    assert!(clients.iter().all(|s| attr_str(s, "client.address") == pods.ip_a));
    let ports: std::collections::HashSet<u64> = clients.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(ports.len(), 1, "all requests on one keep-alive connection");
    assert_parented(&servers, &clients);

    // The front's handler calls the back server: its client span is a
    // child of the request it serves (goroutine linking), the back's
    // server span a child of that.
    let back = agent.collect(to_server(&pods.ip_b, BACK), 8, Duration::from_secs(10));
    assert_eq!(back.len(), 8, "{back:#?}\n{:?}", agent.stderr());
    let (back_servers, back_clients) = split(&back);
    assert_eq!(statuses(&back_servers), expected);
    assert!(back.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert_parented(&back_servers, &back_clients);
    for c in &back_clients {
        let served = servers
            .iter()
            .find(|s| attr_str(s, "url.path") == attr_str(c, "url.path"))
            .expect("front server span of the same path");
        assert_eq!(c["parent_span_id"], served["span_id"], "{c:#?}\n{served:#?}");
        assert_eq!(c["trace_id"], served["trace_id"]);
    }
}

/// nginx with TLS only on `ip:port` in `ns`: `/ok` 200, anything else 404.
fn start_tls_nginx(ns: &str, ip: &str, port: u16, dir: &Path) -> Proc {
    std::fs::create_dir_all(dir.join("www")).expect("www dir");
    safety::self_signed_cert(dir);
    let d = dir.display();
    let server = format!(
        r#"listen {ip}:{port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    root {d}/www;
    location = /ok {{ return 200 "ok\n"; }}"#
    );
    start_nginx_with(ns, dir, "keepalive_requests 100000;", &server)
}

#[test]
fn curl_to_a_go_https_server_and_a_go_client_to_nginx_over_tls_give_https_span_pairs() {
    let _serial = serial();
    let pods = PodPair::new();
    let bin = gotls("");
    let scratch = Scratch::new("tls-go-nginx");
    // `--tls on`: curl's and nginx's libssl are traced even when another
    // agent's uprobes on it make its cheap placement unreadable (Go
    // executables are probed in either mode).
    let agent = Agent::start_with(&["--tls", "on"]);
    let _go = go_server(&bin, &pods.b, &pods.ip_b, FRONT, None);
    let _nginx = start_tls_nginx(&pods.b, &pods.ip_b, BACK, &scratch.0);
    assert!(
        wait_log(&agent, &["Go executable: tracing HTTPS (crypto/tls)"]),
        "{:?}",
        agent.stderr()
    );
    wait_port(&pods.a, &pods.ip_b, FRONT);
    wait_port(&pods.a, &pods.ip_b, BACK);

    let go_base = format!("https://{}:{FRONT}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k", "--http1.1", "-w", "%{http_code}\\n"]);
    for p in ["/x", "/missing", "/y"] {
        curl.args(["-o", "/dev/null", &format!("{go_base}{p}")]);
    }
    assert_eq!(run(curl), "200\n404\n200\n");
    let spans = agent.collect(to_server(&pods.ip_b, FRONT), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}\n{:?}", agent.stderr());
    let (servers, clients) = split(&spans);
    let expected = want(&[("/missing", 404), ("/x", 200), ("/y", 200)]);
    assert_eq!(statuses(&servers), expected);
    assert_eq!(statuses(&clients), expected);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert!(servers
        .iter()
        .all(|s| attr_str(s, "process.executable.name") == "gotls"));
    assert!(clients.iter().all(|s| attr_str(s, "process.executable.name") == "curl"));
    assert_parented(&servers, &clients);

    let nginx_base = format!("https://{}:{BACK}", pods.ip_b);
    let mut client = PodPair::cmd(&pods.a, bin.to_str().expect("utf-8 path"));
    client.args(["client", &format!("{nginx_base}/ok"), &format!("{nginx_base}/nope")]);
    assert_eq!(run(client), "200\n404\n");
    let spans = agent.collect(to_server(&pods.ip_b, BACK), 4, Duration::from_secs(10));
    assert_eq!(spans.len(), 4, "{spans:#?}\n{:?}", agent.stderr());
    let (servers, clients) = split(&spans);
    let expected = want(&[("/nope", 404), ("/ok", 200)]);
    assert_eq!(statuses(&servers), expected);
    assert_eq!(statuses(&clients), expected);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert!(clients
        .iter()
        .all(|s| attr_str(s, "process.executable.name") == "gotls"));
    assert_parented(&servers, &clients);
}

#[test]
fn a_stripped_go_https_server_is_logged_serves_unharmed_and_its_encrypted_bytes_give_no_server_spans() {
    let _serial = serial();
    let pods = PodPair::new();
    let bin = gotls("-s -w");
    // `--tls on`: curl's libssl is traced whatever other agents probe.
    let agent = Agent::start_with(&["--tls", "on"]);
    let _go = go_server(&bin, &pods.b, &pods.ip_b, FRONT, None);
    assert!(
        wait_log(&agent, &["without a symbol table", "crypto/tls"]),
        "{:?}",
        agent.stderr()
    );
    wait_port(&pods.a, &pods.ip_b, FRONT);
    let base = format!("https://{}:{FRONT}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k", "--http1.1", "-w", "%{http_code}\\n"]);
    for p in ["/x", "/missing"] {
        curl.args(["-o", "/dev/null", &format!("{base}{p}")]);
    }
    assert_eq!(run(curl), "200\n404\n");
    // curl's side is traced through OpenSSL; wait for its spans, then no
    // span of this port may come from the server or be plain HTTP.
    agent.collect(to_server(&pods.ip_b, FRONT), 2, Duration::from_secs(10));
    let later = agent.settle(to_server(&pods.ip_b, FRONT), Duration::from_secs(2));
    assert_eq!(later.len(), 2, "curl's two client spans only: {later:#?}");
    assert!(later.iter().all(|s| kind(s) == "CLIENT"), "{later:#?}");
    assert!(later.iter().all(|s| attr_str(s, "url.scheme") == "https"), "{later:#?}");
}
