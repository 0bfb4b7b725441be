//! The benchmark's world: two network namespaces joined by a veth pair
//! (client "pod" and server "pod"), nginx in the server pod, and the
//! processes each mode adds. Everything started here is stopped on drop.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub const CLIENT_NS: &str = "mlbench-cli";
pub const SERVER_NS: &str = "mlbench-srv";
pub const CLIENT_IP: &str = "10.253.0.1";
pub const SERVER_IP: &str = "10.253.0.2";
pub const APP_PORT: u16 = 8080;
/// nginx's HTTPS port (same response, TLS with the bench's self-signed certificate).
pub const TLS_PORT: u16 = 8443;
pub const SIDECAR_PORT: u16 = 15006;
/// OTLP port of the collector: inside the server pod for Envoy, on the
/// host's loopback for meshless (each mode gets its own rotel).
pub const OTLP_PORT: u16 = 14317;
/// The agent's Prometheus endpoint (host loopback), scraped for its own
/// counters around each measured window.
pub const AGENT_METRICS_PORT: u16 = 19464;

/// A started process, killed (and reaped) on drop.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so agents and proxies flush and detach.
        signal(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        eprintln!("    {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Runs `program` in a namespace (or on the host when `ns` is None).
pub fn cmd(ns: Option<&str>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

pub fn spawn(name: &'static str, mut c: Command, log: &Path) -> Result<Proc> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = c
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {name}: {c:?}"))?;
    Ok(Proc { name, child })
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| format!("running {args:?}"))?;
    if !st.success() {
        bail!("{args:?} failed ({st})");
    }
    Ok(())
}

/// The two pods; deleted on drop.
pub struct Pods;

impl Pods {
    pub fn create() -> Result<Pods> {
        Self::delete();
        for ns in [CLIENT_NS, SERVER_NS] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip", "link", "add", "mlbv-cli", "netns", CLIENT_NS, "type", "veth", "peer", "name", "mlbv-srv", "netns",
            SERVER_NS,
        ])?;
        sh(&[
            "ip",
            "-n",
            CLIENT_NS,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "mlbv-cli",
        ])?;
        sh(&[
            "ip",
            "-n",
            SERVER_NS,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            "mlbv-srv",
        ])?;
        sh(&["ip", "-n", CLIENT_NS, "link", "set", "mlbv-cli", "up"])?;
        sh(&["ip", "-n", SERVER_NS, "link", "set", "mlbv-srv", "up"])?;
        Ok(Pods)
    }

    fn delete() {
        for ns in [CLIENT_NS, SERVER_NS] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        Self::delete();
    }
}

