//! Issue 13, the live map under load: 5 000 requests a second for 30 s
//! (oha → frontend → backend, and oha → backend on many routes, all Go, in
//! simulated pods) while a headless Chromium keeps the page open. Two
//! agents trace the same traffic at the same time, one with the map and
//! one without (`--ui off`, as the benchmark runs), so the map's cost is a
//! difference measured under identical conditions on a shared machine.
//! Bounds catch a freeze or unbounded growth, not a speed target (those
//! are the benchmark's); the measured numbers are printed.
mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{chain::*, nodes::*, *};

/// How long the page watches the load.
const WATCH_SECS: u64 = 30;
/// oha → frontend (each also a frontend → backend call) and oha → backend:
/// 2 × 1 000 + 3 000 = 5 000 requests a second.
const FRONT_RATE: u64 = 1_000;
const BACK_RATE: u64 = 3_000;
/// The benchmark's agent at 5 000 req/s (docs/bench/results.md): 13.4 % of
/// a core, 33 MiB, exporting every span over OTLP (this test exports none,
/// so the comparison errs on the generous side).
const BENCH_CPU_US_PER_REQUEST: f64 = 0.134 * 1e6 / 5_000.0;
const BENCH_RSS_MIB: f64 = 33.0;

/// The Go test service under its own name (the map names a process by
/// its executable): a copy, renamed into place so a running one is intact.
fn go_named(go: &Path, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (tmp, out) = (dir.join(format!("{name}.new")), dir.join(name));
    std::fs::copy(go, &tmp).expect("copy the Go service");
    std::fs::rename(&tmp, &out).expect("rename the Go service");
    out
}

fn oha_bin() -> String {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"));
    let bin = home.join("bin/oha");
    if bin.exists() {
        bin.display().to_string()
    } else {
        "oha".into()
    }
}

