//! Command-line and environment configuration.
//!
//! Every setting is a flag with an environment variable behind it; the
//! OpenTelemetry ones use the standard `OTEL_*` names. [`otel`] turns the
//! raw strings into validated export settings, naming the setting at fault.
pub mod otel;

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

use crate::export::console::Format;

/// Environment variable names, each defined once.
pub mod env {
    pub const CONSOLE_FORMAT: &str = "MESHLESS_CONSOLE_FORMAT";
    pub const LOG: &str = "MESHLESS_LOG";
    pub const LOG_FORMAT: &str = "MESHLESS_LOG_FORMAT";
    pub const RINGBUF_MIB: &str = "MESHLESS_RINGBUF_MIB";
    pub const MEMORY_LIMIT: &str = "MESHLESS_MEMORY_LIMIT";
    pub const METRICS_ADDR: &str = "MESHLESS_METRICS_ADDR";
    pub const CAPTURE_REQUEST_HEADERS: &str = "MESHLESS_CAPTURE_REQUEST_HEADERS";
    pub const CAPTURE_RESPONSE_HEADERS: &str = "MESHLESS_CAPTURE_RESPONSE_HEADERS";
    pub const REDACT_HEADERS: &str = "MESHLESS_REDACT_HEADERS";
    pub const CAPTURE_QUERY: &str = "MESHLESS_CAPTURE_QUERY";
    pub const SERVICE_NAMES: &str = "MESHLESS_SERVICE_NAMES";
    pub const EXPORT_QUEUE: &str = "MESHLESS_EXPORT_QUEUE";
    pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
    pub const METRICS_EXPORTER: &str = "OTEL_METRICS_EXPORTER";
    pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    pub const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
    pub const OTLP_METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
    pub const OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
    pub const OTLP_HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
    pub const OTLP_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
    pub const OTLP_INSECURE: &str = "OTEL_EXPORTER_OTLP_INSECURE";
    pub const OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
    pub const SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
    pub const RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
    pub const TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
    pub const TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
    pub const METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";
    pub const KUBERNETES: &str = "MESHLESS_KUBERNETES";
    pub const UI: &str = "MESHLESS_UI";
    pub const NODE_NAME: &str = "NODE_NAME";
    pub const NAMESPACES: &str = "MESHLESS_NAMESPACES";
    pub const EXCLUDE_NAMESPACES: &str = "MESHLESS_EXCLUDE_NAMESPACES";
    pub const PROPAGATION: &str = "MESHLESS_PROPAGATION";
    pub const TLS: &str = "MESHLESS_TLS";
    pub const CGROUP: &str = "MESHLESS_CGROUP";
}

/// meshless: sidecarless HTTP tracing with eBPF.
///
/// Follows every HTTP/1.x connection on this machine from the kernel
/// (syscall tracepoints; no proxy, no restart of your apps) and prints one
/// span per request on each side of every call: method, path, status,
/// duration, process and peer. Needs root (or CAP_BPF + CAP_PERFMON) and
/// tracefs mounted at /sys/kernel/tracing.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshless", version, about, long_about)]
pub struct Config {
    /// How spans are printed on stdout: `human` (one readable line each) or
    /// `json` (one OTel-style JSON object per line, stable for tools).
    #[arg(long, value_enum, default_value = "human", env = env::CONSOLE_FORMAT)]
    pub console_format: Format,

    /// Ring-buffer size in MiB shared by all CPUs (a power of two). Larger
    /// absorbs longer bursts; overflow is counted, never fatal.
    #[arg(long, default_value_t = 8, env = env::RINGBUF_MIB, value_parser = parse_ringbuf_mib)]
    pub ringbuf_mib: u32,

    /// Memory budget for everything traced processes can make the agent
    /// hold (event queue, connection state, span and export queues, metric
    /// series), e.g. `128Mi`, `1Gi`, `500M` or bytes. Past it data is shed
    /// and counted in `meshless_dropped_total{reason}`; it never grows.
    /// Keep it well under the container's memory limit (code, the ring
    /// buffer and allocator slack come on top).
    #[arg(long, default_value = "128Mi", env = env::MEMORY_LIMIT, value_parser = parse_bytes)]
    pub memory_limit: u64,

    /// How often the ring buffer is drained under load, in milliseconds.
    /// When little arrives the agent waits longer (up to 100 ms) to save
    /// wakeups; the kernel wakes it early when the buffer is filling up
    /// (every `--wakeup-kib`). Larger drains cost less CPU per request
    /// (fewer wakeups and hand-offs, warmer caches); spans leave that much
    /// later, which their batched export (every 500 ms) hides.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub poll_interval_ms: u64,

