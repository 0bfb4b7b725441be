//! HTTPS: plaintext read at OpenSSL by uprobes gives the same spans as
//! plain HTTP (curl → nginx, Python ssl client → Python ssl server, a
//! server whose libssl lives in a chroot), on by default (`--tls auto`).
mod support;

use std::{path::Path, time::Duration};

use serde_json::Value;
use support::*;

const PORT: u16 = 8443;

/// nginx with TLS only on `ip:port` in `ns`: `/ok` 200, `/fail` 500,
/// files under `dir/www`, anything else 404.
fn start_tls_nginx(ns: &str, ip: &str, port: u16, dir: &Path) -> Proc {
    start_tls_nginx_listening(ns, &format!("{ip}:{port} ssl"), dir)
}

/// [`start_tls_nginx`] with the whole `listen` argument (e.g. `ssl http2`).
fn start_tls_nginx_listening(ns: &str, listen: &str, dir: &Path) -> Proc {
    std::fs::create_dir_all(dir.join("www")).expect("www dir");
    safety::self_signed_cert(dir);
    let d = dir.display();
    let server = format!(
        r#"listen {listen};
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    root {d}/www;
    location = /ok {{ return 200 "ok\n"; }}
    location = /fail {{ return 500; }}"#
    );
    start_nginx_with(ns, dir, "keepalive_requests 100000;", &server)
}

#[test]
fn curl_over_https_to_nginx_gives_one_https_span_pair_per_request_on_keepalive_with_a_404_and_a_1mb_body_unchanged() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-nginx");
    let agent = Agent::start();
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

/// HTTP/2 negotiated by ALPN inside TLS: the plaintext at OpenSSL is an h2
/// connection (preface, HPACK), followed like h2c.
#[test]
fn curl_over_https_with_alpn_h2_to_nginx_gives_h2_span_pairs_per_stream_with_a_404() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-nginx-h2");
    let agent = Agent::start();
    let listen = format!("{}:{PORT} ssl http2", pods.ip_b);
    let _nginx = start_tls_nginx_listening(&pods.b, &listen, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let base = format!("https://{}:{PORT}", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k", "--http2"]);
    for p in ["/ok", "/ok", "/nope"] {
        curl.args(["-o", "/dev/null", &format!("{base}{p}")]);
    }
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}\n{:?}", agent.stderr());
    let servers: Vec<&Value> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<&Value> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    let want: Vec<(String, u64)> = vec![("/nope".into(), 404), ("/ok".into(), 200), ("/ok".into(), 200)];
    assert_eq!(statuses(&servers), want);
    assert_eq!(statuses(&clients), want);
    for s in &spans {
        assert_eq!(attr_str(s, "network.protocol.version"), "2", "{s:#?}");
        assert_eq!(attr_str(s, "url.scheme"), "https", "{s:#?}");
        assert_eq!(attr_str(s, "http.request.method"), "GET");
    }
    let ports: std::collections::HashSet<u64> = clients.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(ports.len(), 1, "all streams on one connection");
    for s in &servers {
        let parent = s["parent_span_id"]
            .as_str()
            .expect("server span linked to curl's stream");
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
    assert!(
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("TLS library: tracing HTTPS") && l.contains("cheap=true")),
        "the host libssl is probed on emulated instructions only: {:?}",
        agent.stderr()
    );
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

/// Copies `file` to the same path under `root` (a fresh inode).
fn copy_into(root: &Path, file: &Path) {
    let to = root.join(file.strip_prefix("/").expect("absolute path"));
    std::fs::create_dir_all(to.parent().expect("parent")).expect("rootfs dir");
    std::fs::copy(file, &to).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
}

#[test]
fn a_tls_server_in_a_chroot_with_its_own_libssl_copy_started_after_the_agent_is_traced() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-chroot");
    let root = scratch.0.join("rootfs");
    let openssl = which("openssl");
    copy_into(&root, &openssl);
    let ldd = run({
        let mut c = std::process::Command::new("ldd");
        c.arg(&openssl);
        c
    });
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        copy_into(&root, Path::new(lib));
    }
    safety::self_signed_cert(&root);
    let agent = Agent::start();
    let mut cmd = PodPair::cmd(&pods.b, "chroot");
    // The binary sits at the same path inside the rootfs.
    cmd.arg(&root).arg(&openssl);
    cmd.args([
        "s_server",
        "-quiet",
        "-www",
        "-cert",
        "/cert.pem",
        "-key",
        "/key.pem",
        "-accept",
    ]);
    cmd.arg(format!("{}:{PORT}", pods.ip_b));
    let _server = spawn(cmd);
    wait_port(&pods.a, &pods.ip_b, PORT);
    assert!(
        wait_log(&agent, &["TLS library: tracing HTTPS", "rootfs/", "libssl.so"]),
        "the chroot's libssl (another inode) is attached: {:?}",
        agent.stderr()
    );

    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-k", "-o", "/dev/null", &format!("https://{}:{PORT}/", pods.ip_b)]);
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 2, Duration::from_secs(10));
    let servers: Vec<&Value> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    assert_eq!(servers.len(), 1, "{spans:#?}\n{:?}", agent.stderr());
    assert_eq!(attr_str(servers[0], "process.executable.name"), "openssl");
    assert_eq!(attr_str(servers[0], "url.scheme"), "https");
    assert_eq!(attr_u64(servers[0], "http.response.status_code"), 200);
}

#[test]
fn a_libssl_named_file_without_ssl_symbols_is_logged_by_path_and_plaintext_http_of_that_process_is_still_traced() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("tls-nosym");
    let fake = scratch.0.join("libssl.so.3");
    std::fs::copy(zlib(), &fake).expect("copy zlib as libssl.so.3");
    let agent = Agent::start();
    let server = format!(
        r#"
import ctypes, http.server as h
ctypes.CDLL("{fake}")
class H(h.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
h.HTTPServer(("{ip}", {PORT}), H).serve_forever()
"#,
        fake = fake.display(),
        ip = pods.ip_b
    );
    let mut cmd = PodPair::cmd(&pods.b, "python3");
    cmd.args(["-c", &server]);
    let _server = spawn(cmd);
    wait_port(&pods.a, &pods.ip_b, PORT);
    assert!(
        wait_log(
            &agent,
            &[
                "TLS library not traced",
                "exports no SSL_read/SSL_write symbols",
                "libssl.so.3"
            ]
        ),
        "{:?}",
        agent.stderr()
    );

    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args(["-s", "-o", "/dev/null", &format!("http://{}:{PORT}/plain", pods.ip_b)]);
    run(curl);
    let spans = agent.collect(to_server(&pods.ip_b, PORT), 2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}\n{:?}", agent.stderr());
    assert!(spans.iter().all(|s| attr_str(s, "url.scheme") == "http"));
    assert!(spans.iter().all(|s| attr_str(s, "url.path") == "/plain"));
}

fn which(program: &str) -> std::path::PathBuf {
    let out = run({
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &format!("command -v {program}")]);
        c
    });
    let path = std::fs::canonicalize(out.trim()).expect("program path");
    assert!(path.is_absolute());
    path
}

/// A shared library that is surely not OpenSSL.
fn zlib() -> &'static Path {
    ["/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("libz.so.1 on this machine")
}
