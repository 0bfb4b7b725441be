//! HTTPS through Node.js: its OpenSSL sits inside the `node` executable
//! (found by the executable scan) and its TLSWrap reads and writes through
//! memory BIOs (plaintext tied to the socket by the thread's syscalls).
mod support;

use std::{path::Path, time::Duration};

use serde_json::Value;
use support::*;

const PORT: u16 = 8444;

/// A Node `https` server on `ip:PORT` in `ns` (cert in `dir`): `/missing`
/// 404, anything else 200 `hello <path>`.
fn start_node_https(ns: &str, ip: &str, dir: &Path) -> Proc {
    let d = dir.display();
    let server = format!(
        r#"
const https = require("https"), fs = require("fs");
const opts = {{ key: fs.readFileSync("{d}/key.pem"), cert: fs.readFileSync("{d}/cert.pem") }};
https.createServer(opts, (req, res) => {{
  const body = "hello " + req.url;
  res.writeHead(req.url === "/missing" ? 404 : 200, {{ "content-length": Buffer.byteLength(body) }});
  res.end(body);
}}).listen({PORT}, "{ip}");
"#
    );
    let mut cmd = PodPair::cmd(ns, "node");
    cmd.args(["-e", &server]);
    spawn(cmd)
}

/// The node executable carries OpenSSL itself (official builds) rather
/// than linking the system libssl (Debian's): which case this machine has.
fn node_has_own_openssl() -> bool {
    let out = run({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "ldd \"$(command -v node)\""]);
        c
    });
    !out.contains("libssl.so")
}

#[test]
fn curl_to_a_node_https_server_started_after_the_agent_gives_https_span_pairs_on_keepalive_with_a_404() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-node");
    safety::self_signed_cert(&scratch.0);
    let agent = Agent::start();
    let _server = start_node_https(&pods.b, &pods.ip_b, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);
    if node_has_own_openssl() {
        assert!(
            wait_log(&agent, &["TLS library: tracing HTTPS", "node", "cheap=true"]),
            "the node executable's own OpenSSL is attached on emulated instructions: {:?}",
            agent.stderr()
        );
    }

    let base = format!("https://{}:{PORT}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k"]);
    for p in ["/a", "/b", "/missing", "/c"] {
        curl.args(["-o", "/dev/null", &format!("{base}{p}")]);
    }
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 8, Duration::from_secs(10));
    assert_eq!(spans.len(), 8, "{spans:#?}\n{:?}", agent.stderr());
    let servers: Vec<&Value> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    let want: Vec<(String, u64)> = vec![
        ("/a".into(), 200),
        ("/b".into(), 200),
        ("/c".into(), 200),
        ("/missing".into(), 404),
    ];
    assert_eq!(statuses(&servers), want, "{:?}", agent.stderr());
    assert_eq!(statuses(&clients), want);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert!(spans.iter().all(|s| attr_str(s, "tls.protocol.name") == "tls"));
    assert!(servers.iter().all(|s| attr_str(s, "process.executable.name") == "node"));
    assert!(servers.iter().all(|s| attr_str(s, "client.address") == pods.ip_a));
    assert!(clients.iter().all(|s| attr_str(s, "server.address") == pods.ip_b));
    let ports: std::collections::HashSet<u64> = spans.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(ports.len(), 1, "all requests on one keep-alive connection");
    for s in &servers {
        let parent = s["parent_span_id"].as_str().expect("server span linked to curl's span");
        assert!(
            clients
                .iter()
                .any(|c| c["span_id"] == parent && c["trace_id"] == s["trace_id"]),
            "{s:#?}"
        );
    }
}

#[test]
fn a_node_https_client_to_a_node_https_server_gives_client_and_server_spans_of_one_trace_each() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-node-client");
    safety::self_signed_cert(&scratch.0);
    let agent = Agent::start();
    let _server = start_node_https(&pods.b, &pods.ip_b, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let client = format!(
        r#"
const https = require("https");
const agent = new https.Agent({{ keepAlive: true, maxSockets: 1 }});
const get = (p) => new Promise((ok, ko) => {{
  https.get({{ host: "{ip}", port: {PORT}, path: p, agent, rejectUnauthorized: false }}, (r) => {{
    let b = "";
    r.on("data", (d) => (b += d));
    r.on("end", () => (b === "hello " + p ? ok() : ko(new Error(p + ": " + b))));
  }}).on("error", ko);
}});
(async () => {{
  for (const p of ["/n1", "/n2", "/missing"]) await get(p);
  agent.destroy();
}})().catch((e) => {{ console.error(e); process.exit(1); }});
"#,
        ip = pods.ip_b
    );
    let mut node = PodPair::cmd(&pods.a, "node");
    node.args(["-e", &client]);
    run(node);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}\n{:?}", agent.stderr());
    let servers: Vec<&Value> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    let want: Vec<(String, u64)> = vec![("/missing".into(), 404), ("/n1".into(), 200), ("/n2".into(), 200)];
    assert_eq!(statuses(&servers), want, "{:?}", agent.stderr());
    assert_eq!(statuses(&clients), want);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert!(spans.iter().all(|s| attr_str(s, "process.executable.name") == "node"));
    assert!(clients.iter().all(|s| attr_str(s, "client.address") == pods.ip_a));
    for s in &servers {
        let parent = s["parent_span_id"]
            .as_str()
            .expect("server span linked to the client's span");
        assert!(
            clients
                .iter()
                .any(|c| c["span_id"] == parent && c["trace_id"] == s["trace_id"]),
            "{s:#?}"
        );
    }
}