    /// The kernel wakes the agent at once each time the ring buffer's fill
    /// crosses a multiple of this many KiB (0: on every event).
    #[arg(long, default_value_t = 256)]
    pub wakeup_kib: u64,

    /// Measure the time the kernel programs take inside the traced
    /// applications' syscalls: `meshless_kernel_program_runs_total` and
    /// `meshless_kernel_program_seconds_total`, by program (a tail-called
    /// program counts under its caller). Turns on the kernel's BPF run-time
    /// statistics while the agent runs, which adds a little to every BPF
    /// program run on the machine (two clock reads), so it is off by default.
    #[arg(long)]
    pub kernel_stats: bool,

    /// Development: also append every ring-buffer record to this file, for
    /// the replay benchmark (`cargo bench -p meshless --bench replay`).
    /// Holds payload bytes of the traffic: never on a real node.
    #[arg(long, hide = true)]
    pub record: Option<std::path::PathBuf>,

    /// Most connections tracked at once; the least recently active is
    /// dropped (and counted) beyond it.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(16..))]
    pub max_connections: u64,

    /// Forget connections idle for this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// Log self-statistics (events, drops, spans) every N seconds; 0 = only at exit.
    #[arg(long, default_value_t = 60)]
    pub stats_interval_secs: u64,

    /// Where spans go: comma-separated `console`, `otlp`, `none`. Default:
    /// `otlp` when an OTLP endpoint is configured, else `console`.
    #[arg(long, env = env::TRACES_EXPORTER, help_heading = "Export")]
    pub traces_exporter: Option<String>,

    /// Where RED metrics go besides the Prometheus endpoint: `otlp`, `none`.
    /// Default: `otlp` when an OTLP endpoint is configured, else `none`.
    #[arg(long, env = env::METRICS_EXPORTER, help_heading = "Export")]
    pub metrics_exporter: Option<String>,

    /// OTLP collector endpoint, e.g. `http://collector:4317` (gRPC) or
    /// `http://collector:4318` (HTTP; `/v1/traces` is appended).
    #[arg(long, env = env::OTLP_ENDPOINT, help_heading = "Export")]
    pub otlp_endpoint: Option<String>,

    /// Full OTLP traces URL; overrides --otlp-endpoint for traces.
    #[arg(long, env = env::OTLP_TRACES_ENDPOINT, help_heading = "Export")]
    pub otlp_traces_endpoint: Option<String>,

    /// Full OTLP metrics URL; overrides --otlp-endpoint for metrics.
    #[arg(long, env = env::OTLP_METRICS_ENDPOINT, help_heading = "Export")]
    pub otlp_metrics_endpoint: Option<String>,

    /// OTLP transport: `grpc` (default, port 4317) or `http/protobuf` (4318).
    #[arg(long, env = env::OTLP_PROTOCOL, default_value = "grpc", help_heading = "Export")]
    pub otlp_protocol: String,

    /// Extra OTLP request headers, `key=value,key2=value2` (values URL-encoded),
    /// e.g. an API key for a hosted backend.
    #[arg(long, env = env::OTLP_HEADERS, help_heading = "Export")]
    pub otlp_headers: Option<String>,

    /// OTLP export timeout in milliseconds.
    #[arg(long, env = env::OTLP_TIMEOUT, default_value_t = 10_000, help_heading = "Export")]
    pub otlp_timeout_ms: u64,

    /// Use plaintext gRPC even for a non-`http://` endpoint.
    #[arg(long, env = env::OTLP_INSECURE, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", help_heading = "Export")]
    pub otlp_insecure: bool,

    /// PEM file with the CA that signed the collector's certificate (gRPC over TLS).
    #[arg(long, env = env::OTLP_CERTIFICATE, help_heading = "Export")]
    pub otlp_certificate: Option<std::path::PathBuf>,

    /// Spans held for export at most; beyond it new spans are dropped and
    /// counted (memory stays bounded while the collector is down).
    #[arg(long, env = env::EXPORT_QUEUE, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Export")]
    pub export_queue: u64,

    /// Sampler: `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`
    /// (default), `parentbased_always_off`, `parentbased_traceidratio`.
    /// Metrics always count every request, before sampling.
    #[arg(long, env = env::TRACES_SAMPLER, default_value = "parentbased_always_on", help_heading = "Export")]
    pub sampler: String,

