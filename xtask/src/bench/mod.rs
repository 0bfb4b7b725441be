//! `cargo xtask bench`: overhead of meshless against an Envoy sidecar,
//! measured side by side in one run, for an HTTP/1.1 and a gRPC workload.
//! See docs/bench/README.md.
mod env;
mod grpc;
mod report;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::{status, step};
use env::*;

/// Options of a benchmark run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A few-second run of the same code path (used by the test suite).
    #[arg(long)]
    pub quick: bool,
    /// Fixed request rates to measure, req/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub rates: Vec<u32>,
    /// Seconds of measured load per mode, rate and round.
    #[arg(long, default_value_t = 15)]
    pub duration: u64,
    /// Rounds; modes are interleaved within each round.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Keep-alive connections of the load generator (same for every mode).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Where results go (default docs/bench; --quick uses target/bench-quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Workloads to measure: `http` (HTTP/1.1 to nginx, load by oha),
    /// `grpc` (unary gRPC to a tonic server over h2c, load by grpc-load) and
    /// `https` (HTTP/1.1 over TLS to nginx, load by oha; baseline and
    /// meshless only: a sidecar terminating TLS is another architecture).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http,grpc,https")]
    pub workloads: Vec<Workload>,
    /// HTTP/2 connections of the gRPC load generator (calls are multiplexed).
    #[arg(long, default_value_t = 2)]
    pub grpc_connections: u32,
}

/// What traffic is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Http,
    Grpc,
    Https,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Http => "HTTP/1.1",
            Workload::Grpc => "gRPC unary",
            Workload::Https => "HTTPS (HTTP/1.1 over TLS)",
        }
    }

    /// Modes measured for this workload (propagation on/off is an HTTP-only comparison).
    pub fn modes(self) -> &'static [Mode] {
        match self {
            Workload::Http => &Mode::ALL,
            Workload::Grpc => &[Mode::Baseline, Mode::Sidecar, Mode::Meshless],
            Workload::Https => &[Mode::Baseline, Mode::Meshless],
        }
    }

    /// (app port, sidecar) of this workload's server.
    fn target(self) -> (u16, Option<&'static Sidecar>) {
        match self {
            Workload::Http => (APP_PORT, Some(&HTTP_SIDECAR)),
            Workload::Grpc => (grpc::GRPC_PORT, Some(&grpc::GRPC_SIDECAR)),
            Workload::Https => (TLS_PORT, None),
        }
    }

    /// Spans a fully traced request yields in `mode`: meshless traces both
    /// sides (client and server span), the inbound sidecar one. Over TLS
    /// meshless sees nginx's OpenSSL but not oha's rustls (not covered, see
    /// docs/tls.md): one span, the server's.
    fn spans_per_request(self, mode: Mode) -> u64 {
        match (mode, self) {
            (Mode::Baseline, _) => 0,
            (Mode::Sidecar, _) => 1,
            (Mode::Meshless | Mode::MeshlessNoPropagation, Workload::Https) => 1,
            (Mode::Meshless | Mode::MeshlessNoPropagation, _) => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Baseline,
    Sidecar,
    /// The agent with its defaults: trace context in TCP options.
    Meshless,
    /// The agent with `--propagation off`: nothing touches traffic.
    #[serde(rename = "meshless-propagation-off")]
    MeshlessNoPropagation,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Baseline,
        Mode::Sidecar,
        Mode::Meshless,
        Mode::MeshlessNoPropagation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Sidecar => "sidecar",
            Mode::Meshless => "meshless",
            Mode::MeshlessNoPropagation => "meshless, propagation off",
        }
    }
}

/// One measured (workload, mode, rate, round).
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub workload: Workload,
    pub mode: Mode,
    pub rate: u32,
    pub round: u32,
    pub error: Option<String>,
    pub requests: u64,
    pub achieved_rps: f64,
    /// Latency percentiles in milliseconds: p50, p90, p99, p99.9.
    pub latency_ms: [f64; 4],
    pub proxy_cpu_pct: Option<f64>,
    pub proxy_rss_mib: Option<f64>,
    pub collector_cpu_pct: Option<f64>,
    pub collector_rss_mib: Option<f64>,
    pub spans: Option<u64>,
    pub completeness: Option<f64>,
    /// Requests (calls) that got no answer: transport errors, timeouts.
    pub failed: u64,
    /// Agent/proxy CPU time per answered request, µs.
    pub cpu_us_per_request: Option<f64>,
    /// Ring-buffer events the agent read per answered request (all traffic
    /// on the machine counts, so run the bench on a quiet machine).
    pub events_per_request: Option<f64>,
    /// What the agent counted as lost over the run (from the warm-up's end
    /// to the last export), so a completeness under 100 % is attributed.
    pub agent_losses: Option<Losses>,
}

