//! `cargo xtask soak --minutes N`: a release agent under steady traffic
//! plus churn (see [`traffic`]) on loopback, sampled every second: RSS,
//! CPU, drops, spans. Writes docs/soak/soak.json and soak.svg, and fails
//! if the agent died, turned unhealthy, or its memory kept growing.
mod plot;
mod traffic;

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// The agent's --memory-limit.
    #[arg(long, default_value = "128Mi")]
    pub memory_limit: String,
    /// Where soak.json and soak.svg go (default docs/soak).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One sample per second.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub rss_mib: f64,
    pub cpu_pct: f64,
    pub dropped: f64,
    pub spans: f64,
    pub conns_tracked: f64,
    pub requests: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    minutes: u64,
    memory_limit: String,
    requests: u64,
    healthy_at_end: bool,
    rss_mib_first_minute_max: f64,
    rss_mib_max: f64,
    rss_mib_last: f64,
    cpu_pct_mean: f64,
    dropped_total: f64,
    spans_total: f64,
    samples: Vec<Sample>,
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SIGINT so the agent detaches its probes cleanly.
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(root: &Path, args: SoakArgs) -> Result<()> {
    crate::step("building the release agent");
    crate::status(
        crate::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "meshless"]),
    )?;
    crate::setup::mount_tracefs()?;
    let out = args.out.clone().unwrap_or_else(|| root.join("docs/soak"));
    std::fs::create_dir_all(&out)?;
    let log = out.join("agent.log");
    let bin = root.join("target/release/meshless");
    let child = Command::new(&bin)
        .args([
            "--console-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
            "--stats-interval-secs",
            "60",
        ])
        .args(["--memory-limit", &args.memory_limit])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut agent = AgentProc(child);
    let pid = agent.0.id();
    let admin = wait_ready(&log)?;
    crate::step(&format!(
        "soaking for {} min (agent pid {pid}, admin {admin})",
        args.minutes
    ));
    let traffic = traffic::Traffic::start()?;
    let mut samples = Vec::new();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.minutes * 60);
    let mut last_cpu = cpu_ticks(pid);
    let mut last_t = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(Some(st)) = agent.0.try_wait() {
            traffic.stop();
            bail!("the agent exited during the soak ({st}); see {}", log.display());
        }
        let (cpu, now) = (cpu_ticks(pid), Instant::now());
        let cpu_pct = (cpu - last_cpu) as f64 / now.duration_since(last_t).as_secs_f64();
        (last_cpu, last_t) = (cpu, now);
        let metrics = get(&admin, "/metrics").unwrap_or_default();
        let c = &traffic.counts;
        let requests = [&c.keepalive, &c.churn, &c.processes, &c.unanswered]
            .iter()
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        samples.push(Sample {
            t_secs: start.elapsed().as_secs_f64(),
            rss_mib: rss_mib(pid),
            cpu_pct,
            dropped: metric(&metrics, "meshless_dropped_total"),
            spans: metric(&metrics, "meshless_spans_created_total"),
            conns_tracked: metric(&metrics, "meshless_conns_tracked"),
            requests,
        });
    }
    traffic.stop();
    let health = get(&admin, "/healthz").unwrap_or_default();
    drop(agent);
    let report = summarize(&args, samples, health.contains("ok"));
    std::fs::write(out.join("soak.json"), serde_json::to_string_pretty(&report)?)?;
    plot::draw(&report.samples, &out.join("soak.svg"))?;
    crate::step(&format!(
        "soak: {} requests, RSS max {:.1} MiB (first minute {:.1}), last {:.1} MiB, CPU mean {:.1}%, drops {}, spans {}; wrote {}",
        report.requests,
        report.rss_mib_max,
        report.rss_mib_first_minute_max,
        report.rss_mib_last,
        report.cpu_pct_mean,
        report.dropped_total,
        report.spans_total,
        out.join("soak.json").display()
    ));
    check(&report)
}

fn summarize(args: &SoakArgs, samples: Vec<Sample>, healthy: bool) -> Report {
    let max = |it: &mut dyn Iterator<Item = f64>| it.fold(0.0f64, f64::max);
    let n = samples.len().max(1) as f64;
    Report {
        minutes: args.minutes,
        memory_limit: args.memory_limit.clone(),
        requests: samples.last().map_or(0, |s| s.requests),
        healthy_at_end: healthy,
        rss_mib_first_minute_max: max(&mut samples.iter().filter(|s| s.t_secs <= 60.0).map(|s| s.rss_mib)),
        rss_mib_max: max(&mut samples.iter().map(|s| s.rss_mib)),
        rss_mib_last: samples.last().map_or(0.0, |s| s.rss_mib),
        cpu_pct_mean: samples.iter().map(|s| s.cpu_pct).sum::<f64>() / n,
        dropped_total: samples.last().map_or(0.0, |s| s.dropped),
        spans_total: samples.last().map_or(0.0, |s| s.spans),
        samples,
    }
}

/// The soak passes when the agent stayed healthy, traced the traffic, and
/// its RSS stayed within the budget plus a fixed allowance for code,
/// ring buffer and allocator.
fn check(r: &Report) -> Result<()> {
    if !r.healthy_at_end {
        bail!("the agent was not healthy at the end of the soak");
    }
    if r.spans_total <= 0.0 {
        bail!("the agent made no spans during the soak");
    }
    let budget_mib = parse_mib(&r.memory_limit);
    if r.rss_mib_max > budget_mib + 64.0 {
        bail!(
            "RSS peaked at {:.1} MiB, over the {budget_mib} MiB budget + 64 MiB",
            r.rss_mib_max
        );
    }
    Ok(())
}

fn parse_mib(s: &str) -> f64 {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: f64 = digits.parse().unwrap_or(128.0);
    match s.trim_start_matches(|c: char| c.is_ascii_digit()) {
        "Gi" => n * 1024.0,
        "Ki" => n / 1024.0,
        _ => n,
    }
}

fn wait_ready(log: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(addr) = text.split_whitespace().find_map(|kv| kv.strip_prefix("metrics=")) {
            return Ok(addr.to_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the agent did not become ready; see {}", log.display())
}

fn get(addr: &str, path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: soak\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sum of every sample of a metric in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time of a process in clock ticks (1/100 s): ticks per second = % of a core.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}