    /// Sampler argument: the ratio (0.0 to 1.0) for the ratio samplers.
    #[arg(long, env = env::TRACES_SAMPLER_ARG, help_heading = "Export")]
    pub sampler_arg: Option<String>,

    /// The agent's own service name (its self-telemetry resource).
    #[arg(long, env = env::SERVICE_NAME, default_value = "meshless", help_heading = "Export")]
    pub service_name: String,

    /// Extra resource attributes on every exported workload, `k=v,k2=v2`.
    #[arg(long, env = env::RESOURCE_ATTRIBUTES, help_heading = "Export")]
    pub resource_attributes: Option<String>,

    /// Rename workloads: `name=service,name2=service2` sets `service.name`
    /// of processes by name as `ps` shows it, or by executable name
    /// (default: the process name itself).
    #[arg(long, env = env::SERVICE_NAMES, help_heading = "Export")]
    pub service_names: Option<String>,

    /// OTLP metrics export interval in milliseconds.
    #[arg(long, env = env::METRIC_EXPORT_INTERVAL, default_value_t = 15_000, help_heading = "Export")]
    pub metric_export_interval_ms: u64,

    /// Address of the admin server: Prometheus `/metrics` (RED metrics,
    /// Istio-compatible series, agent self-metrics), `/healthz`, `/readyz`.
    /// `off` disables it.
    #[arg(long, env = env::METRICS_ADDR, default_value = "0.0.0.0:9464", value_parser = parse_addr, help_heading = "Export")]
    pub metrics_addr: Listen,

    /// The live service map and trace view in the browser, served on the
    /// admin server's address (`http://<metrics-addr>/`): `auto` (on, except
    /// in Kubernetes mode, where the admin port is reachable cluster-wide),
    /// `on` or `off`. Read-only; shows what the exporters export.
    #[arg(long, value_enum, env = env::UI, default_value = "auto", help_heading = "Export")]
    pub ui: Toggle,

    /// Request headers exported as `http.request.header.<name>`, comma-separated.
    /// Authorization, Proxy-Authorization, Cookie and Set-Cookie values are
    /// always replaced by `REDACTED`.
    #[arg(long, env = env::CAPTURE_REQUEST_HEADERS, value_delimiter = ',', default_value = "x-request-id", help_heading = "Privacy")]
    pub capture_request_headers: Vec<String>,

    /// Response headers exported as `http.response.header.<name>`, comma-separated.
    #[arg(long, env = env::CAPTURE_RESPONSE_HEADERS, value_delimiter = ',', help_heading = "Privacy")]
    pub capture_response_headers: Vec<String>,

    /// More header names whose values are never exported (besides
    /// Authorization, Proxy-Authorization, Cookie, Set-Cookie).
    #[arg(long, env = env::REDACT_HEADERS, value_delimiter = ',', help_heading = "Privacy")]
    pub redact_headers: Vec<String>,

    /// Export the query string (`url.query`); off by default because
    /// queries often carry tokens and personal data.
    #[arg(long, env = env::CAPTURE_QUERY, default_value_t = false, help_heading = "Privacy")]
    pub capture_query: bool,

    /// Kubernetes metadata (pod, workload, namespace on every span): `auto`
    /// (on when NODE_NAME is set, as the DaemonSet does), `on` or `off`.
    /// Uses the in-cluster ServiceAccount, or KUBECONFIG.
    #[arg(long, value_enum, env = env::KUBERNETES, default_value = "auto", help_heading = "Kubernetes")]
    pub kubernetes: Toggle,

    /// This node's name (set from the downward API `spec.nodeName`); only
    /// pods on this node are watched.
    #[arg(long, env = env::NODE_NAME, help_heading = "Kubernetes")]
    pub node_name: Option<String>,

    /// Trace only these namespaces (comma-separated; default: all).
    #[arg(long, env = env::NAMESPACES, value_delimiter = ',', help_heading = "Kubernetes")]
    pub namespaces: Vec<String>,

    /// Never trace these namespaces (comma-separated). Pods can also opt out
    /// with the annotation `meshless.io/trace: "false"`.
    #[arg(long, env = env::EXCLUDE_NAMESPACES, value_delimiter = ',', help_heading = "Kubernetes")]
    pub exclude_namespaces: Vec<String>,