/// The agent's loss counters, as deltas over a run (machine-wide).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Losses {
    /// Events the kernel could not write: the ring buffer was full.
    pub ring_full: u64,
    /// Events dropped because the pipeline was behind.
    pub queue: u64,
    /// Spans an exporter dropped (queue full, export failed).
    pub exporter: u64,
    /// Data shed by the memory budget (`meshless_dropped_total`).
    pub shed: u64,
    /// Connections whose pairing restarted: kernel sequence gaps and resyncs.
    pub pairing: u64,
}

impl Losses {
    const COUNTERS: [&'static str; 7] = [
        "kernel_ringbuf_full",
        "events_dropped_queue",
        "otlp_spans_dropped",
        "spans_dropped",
        "dropped",
        "event_sequence_gaps",
        "http_pairing_resyncs",
    ];

    fn read() -> Option<[u64; 7]> {
        agent_counters(&Self::COUNTERS)
    }

    fn between(a: [u64; 7], b: [u64; 7]) -> Self {
        let d = |i: usize| b[i].saturating_sub(a[i]);
        Losses {
            ring_full: d(0),
            queue: d(1),
            exporter: d(2) + d(3),
            shed: d(4),
            pairing: d(5) + d(6),
        }
    }

    pub fn add(self, o: Losses) -> Losses {
        Losses {
            ring_full: self.ring_full + o.ring_full,
            queue: self.queue + o.queue,
            exporter: self.exporter + o.exporter,
            shed: self.shed + o.shed,
            pairing: self.pairing + o.pairing,
        }
    }

    /// `0`, or the non-zero counts by name.
    pub fn text(&self) -> String {
        let parts: Vec<String> = [
            ("ring full", self.ring_full),
            ("queue", self.queue),
            ("exporter", self.exporter),
            ("shed", self.shed),
            ("pairing", self.pairing),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!("{what} {n}"))
        .collect();
        if parts.is_empty() {
            "0".into()
        } else {
            parts.join(", ")
        }
    }
}

/// One closed-loop (max throughput) run.
#[derive(Debug, Clone, Serialize)]
pub struct MaxRun {
    pub mode: Mode,
    pub error: Option<String>,
    pub rps: f64,
}

struct Tools {
    oha: PathBuf,
    envoy: PathBuf,
    rotel: PathBuf,
    meshless: PathBuf,
    /// Built only when the gRPC workload runs.
    grpc_load: Option<PathBuf>,
}

