//! The agent's behaviour when it cannot run, and under overload.
mod support;

use std::{process::Command, time::Duration};

use support::*;

fn meshless() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshless"))
}

#[test]
fn without_root_the_agent_says_what_privilege_it_needs() {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_meshless"))
        .output()
        .expect("run setpriv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root") && err.contains("CAP_BPF"), "{err}");
    assert!(!err.contains("os error"), "no raw errno: {err}");
}

#[test]
fn without_tracefs_the_agent_says_how_to_mount_it() {
    // A private mount namespace where tracefs (and debugfs) are not mounted.
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; exec {}",
        env!("CARGO_BIN_EXE_meshless")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tracefs is not mounted") && err.contains("mount -t tracefs"),
        "{err}"
    );
}

#[test]
fn a_bad_flag_value_is_rejected_with_the_setting_named() {
    let out = meshless().args(["--ringbuf-mib", "3"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ringbuf-mib") && err.contains("power of two"), "{err}");
}

#[test]
fn help_explains_what_the_agent_does() {
    let out = meshless().arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["--console-format", "span", "root"] {
        assert!(text.contains(needle), "--help mentions {needle}: {text}");
    }
}

#[test]
fn ring_buffer_overflow_is_counted_and_the_agent_keeps_tracing() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("overflow");
    // A 1 MiB ring buffer drained once a second, never woken early: a burst
    // of large responses must overflow it.
    let agent = Agent::start_with(&[
        "--ringbuf-mib",
        "1",
        "--poll-interval-ms",
        "1000",
        "--wakeup-kib",
        "1000000",
    ]);
    let port = 8201;
    let _nginx = start_nginx(&pods.b, &pods.ip_b, port, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, port);
    let url = format!("http://{}:{port}/file.txt", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.arg("-s");
    for _ in 0..1500 {
        curl.args(["-o", "/dev/null", &url]);
    }
    run(curl);
    std::thread::sleep(Duration::from_millis(1500));
    // Still alive and tracing after the overflow.
    let mut after = PodPair::cmd(&pods.a, "curl");
    after.args([
        "-s",
        "-o",
        "/dev/null",
        &format!("http://{}:{port}/after-overflow", pods.ip_b),
    ]);
    run(after);
    let later = agent.wait_for(
        |s| attr_str(s, "url.path") == "/after-overflow",
        |s| s.len() >= 2,
        Duration::from_secs(10),
    );
    assert_eq!(later.len(), 2, "agent still traces after overflow");
    // The loss is counted and exposed in /metrics (kernel counters are
    // read every 2 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = metric_sum(&scrape(&agent), "meshless_kernel_ringbuf_full_total", &[]);
        if dropped > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ring-buffer overflow was never counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, stderr) = agent.stop();
    assert!(status.success(), "{stderr:?}");
}

/// Status code and body of a GET (HTTP/1.0, so the server closes).
fn get_status(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").expect("send request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn healthz_fails_naming_the_stage_when_the_console_exporter_dies() {
    use std::{
        io::{BufRead, BufReader},
        process::Stdio,
        sync::{Arc, Mutex},
    };
    let _serial = serial();
    mount_tracefs();
    let mut child = meshless()
        .args([
            "--console-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
            "--stats-interval-secs",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(addr) = line.split_whitespace().find_map(|kv| kv.strip_prefix("metrics=")) {
                let _ = ready_tx.send(addr.to_owned());
            }
            sink.lock().expect("log").push(line);
        }
    });
    let addr = ready_rx.recv_timeout(Duration::from_secs(30)).expect("agent ready");
    assert_eq!(get_status(&addr, "/healthz").0, 200);
    // Nobody reads the spans any more: the console's next write fails.
    drop(child.stdout.take());
    // Each health check is itself traced HTTP (the client side is this
    // process), so polling produces the spans whose write fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        let (code, body) = get_status(&addr, "/healthz");
        if code != 200 || std::time::Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("export-console stage stopped: stdout closed"), "{body}");
    let (ready_code, ready_body) = get_status(&addr, "/readyz");
    assert_eq!(ready_code, 503, "{ready_body}");
    std::thread::sleep(Duration::from_millis(1500));
    let logged = log.lock().expect("log").join("\n");
    assert!(
        logged.contains("a pipeline stage failed") && logged.contains("stdout closed"),
        "{logged}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Resident set size of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Python that opens `conns` connections to a server that never answers
/// and sends `per_conn` pipelined requests on each, holds them, closes.
const UNANSWERED: &str = r#"
import socket, sys, time
host, port, conns, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = []
for i in range(conns):
    s = socket.create_connection((host, port))
    s.sendall(b"".join(b"GET /flood/%d/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (i, j) for j in range(per)))
    socks.append(s)
time.sleep(3)
for s in socks: s.close()
"#;

/// A server that accepts and reads but never answers.
const SILENT: &str = r#"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(4096)
def drain(c):
    while c.recv(65536): pass
while True:
    c, _ = srv.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
"#;

/// Request-shaped text written to /dev/null for `secs` seconds.
const DEVNULL: &str = r#"
import os, sys, time
end = time.time() + float(sys.argv[1]); fd = os.open("/dev/null", os.O_WRONLY)
msg = b"GET /devnull HTTP/1.1\r\nHost: x\r\n\r\n" * 4
while time.time() < end: os.write(fd, msg)
"#;

#[test]
fn floods_keep_the_agent_under_its_memory_budget_and_tracing() {
    let _serial = serial();
    let pods = PodPair::new();
    let budget_mib = 64.0;
    let agent = Agent::start_with(&["--memory-limit", "64Mi", "--traces-exporter", "none"]);
    let pid = agent.pid();
    let peak = std::sync::Arc::new(std::sync::Mutex::new(0f64));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let mut p = peak.lock().expect("peak");
                *p = p.max(rss_mib(pid));
                drop(p);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let port = 8211;
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args(["-c", SILENT, &pods.ip_b, &port.to_string()]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    let mut unanswered = PodPair::cmd(&pods.a, "python3");
    unanswered.args(["-c", UNANSWERED, &pods.ip_b, &port.to_string(), "2000", "20"]);
    run(unanswered);
    let mut devnull = Command::new("python3");
    devnull.args(["-c", DEVNULL, "10"]);
    run(devnull);
    std::thread::sleep(Duration::from_secs(3));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = *peak.lock().expect("peak");
    eprintln!("agent RSS peak under floods: {peak:.1} MiB (budget {budget_mib} MiB)");
    assert!(
        peak <= budget_mib + 64.0,
        "RSS peaked at {peak:.1} MiB: over the {budget_mib} MiB budget + 64 MiB for code, ring buffer and slack"
    );
    let health = http_get(agent.metrics_addr.as_deref().expect("metrics"), "/healthz");
    assert_eq!(health.trim(), "ok");
    let (status, stderr) = agent.stop();
    assert!(status.success(), "{stderr:?}");
}