    /// How a call's trace context reaches the server's node: `tcp-options`
    /// (default: the client span's ids ride in a TCP header option of the
    /// request's first segment; no payload byte changes; both ends need
    /// meshless, as a DaemonSet gives), `headers` (inject `traceparent`;
    /// refused: it needs sockmap, which breaks FIONREAD on current
    /// kernels), or `off` (nothing touches traffic; same-node calls still
    /// link by their TCP connection).
    #[arg(long, value_enum, env = env::PROPAGATION, default_value = "tcp-options", help_heading = "Trace context")]
    pub propagation: Propagation,

    /// Trace HTTPS by reading plaintext at OpenSSL (`libssl.so.*`) with
    /// uprobes: `auto` (default: every library whose probes sit on
    /// instructions the kernel emulates, ~1-3 µs per SSL call), `on` (also
    /// libraries where the probe single-steps: ~29 µs per call on VMs,
    /// docs/tls.md), or `off` (TLS connections give no spans).
    #[arg(long, value_enum, env = env::TLS, default_value = "auto")]
    pub tls: TlsMode,

    /// Trace only processes in this cgroup2 subtree (absolute path, e.g.
    /// /sys/fs/cgroup/kubepods.slice, or relative to the cgroup2 mount).
    /// The TCP-option program is attached there too. Default: everything.
    #[arg(long, env = env::CGROUP, help_heading = "Trace context")]
    pub cgroup: Option<std::path::PathBuf>,

    /// Log filter for the agent's own logs on stderr (e.g. `info`, `meshless=debug`).
    #[arg(long, default_value = "info", env = env::LOG)]
    pub log_level: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = env::LOG_FORMAT)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

impl Config {
    /// Whether to serve the live view (`--ui`), given whether Kubernetes
    /// mode is on.
    pub fn ui_enabled(&self, kubernetes: bool) -> bool {
        match self.ui {
            Toggle::On => self.metrics_addr.0.is_some(),
            Toggle::Off => false,
            Toggle::Auto => !kubernetes && self.metrics_addr.0.is_some(),
        }
    }

    /// The node name when Kubernetes metadata is wanted; an error names
    /// what is missing.
    pub fn kubernetes_node(&self) -> Result<Option<String>, String> {
        let node = self.node_name.clone().filter(|n| !n.is_empty());
        match (self.kubernetes, node) {
            (Toggle::Off, _) | (Toggle::Auto, None) => Ok(None),
            (_, Some(n)) => Ok(Some(n)),
            (Toggle::On, None) => Err(
                "--kubernetes on needs the node name: set NODE_NAME (the DaemonSet sets it from spec.nodeName)".into(),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Which TLS libraries get plaintext uprobes (`--tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    Auto,
    On,
    Off,
}

/// Trace-context propagation between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Propagation {
    TcpOptions,
    Headers,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A listen address, or none (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_addr(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") || s.eq_ignore_ascii_case("none") {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("`{s}` is not an address like 0.0.0.0:9464 (or `off`)"))
}

fn parse_ringbuf_mib(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if n == 0 || !n.is_power_of_two() || n > 1024 {
        return Err(format!(
            "ring buffer size must be a power of two between 1 and 1024 MiB, got {n}"
        ));
    }
    Ok(n)
}

/// A size like `192Mi`, `1Gi`, `64MiB`, `500M`, `10k` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 128Mi, 1Gi or 500M"))?;
    let mult: u64 = match unit.trim().trim_end_matches('B') {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit; use Ki, Mi, Gi (or k, M, G)")),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("`{s}` is below the 1Mi minimum the agent needs to work"));
    }
    Ok(bytes)
}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_print_human_spans() {
        let c = Config::try_parse_from(["meshless"]).expect("defaults parse");
        assert_eq!(c.console_format, Format::Human);
        assert_eq!(c.ringbuf_mib, 8);
    }

    #[test]
    fn memory_limits_accept_kubernetes_and_si_sizes() {
        assert_eq!(parse_bytes("192Mi"), Ok(192 << 20));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("2097152"), Ok(2 << 20));
        for bad in ["", "Mi", "12Xi", "-5Mi", "10Ki", "99999999999999Gi"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        let c = Config::try_parse_from(["meshless"]).expect("defaults parse");
        assert_eq!(c.memory_limit, crate::budget::DEFAULT_LIMIT);
    }

    #[test]
    fn rejects_a_ring_buffer_that_is_not_a_power_of_two() {
        let err = Config::try_parse_from(["meshless", "--ringbuf-mib", "3"]).expect_err("must fail");
        assert!(err.to_string().contains("power of two"), "{err}");
    }
}