pub fn run(root: &Path, mut args: BenchArgs) -> Result<()> {
    if args.quick {
        args.rates = vec![300];
        args.duration = 2;
        args.rounds = 1;
        args.connections = 4;
        args.grpc_connections = 1;
    }
    if args.workloads.is_empty() {
        bail!("--workloads: name at least one of http, grpc, https");
    }
    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            root.join("target/bench-quick")
        } else {
            root.join("docs/bench")
        }
    });
    let tools = prepare(root, &args)?;
    let work = root.join("target/bench-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&out)?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;

    step("creating the client and server pods (network namespaces)");
    let _pods = Pods::create()?;
    let _nginx = start_nginx(&work)?;
    let _grpc_server = match &tools.grpc_load {
        Some(bin) => Some(grpc::start_server(bin, &work)?),
        None => None,
    };

    let per_run = args.duration + 12;
    let rows: u64 = args.workloads.iter().map(|w| w.modes().len() as u64).sum();
    let closed_loop = if args.workloads.contains(&Workload::Http) {
        Mode::ALL.len() as u64
    } else {
        0
    };
    let total = u64::from(args.rounds) * args.rates.len() as u64 * rows + closed_loop;
    let started = Instant::now();
    let mut done = 0u64;
    let mut runs = Vec::new();
    'rounds: for round in 0..args.rounds {
        for &rate in &args.rates {
            for (workload, mode) in interleaved(&args.workloads, round) {
                if stop.load(Ordering::SeqCst) {
                    break 'rounds;
                }
                let left = (total - done) * per_run;
                step(&format!(
                    "[{}/{total}] round {}/{} · {rate} req/s · {} · {} · ~{}m{:02}s left",
                    done + 1,
                    round + 1,
                    args.rounds,
                    workload.name(),
                    mode.name(),
                    left / 60,
                    left % 60
                ));
                let run = measure(&tools, &work, workload, mode, rate, round, &args).unwrap_or_else(|e| Run {
                    error: Some(format!("{e:#}")),
                    ..Run::empty(workload, mode, rate, round)
                });
                if let Some(e) = &run.error {
                    eprintln!("    {} failed: {e}", mode.name());
                } else {
                    eprintln!(
                        "    p50 {:.3} ms  p99 {:.3} ms  {:.0} req/s  completeness {}  CPU/request {}  events/request {}  agent losses {}{}",
                        run.latency_ms[0],
                        run.latency_ms[2],
                        run.achieved_rps,
                        run.completeness.map_or("-".into(), |c| format!("{:.2}%", c * 100.0)),
                        run.cpu_us_per_request.map_or("-".into(), |c| format!("{c:.1} µs")),
                        run.events_per_request.map_or("-".into(), |e| format!("{e:.2}")),
                        run.agent_losses.map_or("-".into(), |l| l.text()),
                        if run.failed > 0 { format!("  {} FAILED", run.failed) } else { String::new() },
                    );
                }
                runs.push(run);
                done += 1;
            }
        }
    }
    let mut max_runs = Vec::new();
    for mode in Mode::ALL {
        if closed_loop == 0 || stop.load(Ordering::SeqCst) {
            break;
        }
        step(&format!(
            "[{}/{total}] closed-loop max throughput · {}",
            done + 1,
            mode.name()
        ));
        max_runs.push(max_throughput(&tools, &work, mode, &args).unwrap_or_else(|e| MaxRun {
            mode,
            error: Some(format!("{e:#}")),
            rps: 0.0,
        }));
        done += 1;
    }
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted; every process the bench started was stopped");
    }
    let report = report::Report::build(&args, &tools_versions(&tools), runs, max_runs, started.elapsed());
    report.write(&out)?;
    step(&format!("results written to {}", out.display()));
    println!("{}", report.markdown());
    if args.quick {
        report.check_quick()?;
    }
    Ok(())
}

/// The (workload, mode) pairs of one round and rate, workloads alternating
/// and each round starting with a different mode, so machine noise hits
/// every mode alike.
fn interleaved(workloads: &[Workload], round: u32) -> Vec<(Workload, Mode)> {
    let mut rows = Vec::new();
    for &w in workloads {
        let modes = w.modes();
        rows.extend((0..modes.len()).map(|i| (w, modes[(i + round as usize) % modes.len()])));
    }
    rows
}

impl Run {
    fn empty(workload: Workload, mode: Mode, rate: u32, round: u32) -> Run {
        Run {
            workload,
            mode,
            rate,
            round,
            error: None,
            requests: 0,
            achieved_rps: 0.0,
            latency_ms: [0.0; 4],
            proxy_cpu_pct: None,
            proxy_rss_mib: None,
            collector_cpu_pct: None,
            collector_rss_mib: None,
            spans: None,
            completeness: None,
            failed: 0,
            cpu_us_per_request: None,
            events_per_request: None,
            agent_losses: None,
        }
    }
}

fn prepare(root: &Path, args: &BenchArgs) -> Result<Tools> {
    crate::setup::run()?;
    crate::setup::bench_tools()?;
    crate::setup::mount_tracefs()?;
    step("building the agent (release); nothing compiles while measuring");
    status(
        crate::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "meshless"]),
    )?;
    let grpc_load = if args.workloads.contains(&Workload::Grpc) {
        Some(grpc::build(root)?)
    } else {
        None
    };
    let oha = crate::setup::cargo_bin("oha");
    Ok(Tools {
        oha,
        envoy: pip_file("envoy", "_bin/envoy")?,
        rotel: pip_file("rotel", "rotel-agent")?,
        meshless: root.join("target/release/meshless"),
        grpc_load,
    })
}