/// Waits until `ip:port` accepts connections from the client pod.
pub fn wait_port(ns: &str, ip: &str, port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
    while Instant::now() < deadline {
        let ok = cmd(Some(ns), "bash")
            .args(["-c", &probe])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("{what} did not start listening on {ip}:{port}")
}

/// nginx serving a small fixed response on the app port (pod IP and
/// loopback), and the same over TLS on [`TLS_PORT`].
pub fn start_nginx(dir: &Path) -> Result<Proc> {
    self_signed_certificate(dir)?;
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/ngx-body;
  proxy_temp_path {d}/ngx-proxy;
  fastcgi_temp_path {d}/ngx-fastcgi;
  uwsgi_temp_path {d}/ngx-uwsgi;
  scgi_temp_path {d}/ngx-scgi;
  server {{
    listen {SERVER_IP}:{APP_PORT};
    listen 127.0.0.1:{APP_PORT};
    location / {{ return 200 "hello from the app\n"; }}
  }}
  server {{
    listen {SERVER_IP}:{TLS_PORT} ssl;
    ssl_certificate {d}/tls.crt;
    ssl_certificate_key {d}/tls.key;
    ssl_protocols TLSv1.3;
    ssl_session_cache off;
    location / {{ return 200 "hello from the app\n"; }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    let mut c = cmd(Some(SERVER_NS), "nginx");
    c.args(["-c", &path.display().to_string(), "-e", &format!("{d}/nginx-error.log")]);
    let p = spawn("nginx", c, &dir.join("nginx.log"))?;
    wait_port(CLIENT_NS, SERVER_IP, APP_PORT, "nginx")?;
    wait_port(CLIENT_NS, SERVER_IP, TLS_PORT, "nginx (TLS)")?;
    Ok(p)
}

/// `tls.crt` and `tls.key` in `dir`: a throwaway P-256 certificate for the
/// HTTPS workload, made with the openssl command-line tool.
fn self_signed_certificate(dir: &Path) -> Result<()> {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "2", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-subj", &format!("/CN={SERVER_IP}")])
        .output()
        .context("running openssl to make the HTTPS workload's certificate (apt-get install openssl)")?;
    if !out.status.success() {
        bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What an inbound sidecar fronts: the port it listens on, the app's port
/// behind it, and whether the app speaks gRPC (HTTP/2 upstream).
pub struct Sidecar {
    pub listen: u16,
    pub app: u16,
    pub grpc: bool,
}

/// The sidecar in front of nginx.
pub const HTTP_SIDECAR: Sidecar = Sidecar {
    listen: SIDECAR_PORT,
    app: APP_PORT,
    grpc: false,
};

/// Envoy as an inbound sidecar in the server pod: HTTP connection manager,
/// OpenTelemetry tracer sampling 100%, exporting OTLP/gRPC to the pod's rotel.
/// For gRPC the upstream is HTTP/2 and the `grpc_stats` filter counts calls
/// per method and status, as a gRPC-aware mesh sidecar is set up (the
/// downstream codec is `AUTO`: h2c prior knowledge is detected).
pub fn start_envoy(envoy: &Path, dir: &Path, base_id: u32, sidecar: &Sidecar) -> Result<Proc> {
    let Sidecar { listen, app, grpc } = *sidecar;
    let (grpc_filter, app_protocol) = if grpc {
        (
            r#"
          - name: envoy.filters.http.grpc_stats
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig
              emit_filter_state: true
              stats_for_all_methods: true"#,
            r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#,
        )
    } else {
        ("", "")
    };
    let conf = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }}
static_resources:
  listeners:
  - name: inbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: AUTO
          generate_request_id: true
          tracing:
            random_sampling: {{ value: 100 }}
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                service_name: app-sidecar
                grpc_service:
                  envoy_grpc: {{ cluster_name: otel }}
                  timeout: 1s
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: app }}
          http_filters:{grpc_filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s{app_protocol}
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {app} }} }} }}
  - name: otel
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: otel
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {OTLP_PORT} }} }} }}
"#
    );
    let path = dir.join(if grpc { "envoy-grpc.yaml" } else { "envoy.yaml" });
    fs::write(&path, conf)?;
    let mut c = cmd(Some(SERVER_NS), &envoy.display().to_string());
    c.args([
        "-c",
        &path.display().to_string(),
        "--base-id",
        &base_id.to_string(),
        "--concurrency",
        "2",
        "-l",
        "error",
    ]);
    let p = spawn("envoy", c, &dir.join("envoy.log"))?;
    wait_port(CLIENT_NS, SERVER_IP, listen, "Envoy")?;
    Ok(p)
}

/// rotel printing one line per received batch (`spans=N`), nothing else.
pub fn start_rotel(rotel: &Path, ns: Option<&str>, log: &Path) -> Result<Proc> {
    let mut c = cmd(ns, &rotel.display().to_string());
    c.args(["start", "--otlp-grpc-endpoint", &format!("127.0.0.1:{OTLP_PORT}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{}", OTLP_PORT + 1)])
        .args([
            "--exporter",
            "blackhole",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "basic",
        ])
        .env("NO_COLOR", "1");
    let p = spawn("rotel", c, log)?;
    // rotel is up once it logs its start line.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if fs::read_to_string(log).unwrap_or_default().contains("Starting Rotel") {
            return Ok(p);
        }
        sleep(Duration::from_millis(100));
    }
    bail!("rotel did not start (see {})", log.display())
}

