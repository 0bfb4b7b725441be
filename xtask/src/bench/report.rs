//! Aggregating runs (median of rounds, spread) and writing JSON, a
//! markdown table and an SVG plot.
use std::{fs, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use super::{BenchArgs, Losses, MaxRun, Mode, Run, Workload};

/// Median of rounds for one (workload, mode, rate).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workload: Workload,
    pub mode: Mode,
    pub rate: u32,
    pub rounds_ok: usize,
    pub errors: Vec<String>,
    pub achieved_rps: f64,
    pub latency_ms: [f64; 4],
    /// max - min over rounds of p50 and p99.
    pub spread_p50_ms: f64,
    pub spread_p99_ms: f64,
    /// Over baseline at p50, p90, p99, p99.9 (ms).
    pub added_ms: Option<[f64; 4]>,
    pub proxy_cpu_pct: Option<f64>,
    pub proxy_rss_mib: Option<f64>,
    pub collector_cpu_pct: Option<f64>,
    pub collector_rss_mib: Option<f64>,
    pub completeness: Option<f64>,
    /// Unanswered requests, summed over rounds.
    pub failed: u64,
    pub cpu_us_per_request: Option<f64>,
    pub events_per_request: Option<f64>,
    /// The agent's loss counters, summed over rounds.
    pub agent_losses: Option<Losses>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MaxSummary {
    pub mode: Mode,
    pub error: Option<String>,
    pub rps: f64,
    pub lost_vs_baseline_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub versions: Vec<(String, String)>,
    pub rates: Vec<u32>,
    pub duration_secs: u64,
    pub rounds: u32,
    pub connections: u32,
    pub workloads: Vec<Workload>,
    pub grpc_connections: u32,
    pub wall_secs: u64,
    pub summary: Vec<Summary>,
    pub closed_loop: Vec<MaxSummary>,
    pub runs: Vec<Run>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn spread(v: &[f64]) -> f64 {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let max = finite.iter().copied().fold(f64::MIN, f64::max);
    let min = finite.iter().copied().fold(f64::MAX, f64::min);
    if finite.is_empty() {
        0.0
    } else {
        max - min
    }
}

fn first_line(path: &str) -> String {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let memory = first_line("/proc/meminfo").replace("MemTotal:", "").trim().to_owned();
    let kernel = first_line("/proc/sys/kernel/osrelease");
    Machine {
        kernel,
        cpu,
        cpus,
        memory,
    }
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Median over the rounds of one (workload, mode, rate).
fn summarise(runs: &[Run], workload: Workload, mode: Mode, rate: u32) -> Summary {
    let all: Vec<&Run> = runs
        .iter()
        .filter(|r| r.workload == workload && r.mode == mode && r.rate == rate)
        .collect();
    let ok: Vec<&Run> = all.iter().copied().filter(|r| r.error.is_none()).collect();
    let med = |f: &dyn Fn(&Run) -> Option<f64>| median(ok.iter().filter_map(|r| f(r)).collect());
    let lat = |i: usize| med(&|r| Some(r.latency_ms[i])).unwrap_or(f64::NAN);
    Summary {
        workload,
        mode,
        rate,
        rounds_ok: ok.len(),
        errors: all.iter().filter_map(|r| r.error.clone()).collect(),
        achieved_rps: med(&|r| Some(r.achieved_rps)).unwrap_or(0.0),
        latency_ms: [lat(0), lat(1), lat(2), lat(3)],
        spread_p50_ms: spread(&ok.iter().map(|r| r.latency_ms[0]).collect::<Vec<_>>()),
        spread_p99_ms: spread(&ok.iter().map(|r| r.latency_ms[2]).collect::<Vec<_>>()),
        added_ms: None,
        proxy_cpu_pct: med(&|r| r.proxy_cpu_pct),
        proxy_rss_mib: med(&|r| r.proxy_rss_mib),
        collector_cpu_pct: med(&|r| r.collector_cpu_pct),
        collector_rss_mib: med(&|r| r.collector_rss_mib),
        completeness: med(&|r| r.completeness),
        failed: ok.iter().map(|r| r.failed).sum(),
        cpu_us_per_request: med(&|r| r.cpu_us_per_request),
        events_per_request: med(&|r| r.events_per_request),
        agent_losses: ok.iter().filter_map(|r| r.agent_losses).reduce(Losses::add),
    }
}

impl Report {
    pub fn build(
        args: &BenchArgs,
        versions: &[(String, String)],
        runs: Vec<Run>,
        max: Vec<MaxRun>,
        wall: Duration,
    ) -> Self {
        let mut summary = Vec::new();
        for &workload in &args.workloads {
            for &rate in &args.rates {
                for &mode in workload.modes() {
                    summary.push(summarise(&runs, workload, mode, rate));
                }
            }
        }
        let baselines: Vec<(Workload, u32, [f64; 4])> = summary
            .iter()
            .filter(|s| s.mode == Mode::Baseline && s.rounds_ok > 0)
            .map(|s| (s.workload, s.rate, s.latency_ms))
            .collect();
        for s in summary
            .iter_mut()
            .filter(|s| s.mode != Mode::Baseline && s.rounds_ok > 0)
        {
            if let Some((_, _, base)) = baselines.iter().find(|(w, r, _)| *w == s.workload && *r == s.rate) {
                let mut added = [0.0; 4];
                for i in 0..4 {
                    added[i] = s.latency_ms[i] - base[i];
                }
                s.added_ms = Some(added);
            }
        }
        let base_rps = max
            .iter()
            .find(|m| m.mode == Mode::Baseline && m.error.is_none())
            .map(|m| m.rps);
        let closed_loop = max
            .into_iter()
            .map(|m| MaxSummary {
                lost_vs_baseline_pct: match (base_rps, m.error.is_none(), m.mode) {
                    (Some(b), true, mode) if mode != Mode::Baseline && b > 0.0 => Some((1.0 - m.rps / b) * 100.0),
                    _ => None,
                },
                mode: m.mode,
                error: m.error,
                rps: m.rps,
            })
            .collect();
        let mut command = "cargo xtask bench".to_owned();
        if args.workloads.len() == 1 {
            command.push_str(&format!(" --workloads {:?}", args.workloads[0]).to_lowercase());
        }
        if args.quick {
            command.push_str(" --quick");
        } else {
            let rates: Vec<String> = args.rates.iter().map(u32::to_string).collect();
            command.push_str(&format!(
                " --rates {} --duration {} --rounds {} --connections {}",
                rates.join(","),
                args.duration,
                args.rounds,
                args.connections
            ));
        }
        Report {
            date: today(),
            command,
            machine: machine(),
            versions: versions.to_vec(),
            rates: args.rates.clone(),
            duration_secs: args.duration,
            rounds: args.rounds,
            connections: args.connections,
            workloads: args.workloads.clone(),
            grpc_connections: args.grpc_connections,
            wall_secs: wall.as_secs(),
            summary,
            closed_loop,
            runs,
        }
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "Measured {} on {} ({} × {}, kernel {}) with `{}`: {} s per run, {} rounds (median; spread = max − min), latency corrected for coordinated omission (from each request's intended send time).\n",
            self.date, self.machine.cpu, self.machine.cpus, "vCPU", self.machine.kernel, self.command, self.duration_secs, self.rounds
        );
        for &workload in &self.workloads {
            let how = match workload {
                Workload::Http => format!("HTTP/1.1 to nginx, {} keep-alive connections, oha", self.connections),
                Workload::Grpc => format!(
                    "unary `helloworld.Greeter/SayHello` to a tonic server over h2c, {} HTTP/2 connection(s), open loop, grpc-load",
                    self.grpc_connections
                ),
                Workload::Https => format!(
                    "HTTP/1.1 over TLS 1.3 to nginx (OpenSSL), {} keep-alive connections, oha (rustls, not traced: meshless sees the server side only, 1 span per request expected)",
                    self.connections
                ),
            };
            md.push_str(&format!("\n### {} ({how})\n\n", workload.name()));
            self.table(&mut md, workload);
        }
        if !self.closed_loop.is_empty() {
            md.push_str("\nClosed loop, HTTP/1.1 (as fast as possible, same connections):\n\n| mode | req/s | lost vs baseline |\n|---|---:|---:|\n");
        }
        for m in &self.closed_loop {
            match &m.error {
                Some(e) => md.push_str(&format!("| {} | failed: {} | |\n", m.mode.name(), e.replace('|', "/"))),
                None => md.push_str(&format!(
                    "| {} | {:.0} | {} |\n",
                    m.mode.name(),
                    m.rps,
                    m.lost_vs_baseline_pct.map_or("-".to_owned(), |p| format!("{p:.1}%"))
                )),
            }
        }
        md.push_str("\nCompleteness = spans the collector received ÷ spans expected (meshless: 2 per request or call, a client and a server span — 1 over HTTPS, see above; sidecar: 1, the inbound span). CPU/req = agent or proxy CPU time ÷ answered requests. Events/req = ring-buffer events the agent read ÷ answered requests (machine-wide: other traffic on the machine counts too). Agent losses = what the agent counted as lost from the warm-up's end to the last export, summed over rounds (ring full: the kernel could not write an event; queue: the pipeline was behind; exporter: spans an exporter dropped; shed: data the memory budget shed, which includes spans an exporter's queue could not hold, so those count under exporter too; pairing: connections whose request/response pairing restarted).\n");
        md
    }

    /// One table row per (rate, mode) of `workload`.
    fn table(&self, md: &mut String, workload: Workload) {
        let f = |v: f64| if v.is_finite() { format!("{v:.3}") } else { "-".into() };
        let o = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
        md.push_str("| rate | mode | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | added p50 | added p99 | spread p50/p99 | agent/proxy CPU % | CPU µs/req | agent/proxy RSS MiB | events/req | collector CPU % | completeness | agent losses |\n");
        md.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for s in self.summary.iter().filter(|s| s.workload == workload) {
            if s.rounds_ok == 0 {
                md.push_str(&format!(
                    "| {} | {} | failed: {} | | | | | | | | | | | | | | |\n",
                    s.rate,
                    s.mode.name(),
                    s.errors.first().map_or("", String::as_str).replace('|', "/")
                ));
                continue;
            }
            let added = |i: usize| s.added_ms.map_or("-".to_owned(), |a| format!("{:+.3}", a[i]));
            let failed = if s.failed > 0 {
                format!(" ({} unanswered)", s.failed)
            } else {
                String::new()
            };
            md.push_str(&format!(
                "| {} | {} | {:.0}{failed} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.rate,
                s.mode.name(),
                s.achieved_rps,
                f(s.latency_ms[0]),
                f(s.latency_ms[1]),
                f(s.latency_ms[2]),
                f(s.latency_ms[3]),
                added(0),
                added(2),
                f(s.spread_p50_ms),
                f(s.spread_p99_ms),
                o(s.proxy_cpu_pct, 1),
                o(s.cpu_us_per_request, 1),
                o(s.proxy_rss_mib, 1),
                o(s.events_per_request, 2),
                o(s.collector_cpu_pct, 1),
                s.completeness.map_or("-".to_owned(), |c| format!("{:.2}%", c * 100.0)),
                s.agent_losses.map_or("-".to_owned(), |l| l.text()),
            ));
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::write(dir.join("results.json"), serde_json::to_string_pretty(self)?)?;
        fs::write(dir.join("results.md"), self.markdown())?;
        for &workload in &self.workloads {
            let name = match workload {
                Workload::Http => "overhead.svg",
                Workload::Grpc => "overhead-grpc.svg",
                Workload::Https => "overhead-https.svg",
            };
            self.plot(&dir.join(name), workload).context("drawing the plot")?;
        }
        Ok(())
    }

    fn plot(&self, path: &Path, workload: Workload) -> Result<()> {
        let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(560);
        let added: Vec<&Summary> = self
            .summary
            .iter()
            .filter(|s| s.workload == workload && s.added_ms.is_some())
            .collect();
        let ymax = added
            .iter()
            .flat_map(|s| s.added_ms.unwrap_or_default())
            .fold(0.1f64, f64::max)
            * 1.15;
        let ymin = added
            .iter()
            .flat_map(|s| s.added_ms.unwrap_or_default())
            .fold(0.0f64, f64::min)
            .min(0.0);
        let mut chart = ChartBuilder::on(&left)
            .caption(
                format!("{}: latency added over baseline (ms)", workload.name()),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..3f64, ymin..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let labels = ["p50", "p90", "p99", "p99.9"];
        chart
            .configure_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| labels.get(x.round() as usize).copied().unwrap_or("").to_owned())
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, s) in added.iter().enumerate() {
            let shade = 0.4 + 0.2 * (i % 3) as f64;
            let color = match s.mode {
                Mode::Sidecar => RED.mix(shade),
                Mode::Meshless => BLUE.mix(shade),
                _ => GREEN.mix(shade),
            };
            let pts: Vec<(f64, f64)> = s
                .added_ms
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("{} @ {} req/s", s.mode.name(), s.rate))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;

        let cpu: Vec<&Summary> = self
            .summary
            .iter()
            .filter(|s| s.workload == workload && s.proxy_cpu_pct.is_some())
            .collect();
        let cmax = cpu.iter().filter_map(|s| s.proxy_cpu_pct).fold(5.0f64, f64::max) * 1.15;
        let rmax = self.rates.iter().copied().max().unwrap_or(1) as f64 * 1.1;
        let mut chart = ChartBuilder::on(&right)
            .caption("agent / proxy CPU (% of one core)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..rmax, 0f64..cmax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("req/s")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for &mode in workload.modes().iter().filter(|m| **m != Mode::Baseline) {
            let color = match mode {
                Mode::Sidecar => RED,
                Mode::Meshless => BLUE,
                _ => GREEN,
            };
            let pts: Vec<(f64, f64)> = cpu
                .iter()
                .filter(|s| s.mode == mode)
                .filter_map(|s| Some((f64::from(s.rate), s.proxy_cpu_pct?)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(mode.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// The quick run is part of the test suite: every mode must have run
    /// and both tracers must have delivered spans.
    pub fn check_quick(&self) -> Result<()> {
        for s in &self.summary {
            let what = format!("{} {}", s.workload.name(), s.mode.name());
            if s.rounds_ok == 0 {
                bail!("bench --quick: {what} failed: {:?}", s.errors);
            }
            if s.mode != Mode::Baseline && !s.completeness.is_some_and(|c| c > 0.5) {
                bail!("bench --quick: {what} delivered too few spans ({:?})", s.completeness);
            }
            if s.latency_ms[0].is_nan() || s.latency_ms[0] <= 0.0 {
                bail!("bench --quick: {what} has no latency figures");
            }
        }
        Ok(())
    }
}
