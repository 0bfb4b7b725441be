//! Test harness for real-kernel tests: runs the real agent binary, real
//! servers and clients in network namespaces the test creates ("pods"),
//! and collects the spans the agent prints as JSON.
#![allow(dead_code)]

pub mod chain;
pub mod fake_k8s;
pub mod gate;
pub mod kube_real;
pub mod nodes;
pub mod otlp;
pub mod pki;
mod pods;
pub mod safety;
pub mod spans;

pub use pods::*;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Kernel tests run one at a time: each loads its own agent.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running agent whose stdout (JSON spans) is collected.
pub struct Agent {
    /// Where the admin server (/metrics) listens, if enabled.
    pub metrics_addr: Option<String>,
    child: Child,
    spans: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Agent {
        Self::start_env(extra, &[])
    }

    /// Starts the agent with extra flags and environment variables.
    pub fn start_env(extra: &[&str], envs: &[(&str, &str)]) -> Agent {
        mount_tracefs();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshless"));
        cmd.envs(envs.iter().copied());
        cmd.args(["--console-format", "json", "--stats-interval-secs", "0"]);
        if !extra.contains(&"--poll-interval-ms") {
            cmd.args(["--poll-interval-ms", "5"]);
        }
        if !extra.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the meshless binary");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout piped");
        let sink = spans.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("agent printed non-JSON span line {line:?}: {e}"));
                sink.lock().expect("spans lock").push(v);
            }
        });
        let err = child.stderr.take().expect("stderr piped");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("meshless ready") {
                    let metrics = line
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("metrics="))
                        .filter(|m| *m != "off")
                        .map(str::to_owned);
                    let _ = ready_tx.send(metrics);
                }
                log.lock().expect("stderr lock").push(line);
            }
        });
        let Ok(metrics_addr) = ready_rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("agent did not become ready: {:?}", stderr.lock().expect("stderr lock"));
        };
        Agent {
            metrics_addr,
            child,
            spans,
            stderr,
        }
    }

    /// Waits until `done` holds for the spans matching `filter`, returning them.
    pub fn wait_for(
        &self,
        filter: impl Fn(&Value) -> bool,
        done: impl Fn(&[Value]) -> bool,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Value> = self
                .spans
                .lock()
                .expect("spans lock")
                .iter()
                .filter(|s| filter(s))
                .cloned()
                .collect();
            if done(&got) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for at least `n` spans matching `filter`, then a little longer
    /// so that extra (unexpected) spans would show up too.
    pub fn collect(&self, filter: impl Fn(&Value) -> bool + Copy, n: usize, timeout: Duration) -> Vec<Value> {
        let got = self.wait_for(filter, |s| s.len() >= n, timeout);
        if got.len() < n {
            return got;
        }
        self.settle(filter, Duration::from_millis(400))
    }

    /// Spans matching `filter` after waiting `settle` for stragglers.
    pub fn settle(&self, filter: impl Fn(&Value) -> bool, settle: Duration) -> Vec<Value> {
        std::thread::sleep(settle);
        self.spans
            .lock()
            .expect("spans lock")
            .iter()
            .filter(|s| filter(s))
            .cloned()
            .collect()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Stops the agent with SIGINT and returns its exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, Vec<String>) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait for agent");
        std::thread::sleep(Duration::from_millis(100));
        (status, self.stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn mount_tracefs() {
    if !std::path::Path::new("/sys/kernel/tracing/events").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
}

/// Span attribute accessors.
pub fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

pub fn attr_str<'a>(span: &'a Value, key: &str) -> &'a str {
    attr(span, key).as_str().unwrap_or("")
}

pub fn attr_u64(span: &Value, key: &str) -> u64 {
    attr(span, key).as_u64().unwrap_or(0)
}

pub fn kind(span: &Value) -> &str {
    span["kind"].as_str().unwrap_or("")
}

/// Spans whose server end is `ip:port`.
pub fn to_server(ip: &str, port: u16) -> impl Fn(&Value) -> bool + Copy + '_ {
    move |s| attr_str(s, "server.address") == ip && attr_u64(s, "server.port") == u64::from(port)
}

/// A background process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(mut cmd: Command) -> Proc {
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
    )
}

/// Runs a command to completion, asserting success; returns stdout.
pub fn run(mut cmd: Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory under the target dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("meshless-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts nginx in namespace `ns` on ip:port with fixed routes:
/// `/` and `/ok` → 200 "ok\n", `/fail` → 500, `/chunky` → a static file,
/// anything else → 404.
pub fn start_nginx(ns: &str, ip: &str, port: u16, dir: &std::path::Path) -> Proc {
    std::fs::create_dir_all(dir.join("www")).expect("www dir");
    std::fs::write(dir.join("www/file.txt"), "x".repeat(10_000)).expect("static file");
    let d = dir.display();
    let server = format!(
        r#"listen {ip}:{port};
    root {d}/www;
    location = / {{ return 200 "ok\n"; }}
    location = /ok {{ return 200 "ok\n"; }}
    location = /fail {{ return 500; }}
    location = /file.txt {{ }}"#
    );
    start_nginx_with(ns, dir, "keepalive_requests 100000;", &server)
}

/// Starts nginx in namespace `ns` (one worker, state and logs under
/// `dir`) with one `server` block; `http` holds extra http-level directives.
pub fn start_nginx_with(ns: &str, dir: &std::path::Path, http: &str, server: &str) -> Proc {
    let conf = write_nginx_conf(dir, http, server);
    let mut cmd = PodPair::cmd(ns, "nginx");
    cmd.args(["-c", &conf, "-e", &format!("{}/error.log", dir.display())]);
    spawn(cmd)
}

/// Writes `dir/nginx.conf` (one worker, pid, logs and temp files under
/// `dir`) with `http` as extra http-level directives (more `server` blocks
/// may go there too) and one `server` block; returns the file's path.
pub fn write_nginx_conf(dir: &std::path::Path, http: &str, server: &str) -> String {
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {http}
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    {server}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    path.display().to_string()
}

/// GETs `path` from `addr` with HTTP/1.0 and returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Scrapes the agent's Prometheus endpoint and parses it with a real
/// exposition-format parser.
pub fn scrape(agent: &Agent) -> prometheus_parse::Scrape {
    let addr = agent.metrics_addr.as_deref().expect("agent serves metrics");
    let body = http_get(addr, "/metrics");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus exposition")
}

/// Sum of a counter (or histogram `_count`) over samples whose labels match.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// Binds `addr` again after a server on it stopped (retrying while the
/// old socket goes away).
pub fn rebind(runtime: &tokio::runtime::Runtime, addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() > deadline => panic!("rebinding {addr}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
}

impl Agent {
    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's resident set size in KiB (VmRSS), 0 if unreadable.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

/// Waits up to 15 s until the agent logs a line containing every one of `words`.
pub fn wait_log(agent: &Agent, words: &[&str]) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if agent.stderr().iter().any(|l| words.iter().all(|w| l.contains(w))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// (url.path, status) of each span, sorted: what a test expects regardless of order.
pub fn statuses(spans: &[&Value]) -> Vec<(String, u64)> {
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