/// Spans rotel logged as received (sum of `spans=N` on its batch lines).
pub fn spans_received(log: &Path) -> u64 {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("Received traces"))
        .filter_map(|l| {
            let at = l.rfind("spans=")?;
            let digits: String = l[at + 6..].chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// The meshless agent on the host, exporting every span to the host's rotel.
pub fn start_meshless(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Proc> {
    let log = dir.join("meshless.log");
    let mut c = Command::new(bin);
    c.args(extra);
    c.args(["--otlp-endpoint", &format!("http://127.0.0.1:{OTLP_PORT}")])
        .args([
            "--metrics-addr",
            &format!("127.0.0.1:{AGENT_METRICS_PORT}"),
            "--stats-interval-secs",
            "0",
            "--metrics-exporter",
            "none",
            // As deployed on a node (the DaemonSet): the live map is a dev-VM
            // feature and off in Kubernetes.
            "--ui",
            "off",
        ]);
    let p = spawn("meshless", c, &log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("meshless ready") {
            return Ok(p);
        }
        if text.contains("error") {
            bail!("meshless failed to start: {}", text.trim());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("meshless did not become ready (see {})", log.display())
}

/// One of the agent's own counters (`meshless_<name>_total`) from its
/// Prometheus endpoint; None if it cannot be read.
pub fn agent_counter(name: &str) -> Option<u64> {
    agent_counters(&[name]).map(|v| v[0])
}

/// Several counters of the agent from one scrape, each summed over its
/// label sets (`meshless_dropped_total{reason=…}`), in the order asked.
pub fn agent_counters<const N: usize>(names: &[&str; N]) -> Option<[u64; N]> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", AGENT_METRICS_PORT)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    sum_counters(&text, names)
}

/// [`agent_counters`] of a scraped metrics text: None when none was there.
fn sum_counters<const N: usize>(text: &str, names: &[&str; N]) -> Option<[u64; N]> {
    let mut out = [0u64; N];
    let mut found = false;
    for (name, sum) in names.iter().zip(&mut out) {
        let prefix = format!("meshless_{name}_total");
        for rest in text.lines().filter_map(|l| l.strip_prefix(&prefix)) {
            let value = match rest.as_bytes().first() {
                Some(b' ') => rest,
                Some(b'{') => rest.rsplit_once('}').map_or("", |(_, v)| v),
                _ => continue,
            };
            if let Ok(v) = value.trim().parse::<f64>() {
                *sum += v as u64;
                found = true;
            }
        }
    }
    found.then_some(out)
}

/// CPU time (user + system) of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Peak resident set size of a process in MiB (VmHWM).
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Path of a file shipped inside a pip package.
pub fn pip_file(module: &str, rel: &str) -> Result<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import {module}, os; print(os.path.join(os.path.dirname({module}.__file__), '{rel}'))"),
        ])
        .output()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.exists() {
        bail!("{module} is not installed (pip); `cargo xtask setup` installs it");
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::sum_counters;

    #[test]
    fn counters_are_read_by_exact_name_and_summed_over_their_labels() {
        let text = "# HELP meshless_dropped_total Data shed.\n\
                    meshless_dropped_total{reason=\"spans\"} 3\n\
                    meshless_dropped_total{reason=\"conns,x}\"} 4\n\
                    meshless_kernel_ringbuf_full_total 7\n\
                    meshless_kernel_ringbuf_full_total_extra 100\n\
                    meshless_events_read_total 1e3\n";
        assert_eq!(
            sum_counters(text, &["dropped", "kernel_ringbuf_full", "events_read", "absent"]),
            Some([7, 7, 1000, 0])
        );
        assert_eq!(sum_counters("meshless_other_total 1\n", &["dropped"]), None);
    }
}
