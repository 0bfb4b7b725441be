//! What the kernel side copies per request, on a real kernel: HTTP/2 DATA
//! payloads (which userspace skips) are not copied, yet every exchange is
//! still traced. The agent is scoped to the test's own node cgroup, so its
//! kernel counters count this test's traffic only.
mod support;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use support::{nodes::Cluster, *};

const PORT: u16 = 8085;
/// Size of the file downloaded.
const BIG: usize = 1 << 20;
/// Downloads on one connection.
const DOWNLOADS: usize = 3;

/// nginx serving h2c (prior knowledge) with a 1 MiB file, written from
/// user memory (no sendfile) so the kernel sees every byte go by.
fn start_nginx_h2c(cmd: std::process::Command, ip: &str, dir: &std::path::Path) -> Proc {
    let d = dir.display();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    let body: Vec<u8> = (0..BIG).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(www.join("big"), body).expect("big file");
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  sendfile off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {ip}:{PORT} http2;
    root {d}/www;
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut cmd = cmd;
    cmd.args(["-c", &path.display().to_string(), "-e", &format!("{d}/error.log")]);
    spawn(cmd)
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
    let _nginx = start_nginx_h2c(server.cmd("nginx", &[]), &server.ip, &scratch.0);
    client.wait_port(&server.ip, PORT);

    let url = format!("http://{}:{PORT}/big", server.ip);
    let mut args: Vec<&str> = Vec::new();
    for i in 0..DOWNLOADS {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{size_download}\n", &url]);
    }
    let out = run(client.cmd("curl", &args));
    let sizes: Vec<&str> = out.lines().collect();
    assert_eq!(sizes, vec![BIG.to_string().as_str(); DOWNLOADS], "curl downloaded every file whole");

    let spans = agent.collect(to_server(&server.ip, PORT), 2 * DOWNLOADS, Duration::from_secs(15));
    let mut sides: Vec<&str> = spans.iter().map(|s| kind(s)).collect();
    sides.sort_unstable();
    assert_eq!(sides, [vec!["CLIENT"; DOWNLOADS], vec!["SERVER"; DOWNLOADS]].concat());
    for s in &spans {
        assert_eq!(attr_str(s, "url.path"), "/big");
        assert_eq!(attr_u64(s, "http.response.status_code"), 200);
        assert_eq!(attr_str(s, "network.protocol.version"), "2");
    }

    // Both ends together moved 2 MiB per download. Copying DATA payloads
    // (the first 2 KiB of every syscall, 8 KiB of an HTTP/2 one) cost far
    // more than this; frame headers and header blocks cost far less.
    let bytes = settled_counter(&agent, "meshless_kernel_event_bytes_total");
    let per_download = bytes / DOWNLOADS as f64;
    assert!(
        per_download < 48.0 * 1024.0,
        "{per_download:.0} ring-buffer bytes per 1 MiB download (both ends)"
    );
    assert!(per_download > 0.0, "the kernel counted its bytes");
}