/// oha at a fixed rate (latency corrected) from `pod` for `secs`, URLs
/// drawn from `url_regex`; its JSON report comes out on stdout.
fn oha(pod: &Pod, rate: u64, connections: u64, secs: u64, url_regex: &str) -> Child {
    let (rate, connections, secs) = (rate.to_string(), connections.to_string(), format!("{secs}s"));
    pod.cmd(
        &oha_bin(),
        &[
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
            "-q",
            &rate,
            "-c",
            &connections,
            "-z",
            &secs,
            "--rand-regex-url",
            url_regex,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run oha")
}

/// (requests answered, of them 200) from oha's JSON report.
fn oha_result(child: Child) -> (u64, u64) {
    let out = child.wait_with_output().expect("oha finishes");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("oha's report: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let codes = &report["statusCodeDistribution"];
    let total = codes
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    (total, codes["200"].as_u64().unwrap_or(0))
}

/// CPU time (user + system) of a process in µs, from /proc/<pid>/stat.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent's stat");
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1e6 / hz
}

fn counter(agent: &Agent, name: &str) -> f64 {
    metric_sum(&scrape(agent), &format!("meshless_{name}_total"), &[])
}

fn curl_json(agent: &Agent, path: &str) -> (usize, Value) {
    let body = http_get(agent.metrics_addr.as_deref().expect("admin server"), path);
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (body.len(), v)
}

#[test]
fn at_5000_requests_a_second_the_page_stays_live_and_the_map_costs_the_agent_a_bounded_share() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let scope = cluster.node_cgroup(0).display().to_string();
    let (load, front, back) = (cluster.pod(0, "load"), cluster.pod(0, "front"), cluster.pod(0, "back"));
    let go = go_service();
    let (frontend, backend) = (go_named(&go, "frontend"), go_named(&go, "backend"));
    let _back = go_service_on(&backend, &back, 8090, None);
    let _front = go_service_on(&frontend, &front, 8091, Some(&format!("http://{}:8090", back.ip)));
    load.wait_port(&back.ip, 8090);
    load.wait_port(&front.ip, 8091);
    // Spans go nowhere (an exporter's cost is the same with the map or
    // without, and a collector would compete for the two cores); the map
    // and the trace view see every span all the same.
    let agent = |ui: &str| {
        Agent::start_with(&[
            "--ui",
            ui,
            "--cgroup",
            &scope,
            "--traces-exporter",
            "none",
            "--poll-interval-ms",
            "10",
        ])
    };
    let (off, on) = (agent("off"), agent("on"));

    let rss: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (rss, stop, pids) = (rss.clone(), stop.clone(), (off.pid(), on.pid()));
        std::thread::spawn(move || {
            let kib = |pid: u32| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    })
                    .unwrap_or(0)
            };
            while !stop.load(Ordering::Relaxed) {
                rss.lock().expect("rss lock").push((kib(pids.0), kib(pids.1)));
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    let started = Instant::now();
    let cpu_before = (cpu_us(off.pid()), cpu_us(on.pid()));
    let load_secs = WATCH_SECS + 8;
    let to_front = oha(
        &load,
        FRONT_RATE,
        4,
        load_secs,
        &format!("http://{}:8091/(cart|checkout|items/[0-9]{{1,6}})", front.ip),
    );
    // Many distinct routes: the backend's route cap (32) is reached at once.
    let to_back = oha(
        &load,
        BACK_RATE,
        16,
        load_secs,
        &format!("http://{}:8090/(ok|r[a-z]{{3}}|users/[0-9]{{1,6}})", back.ip),
    );
    std::thread::sleep(Duration::from_secs(2));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ui/watch.py");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots/map-under-load.png");
    std::fs::create_dir_all(shot.parent().expect("dir")).expect("screenshot dir");
    let url = format!("http://{}/", on.metrics_addr.as_deref().expect("admin server"));
    let watched = Command::new("python3")
        // No __pycache__ left in the source tree (cdp.py is imported).
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            script.to_str().expect("utf-8"),
            &url,
            &WATCH_SECS.to_string(),
            shot.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run watch.py");
    // What the API answers at the end of the load, at the widest window.
    let (graph_bytes, graph) = curl_json(&on, "/api/graph?window=900");
    let (traces_bytes, traces) = curl_json(&on, &format!("/api/traces?limit={}", 200));
    let ((front_n, front_ok), (back_n, back_ok)) = (oha_result(to_front), oha_result(to_back));
    // The agents finish the last polls' events.
    std::thread::sleep(Duration::from_millis(500));
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu_us(off.pid()) - cpu_before.0, cpu_us(on.pid()) - cpu_before.1);
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("rss sampler");
    assert!(
        watched.status.success(),
        "browser run failed: {}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let page: Value = serde_json::from_slice(&watched.stdout).expect("watch.py's JSON");

    let requests = 2 * front_n + back_n;
    let rate = requests as f64 / load_secs as f64;
    let per_request = (cpu.0 / requests as f64, cpu.1 / requests as f64);
    let samples = rss.lock().expect("rss lock").clone();
    let mib = |k: u64| k as f64 / 1024.0;
    let max_rss = |f: fn(&(u64, u64)) -> u64| mib(samples.iter().map(f).max().unwrap_or(0));
    let (rss_off, rss_on) = (max_rss(|s| s.0), max_rss(|s| s.1));
    // RSS of the map's agent over the second half: it must have levelled off.
    let half = &samples[samples.len() / 2..];
    let (rss_mid, rss_end) = (
        mib(half.first().map_or(0, |s| s.1)),
        mib(half.last().map_or(0, |s| s.1)),
    );
    eprintln!(
        "load: {requests} requests in {load_secs} s = {rate:.0}/s (frontend {front_n}, {front_ok} ok; backend {back_n}, {back_ok} ok)"
    );
    eprintln!(
        "agent CPU over {wall:.1} s: --ui off {:.1} % of a core, {:.1} µs/request; --ui on {:.1} %, {:.1} µs/request (+{:.1} %)",
        cpu.0 / wall / 1e4,
        per_request.0,
        cpu.1 / wall / 1e4,
        per_request.1,
        (cpu.1 / cpu.0 - 1.0) * 100.0
    );
    eprintln!("agent RSS max: off {rss_off:.1} MiB, on {rss_on:.1} MiB (on: {rss_mid:.1} → {rss_end:.1} MiB over the second half)");
    for a in [&off, &on] {
        eprintln!(
            "spans created {}, ring-buffer full {}, queue drops {}, OTLP dropped {}",
            counter(a, "spans_created"),
            counter(a, "kernel_ringbuf_full"),
            counter(a, "events_dropped_queue"),
            counter(a, "otlp_spans_dropped")
        );
    }
    eprintln!("page: map {}, traces {}", page["map"], page["traces"]);
    eprintln!("page fetched: {}", page["api"]);
    eprintln!("at the end: /api/graph?window=900 {graph_bytes} B, /api/traces?limit=200 {traces_bytes} B");

    // Near the load this test claims: a machine too busy to send it fails
    // here rather than passing on a light load.
    assert!(rate >= 0.6 * 5_000.0, "only {rate:.0} requests/s were sent");
    assert_eq!((front_ok, back_ok), (front_n, back_n), "every request answered 200");

    // The page stayed live: it redrew on (nearly) every 2-second poll and
    // never froze.
    for (tab, p) in [("map", &page["map"]), ("traces", &page["traces"])] {
        let secs = p["seconds"].as_f64().unwrap_or(0.0);
        let updates = p["updates"].as_f64().unwrap_or(0.0);
        assert!(
            updates >= secs / 2.0 / 2.0,
            "{tab}: {updates} updates in {secs:.0} s: {p}"
        );
        assert!(p["p50_ms"].as_f64().unwrap_or(f64::MAX) <= 50.0, "{tab}: frames {p}");
        assert!(
            p["max_ms"].as_f64().unwrap_or(f64::MAX) <= 1_000.0,
            "{tab}: a frozen frame {p}"
        );
    }
    let edges = page["edges"].as_array().expect("edges on the page");
    for (s, t) in [("oha", "frontend"), ("frontend", "backend"), ("oha", "backend")] {
        assert!(
            edges
                .iter()
                .any(|e| e["source"] == s && e["target"] == t && e["rps"].as_f64() > Some(0.0)),
            "edge {s} → {t} live on the page: {edges:?}"
        );
    }
    assert!(page["trace_rows"].as_u64() > Some(0), "the trace list filled");

    // Responses stay bounded by the caps however many requests came: the
    // backend keeps 32 routes, the rest are counted as overflow.
    let routes = |id: &str| {
        graph["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .and_then(|n| n["routes"].as_array())
            .map_or(0, Vec::len)
    };
    assert_eq!(routes("backend"), 32, "the per-callee route cap");
    assert!(graph["overflow"].as_u64() > Some(0), "calls past the cap are counted");
    assert!(graph_bytes <= 64 * 1024, "/api/graph is {graph_bytes} B");
    assert_eq!(traces.as_array().map(Vec::len), Some(200), "the list's limit");
    assert!(traces_bytes <= 200 * 1024, "/api/traces is {traces_bytes} B");
    for (what, max) in [("graph", 64 * 1024), ("traces", 64 * 1024)] {
        let got = page["api"][what]["max_bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(got <= max, "the page fetched {got} B from /api/{what}");
    }

    // The agent: within the benchmark's figures plus a margin, and the
    // map's share a bounded difference between the two agents.
    assert!(
        per_request.0 <= 3.0 * BENCH_CPU_US_PER_REQUEST,
        "--ui off: {:.1} µs/request (bench {BENCH_CPU_US_PER_REQUEST:.1})",
        per_request.0
    );
    assert!(
        cpu.1 <= 1.25 * cpu.0,
        "the map costs {:.0} % more CPU",
        (cpu.1 / cpu.0 - 1.0) * 100.0
    );
    assert!(rss_off <= BENCH_RSS_MIB + 32.0, "--ui off RSS {rss_off:.1} MiB");
    assert!(
        rss_on <= rss_off + 16.0,
        "the map's RSS {rss_on:.1} MiB vs {rss_off:.1} MiB without"
    );
    // The trace view's ring is allocated once at its full size and
    // touched as it fills. Rows are admitted at a rate that fills it in
    // about 30 s (`ui::admit`), most of the 38 s load, so the second half
    // may still touch a good part of it; at most the whole ring. Add a
    // margin for the allocator's arenas.
    //
    // The old fixed 8 MiB margin was the ring's own size. It failed once
    // at +9.7 MiB with no change to the UI (+7.5 to +7.9 in other runs,
    // +6.9 for the session-start code). The total stays held by the bound
    // above: the map's agent within 16 MiB of the agent without it.
    let ring_mib = meshless::ui::DEFAULT_TRACE_BYTES as f64 / (1024.0 * 1024.0);
    assert!(
        rss_end <= rss_mid + ring_mib + 4.0,
        "RSS still growing: {rss_mid:.1} → {rss_end:.1} MiB"
    );
}
