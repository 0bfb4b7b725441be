//! What the kernel side copies of HTTP/2, on a real kernel: it follows the
//! framing of each connection direction over every byte a syscall moved,
//! so header blocks deep inside one large write are seen (with the HPACK
//! table updates in them), while DATA payloads, which userspace skips, are
//! not copied. The agents are scoped to the test's own node cgroup, so
//! their kernel counters count this test's traffic only.
mod support;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use support::{nodes::Cluster, *};

const PORT: u16 = 8085;
/// Size of the file downloaded.
const BIG: usize = 1 << 20;
/// Downloads, one connection each.
const DOWNLOADS: usize = 3;
/// Requests written in one `send` by the batching client.
const BATCHED: usize = 40;

/// nginx serving h2c (prior knowledge) in `pod`: `/ok` answers a short
/// body, `/big` a 1 MiB file written from user memory (no sendfile), so
/// the kernel sees every byte go by.
fn start_nginx_h2c(pod: &nodes::Pod, dir: &std::path::Path) -> Proc {
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    let body: Vec<u8> = (0..BIG).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(www.join("big"), body).expect("big file");
    let server = format!(
        r#"listen {}:{PORT} http2;
    location /ok {{ return 200 "ok\n"; }}
    location /big {{ root {}; }}"#,
        pod.ip,
        www.display()
    );
    let conf = write_nginx_conf(dir, "sendfile off; http2_max_concurrent_streams 256;", &server);
    let err = format!("{}/error.log", dir.display());
    spawn(pod.cmd("nginx", &["-c", &conf, "-e", &err]))
}

/// A counter of the agent's /metrics, once the kernel counters were read
/// after every event the agent has seen (they are copied every few seconds).
fn settled_counter(agent: &Agent, name: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(agent);
        let sent = metric_sum(&s, "meshless_kernel_events_sent_total", &[]);
        let read = metric_sum(&s, "meshless_events_read_total", &[]);
        if (sent > 0.0 && sent <= read) || Instant::now() > deadline {
            return metric_sum(&s, name, &[]);
        }
        sleep(Duration::from_millis(250));
    }
}

#[test]
fn an_h2c_download_is_traced_without_copying_its_data_payloads() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let client = cluster.pod(0, "client");
    let server = cluster.pod(0, "server");
    let scratch = Scratch::new("kernel-cost-h2");
    let scope = cluster.node_cgroup(0).display().to_string();
    let agent = Agent::start_with(&["--cgroup", &scope]);
    let _nginx = start_nginx_h2c(&server, &scratch.0);
    client.wait_port(&server.ip, PORT);

    // One connection per download: curl 7.88 fails a second download on
    // the same h2c connection to nginx (error 16), agent or not.
    let url = format!("http://{}:{PORT}/big", server.ip);
    for _ in 0..DOWNLOADS {
        let out = run(client.cmd(
            "curl",
            &[
                "-s",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                &url,
            ],
        ));
        assert_eq!(out.trim(), BIG.to_string(), "curl downloaded the file whole");
    }

    let spans = agent.collect(to_server(&server.ip, PORT), 2 * DOWNLOADS, Duration::from_secs(15));
    let mut sides: Vec<&str> = spans.iter().map(kind).collect();
    sides.sort_unstable();
    assert_eq!(sides, [vec!["CLIENT"; DOWNLOADS], vec!["SERVER"; DOWNLOADS]].concat());
    for s in &spans {
        assert_eq!(attr_str(s, "url.path"), "/big");
        assert_eq!(attr_u64(s, "http.response.status_code"), 200);
        assert_eq!(attr_str(s, "network.protocol.version"), "2");
    }

    // Both ends together moved 2 MiB per download, in 8 KiB DATA frames
    // (nginx's chunk size): a record per frame header on each end is
    // 128 * 2 * (176 + 9) bytes = 46 KiB, plus records for reads that end
    // inside a payload (measured: 55 KiB). Copying the first 8 KiB of every
    // HTTP/2 syscall, as before, cost about 1.4 MiB.
    let bytes = settled_counter(&agent, "meshless_kernel_event_bytes_total");
    let per_download = bytes / DOWNLOADS as f64;
    assert!(
        per_download < 96.0 * 1024.0,
        "{per_download:.0} ring-buffer bytes per 1 MiB download (both ends)"
    );
    assert!(per_download > 0.0, "the kernel counted its bytes");
}

/// An HTTP/2 client that writes its preface and `n` requests as ONE send
/// (as tonic batches under load): every request's header block adds a
/// 600-byte field to the HPACK dynamic table and refers to the one the
/// request before it added, so a header block not seen leaves every later
/// one undecodable. Prints how many streams were answered.
const BATCHING_CLIENT: &str = r#"
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def integer(prefix_bits, first, v):
    top = (1 << prefix_bits) - 1
    if v < top:
        return bytes([first | v])
    out, v = [first | top], v - top
    while v >= 128:
        out.append(v % 128 + 128); v //= 128
    return bytes(out + [v])
def string(s):
    return integer(7, 0, len(s)) + s
