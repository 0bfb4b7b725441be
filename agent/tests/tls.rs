//! HTTPS: plaintext read at OpenSSL by uprobes gives the same spans as
//! plain HTTP (curl → nginx, Python ssl client → Python ssl server).
mod support;

use std::{path::Path, time::Duration};

use serde_json::Value;
use support::*;

const PORT: u16 = 8443;

/// nginx with TLS only on `ip:port` in `ns`: `/ok` 200, `/fail` 500,
/// files under `dir/www`, anything else 404.
fn start_tls_nginx(ns: &str, ip: &str, port: u16, dir: &Path) -> Proc {
    std::fs::create_dir_all(dir.join("www")).expect("www dir");
    safety::self_signed_cert(dir);
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {ip}:{port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    root {d}/www;
    location = /ok {{ return 200 "ok\n"; }}
    location = /fail {{ return 500; }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut cmd = PodPair::cmd(ns, "nginx");
    cmd.args(["-c", &path.display().to_string(), "-e", &format!("{d}/error.log")]);
    spawn(cmd)
}

fn statuses(spans: &[&Value]) -> Vec<(String, u64)> {
    let mut s: Vec<(String, u64)> = spans
        .iter()
        .map(|s| {
            (
                attr_str(s, "url.path").to_owned(),
                attr_u64(s, "http.response.status_code"),
            )
        })
        .collect();
    s.sort();
    s
}

#[test]
fn curl_over_https_to_nginx_gives_one_https_span_pair_per_request_on_keepalive_with_a_404_and_a_1mb_body_unchanged() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-nginx");
    let agent = Agent::start_with(&["--tls", "on"]);
    let _nginx = start_tls_nginx(&pods.b, &pods.ip_b, PORT, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);
    let sha = safety::big_file(&scratch.0, "big.bin", 1 << 20);

    let base = format!("https://{}:{PORT}", pods.ip_b);
    let big_out = scratch.0.join("big.out");
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k"]);
    for p in ["/ok", "/ok", "/ok", "/nope"] {
        curl.args(["-o", "/dev/null", &format!("{base}{p}")]);
    }
    curl.arg("-o").arg(&big_out).arg(format!("{base}/big.bin"));
    // Last: nginx closes the connection after a 500.
    curl.args(["-o", "/dev/null", &format!("{base}/fail")]);
    run(curl);
    assert_eq!(safety::sha256(&big_out), sha, "the 1 MB body arrived unchanged");

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 12, Duration::from_secs(10));
    assert_eq!(spans.len(), 12, "{spans:#?}\n{:?}", agent.stderr());
    let servers: Vec<&Value> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    let want: Vec<(String, u64)> = vec![
        ("/big.bin".into(), 200),
        ("/fail".into(), 500),
        ("/nope".into(), 404),
        ("/ok".into(), 200),
        ("/ok".into(), 200),
        ("/ok".into(), 200),
    ];
    assert_eq!(statuses(&servers), want);
    assert_eq!(statuses(&clients), want);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    assert!(spans.iter().all(|s| attr_str(s, "tls.protocol.name") == "tls"));
    assert!(servers
        .iter()
        .all(|s| attr_str(s, "process.executable.name") == "nginx"));
    assert!(clients.iter().all(|s| attr_str(s, "client.address") == pods.ip_a));
    let ports: std::collections::HashSet<u64> = clients.iter().map(|s| attr_u64(s, "client.port")).collect();
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
fn python_ssl_client_and_server_started_after_the_agent_give_https_spans_with_traceparent_honoured() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-python");
    safety::self_signed_cert(&scratch.0);
    let agent = Agent::start_with(&["--tls", "on"]);
    let d = scratch.0.display();
    let server = format!(
        r#"
import http.server as h, ssl
class H(h.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"hello " + self.path.encode()
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = h.ThreadingHTTPServer(("{ip}", {PORT}), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{d}/cert.pem", "{d}/key.pem")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#,
        ip = pods.ip_b
    );
    let mut cmd = PodPair::cmd(&pods.b, "python3");
    cmd.args(["-c", &server]);
    let _server = spawn(cmd);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let client = format!(
        r#"
import http.client, ssl
ctx = ssl._create_unverified_context()
c = http.client.HTTPSConnection("{ip}", {PORT}, context=ctx, timeout=10)
for p in ["/a", "/b", "/missing", "/c"]:
    hdrs = {{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}} if p == "/c" else {{}}
    c.request("GET", p, headers=hdrs)
    r = c.getresponse()
    assert r.read() == b"hello " + p.encode()
c.close()
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &client]);
    run(py);

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
    assert_eq!(statuses(&servers), want);
    assert_eq!(statuses(&clients), want);
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "https"));
    let c = clients
        .iter()
        .find(|s| attr_str(s, "url.path") == "/c")
        .expect("client span of /c");
    assert_eq!(c["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{c:#?}");
    assert_eq!(c["parent_span_id"], "00f067aa0ba902b7");
}