fn tools_versions(t: &Tools) -> Vec<(String, String)> {
    let v = |bin: &Path, arg: &str| {
        Command::new(bin)
            .arg(arg)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    vec![
        ("meshless".into(), env!("CARGO_PKG_VERSION").into()),
        ("envoy".into(), v(&t.envoy, "--version")),
        ("oha".into(), v(&t.oha, "--version")),
        ("nginx".into(), v(Path::new("nginx"), "-v")),
        ("rotel".into(), "0.0.1a15".into()),
    ]
}

/// Processes a mode adds, and where the load goes.
struct Running {
    procs: Vec<Proc>,
    port: u16,
    proxy: Option<u32>,
    collector: Option<u32>,
    rotel_log: Option<PathBuf>,
}

fn start_mode(t: &Tools, work: &Path, workload: Workload, mode: Mode, tag: &str) -> Result<Running> {
    let rotel_log = work.join(format!("rotel-{tag}.log"));
    let (app_port, sidecar) = workload.target();
    Ok(match mode {
        Mode::Baseline => Running {
            procs: vec![],
            port: app_port,
            proxy: None,
            collector: None,
            rotel_log: None,
        },
        Mode::Sidecar => {
            let Some(sidecar) = sidecar else {
                bail!("{} has no sidecar comparison", workload.name());
            };
            let rotel = start_rotel(&t.rotel, Some(SERVER_NS), &rotel_log)?;
            let envoy = start_envoy(&t.envoy, work, 7000 + std::process::id() % 1000, sidecar)?;
            Running {
                proxy: Some(envoy.pid()),
                collector: Some(rotel.pid()),
                procs: vec![envoy, rotel],
                port: sidecar.listen,
                rotel_log: Some(rotel_log),
            }
        }
        Mode::Meshless | Mode::MeshlessNoPropagation => {
            let rotel = start_rotel(&t.rotel, None, &rotel_log)?;
            let propagation = if mode == Mode::Meshless { "tcp-options" } else { "off" };
            let agent = start_meshless(&t.meshless, work, &["--propagation", propagation])?;
            Running {
                proxy: Some(agent.pid()),
                collector: Some(rotel.pid()),
                procs: vec![agent, rotel],
                port: app_port,
                rotel_log: Some(rotel_log),
            }
        }
    })
}

/// Runs oha in the client pod; returns its JSON summary.
fn oha(t: &Tools, port: u16, secs: u64, rate: Option<u32>, conns: u32) -> Result<serde_json::Value> {
    let scheme = if port == TLS_PORT { "https" } else { "http" };
    let url = format!("{scheme}://{SERVER_IP}:{port}/");
    let mut c = cmd(Some(CLIENT_NS), &t.oha.display().to_string());
    if scheme == "https" {
        // The bench's own self-signed certificate.
        c.arg("--insecure");
    }
    c.args([
        "--no-tui",
        "--output-format",
        "json",
        "-z",
        &format!("{secs}s"),
        "-c",
        &conns.to_string(),
    ]);
    if let Some(rate) = rate {
        c.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    c.arg(&url);
    json_output(c, "oha")
}

/// Runs a load generator that prints its summary as JSON on stdout.
fn json_output(mut c: Command, what: &str) -> Result<serde_json::Value> {
    let out = c.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {what}'s JSON output"))
}

/// Load of `workload` against `port` for `secs`; oha-shaped JSON either way.
fn load(
    t: &Tools,
    workload: Workload,
    port: u16,
    secs: u64,
    rate: Option<u32>,
    args: &BenchArgs,
) -> Result<serde_json::Value> {
    match (workload, &t.grpc_load, rate) {
        (Workload::Http | Workload::Https, _, _) => oha(t, port, secs, rate, args.connections),
        (Workload::Grpc, Some(bin), Some(rate)) => grpc::load(bin, port, secs, rate, args.grpc_connections),
        (Workload::Grpc, None, _) => bail!("grpc-load was not built"),
        (Workload::Grpc, _, None) => bail!("the gRPC load runs at fixed rates only"),
    }
}

/// Answered requests. oha: HTTP status counts; grpc-load: gRPC status counts.
fn requests_ok(v: &serde_json::Value) -> u64 {
    v["statusCodeDistribution"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(serde_json::Value::as_u64).sum())
}

/// Requests that got no answer (connection errors, timeouts). oha's
/// "aborted due to deadline" are the requests still in flight when its
/// duration ends: cut off by the load generator, not failed.
fn requests_failed(v: &serde_json::Value) -> u64 {
    v["errorDistribution"].as_object().map_or(0, |m| {
        m.iter()
            .filter(|(why, _)| !why.contains("aborted due to deadline"))
            .filter_map(|(_, n)| n.as_u64())
            .sum()
    })
}

fn measure(
    t: &Tools,
    work: &Path,
    workload: Workload,
    mode: Mode,
    rate: u32,
    round: u32,
    args: &BenchArgs,
) -> Result<Run> {
    let tag = format!("{workload:?}-{}-{rate}-{round}", mode.name()).replace([' ', ','], "");
    let running = start_mode(t, work, workload, mode, &tag)?;
    // Warm up connections, caches and the collector pipeline, then let
    // the warm-up's spans drain before counting.
    load(t, workload, running.port, 1, Some(rate), args)?;
    sleep(Duration::from_millis(if mode == Mode::Sidecar { 6000 } else { 1500 }));
    let spans_before = running.rotel_log.as_deref().map(spans_received);
    let agent = matches!(mode, Mode::Meshless | Mode::MeshlessNoPropagation);
    let events = || if agent { agent_counter("events_read") } else { None };
    let ticks = |p: Option<u32>| p.map(cpu_ticks);
    let losses = || if agent { Losses::read() } else { None };
    let (events0, losses0) = (events(), losses());
    let (proxy0, coll0, t0) = (ticks(running.proxy), ticks(running.collector), Instant::now());
    let v = load(t, workload, running.port, args.duration, Some(rate), args)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (proxy1, coll1) = (ticks(running.proxy), ticks(running.collector));
    let events1 = events();
    // Envoy's tracer flushes every 5 s; give both exporters time.
    if mode != Mode::Baseline {
        sleep(Duration::from_secs(7));
    }
    let agent_losses = match (losses0, losses()) {
        (Some(a), Some(b)) => Some(Losses::between(a, b)),
        _ => None,
    };
    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / 100.0 / elapsed * 100.0),
        _ => None,
    };
    let requests = requests_ok(&v);
    let spans = match (spans_before, running.rotel_log.as_deref()) {
        (Some(before), Some(log)) => Some(spans_received(log).saturating_sub(before)),
        _ => None,
    };
    let lat = &v["latencyPercentiles"];
    let ms = |k: &str| lat[k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let per_request = |n: f64| (requests > 0).then(|| n / requests as f64);
    let run = Run {
        workload,
        mode,
        rate,
        round,
        error: None,
        requests,
        achieved_rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        latency_ms: [ms("p50"), ms("p90"), ms("p99"), ms("p99.9")],
        proxy_cpu_pct: pct(proxy0, proxy1),
        proxy_rss_mib: running.proxy.map(peak_rss_mib),
        collector_cpu_pct: pct(coll0, coll1),
        collector_rss_mib: running.collector.map(peak_rss_mib),
        spans,
        completeness: spans.map(|s| s as f64 / (requests * workload.spans_per_request(mode)).max(1) as f64),
        failed: requests_failed(&v),
        // Clock ticks are 10 ms: 1 tick = 10 000 µs.
        cpu_us_per_request: match (proxy0, proxy1) {
            (Some(a), Some(b)) => per_request(b.saturating_sub(a) as f64 * 10_000.0),
            _ => None,
        },
        events_per_request: match (events0, events1) {
            (Some(a), Some(b)) => per_request(b.saturating_sub(a) as f64),
            _ => None,
        },
        agent_losses,
    };
    drop(running.procs);
    Ok(run)
}

fn max_throughput(t: &Tools, work: &Path, mode: Mode, args: &BenchArgs) -> Result<MaxRun> {
    let running = start_mode(t, work, Workload::Http, mode, &format!("{}-max", mode.name()))?;
    let v = oha(t, running.port, args.duration.clamp(1, 10), None, args.connections)?;
    drop(running.procs);
    Ok(MaxRun {
        mode,
        error: None,
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
    })
}