out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
for i in range(n):
    block = b"\x82\x86"                                      # :method GET, :scheme http
    block += b"\x04" + string(b"/ok/walk-%d" % i)            # :path, not indexed
    block += b"\x01" + string(host.encode())                 # :authority, not indexed
    if i > 0:
        block += bytes([0x80 | 62])                          # the field the request before added
    block += b"\x40" + string(b"x-walk-%d" % i) + string(b"p" * 600)  # added to the table
    out += frame(1, 0x5, 2 * i + 1, block)
s = socket.create_connection((host, port))
s.sendall(out)
done, buf = set(), b""
s.settimeout(10)
while len(done) < n:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    while len(buf) >= 9:
        ln = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + ln:
            break
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7fffffff
        if kind == 4 and not flags & 1:
            s.sendall(frame(4, 1, 0, b""))
        if kind in (0, 1) and flags & 1:
            done.add(stream)
        buf = buf[9 + ln:]
print(len(out), len(done))
"#;

#[test]
fn header_blocks_deep_inside_one_large_h2_write_are_all_decoded() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let client = cluster.pod(0, "client");
    let server = cluster.pod(0, "server");
    let scratch = Scratch::new("kernel-cost-h2-batch");
    let scope = cluster.node_cgroup(0).display().to_string();
    let agent = Agent::start_with(&["--cgroup", &scope]);
    let _nginx = start_nginx_h2c(&server, &scratch.0);
    client.wait_port(&server.ip, PORT);

    let n = BATCHED.to_string();
    let port = PORT.to_string();
    let out = run(client.cmd("python3", &["-c", BATCHING_CLIENT, &server.ip, &port, &n]));
    let (written, answered) = out.trim().split_once(' ').expect("client output");
    let written: usize = written.parse().expect("bytes written");
    assert!(written > 3 * 8192, "one write far past the old 8 KiB limit: {written}");
    assert_eq!(answered, n, "nginx answered every stream");

    let spans = agent.collect(to_server(&server.ip, PORT), 2 * BATCHED, Duration::from_secs(15));
    for side in ["CLIENT", "SERVER"] {
        let mine: Vec<_> = spans.iter().filter(|s| kind(s) == side).collect();
        let mut paths: Vec<&str> = mine.iter().map(|s| attr_str(s, "url.path")).collect();
        paths.sort_unstable();
        let mut sent: Vec<String> = (0..BATCHED).map(|i| format!("/ok/walk-{i}")).collect();
        sent.sort_unstable();
        assert_eq!(paths, sent, "{side}: every stream traced once with its path");
        let incomplete: Vec<_> = mine
            .iter()
            .filter(|s| attr(s, "meshless.capture.truncated") == true)
            .map(|s| attr_str(s, "url.path"))
            .collect();
        assert!(
            incomplete.is_empty(),
            "{side}: header blocks not decoded: {incomplete:?}"
        );
        assert!(
            mine.iter().all(|s| attr_u64(s, "http.response.status_code") == 200),
            "{side}: every status seen"
        );
    }
}

/// With `--kernel-stats` the agent reports each kernel program's runs and
/// the time it took inside the applications' syscalls, read from the
/// kernel's own BPF statistics: the exit probes of the requests' reads and
/// writes ran at least four times per request (both ends, a read and a
/// write each) and took time.
#[test]
fn kernel_programs_report_their_runs_and_time_with_kernel_stats() {
    const REQUESTS: usize = 50;
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("kernel-time");
    let agent = Agent::start_with(&["--kernel-stats"]);
    let _nginx = start_nginx(&pods.b, &pods.ip_b, PORT, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);
    let url = format!("http://{}:{PORT}/ok", pods.ip_b);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.arg("-s");
    for _ in 0..REQUESTS {
        curl.args(["-o", "/dev/null", &url]);
    }
    run(curl);
    let spans = agent.collect(to_server(&pods.ip_b, PORT), 2 * REQUESTS, Duration::from_secs(15));
    assert_eq!(spans.len(), 2 * REQUESTS, "every request traced on both ends");

    // Program times are read every 2 s.
    let exits = |s: &prometheus_parse::Scrape, name: &str| -> f64 {
        s.samples
            .iter()
            .filter(|m| m.metric == name)
            .filter(|m| m.labels.get("program").is_some_and(|p| p.starts_with("sys_exit_")))
            .map(|m| match m.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (runs, secs) = loop {
        let s = scrape(&agent);
        let got = (
            exits(&s, "meshless_kernel_program_runs_total"),
            exits(&s, "meshless_kernel_program_seconds_total"),
        );
        if got.0 >= (4 * REQUESTS) as f64 || Instant::now() > deadline {
            break got;
        }
        sleep(Duration::from_millis(250));
    };
    assert!(runs >= (4 * REQUESTS) as f64, "sys_exit_* programs ran {runs} times");
    assert!(secs > 0.0, "sys_exit_* programs took {secs} s");
    // Machine-wide (every process's syscalls run them), but far from the
    // millions a nanosecond count read as seconds would give.
    assert!(secs < 100.0, "{secs} s in sys_exit_* programs is not a time in seconds");
}
