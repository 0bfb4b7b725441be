//! Helpers for the "propagation harms nothing" tests: nginx in a simulated
//! pod serving large files (and proxying), clients that report what they
//! received, and the raw-bytes recorder.
use std::{collections::BTreeMap, path::Path, process::Command};

use super::{nodes::Pod, run, spawn, Proc};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/chain/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// nginx in `pod` on `port` (sendfile on, keep-alive): files under
/// `dir/www`, `/proxy/…` forwarded (headers included) to `upstream/…`,
/// `/r/…` forwarded to `upstream/r/…`. With a certificate in `dir` (see
/// [`self_signed_cert`]) the same files are also served over TLS on
/// `port + TLS_PORT_OFFSET`.
pub fn nginx(pod: &Pod, port: u16, dir: &Path, upstream: &str) -> Proc {
    std::fs::create_dir_all(dir.join("www")).expect("www dir");
    let d = dir.display();
    let ip = &pod.ip;
    let tls = if dir.join("cert.pem").exists() {
        format!(
            "server {{ listen {ip}:{} ssl; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem; root {d}/www; }}",
            port + TLS_PORT_OFFSET
        )
    } else {
        String::new()
    };
    let http = format!("sendfile on;\n  keepalive_requests 100000;\n  {tls}");
    let server = format!(
        r#"listen {ip}:{port};
    root {d}/www;
    location /proxy/ {{ proxy_pass {upstream}/; proxy_http_version 1.1; }}
    location /r/ {{ proxy_pass {upstream}; proxy_http_version 1.1; }}"#
    );
    let conf = super::write_nginx_conf(dir, &http, &server);
    let log = format!("{d}/error.log");
    spawn(pod.cmd("nginx", &["-c", &conf, "-e", &log]))
}

/// Where [`nginx`] serves TLS, relative to its plain port.
pub const TLS_PORT_OFFSET: u16 = 1000;

/// A throwaway self-signed certificate and key in `dir` (cert.pem, key.pem).
pub fn self_signed_cert(dir: &Path) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=meshless-test",
    ])
    .arg("-keyout")
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    run(cmd);
}

/// Writes `size` pseudo-random bytes to `dir/www/name`; returns their sha256.
pub fn big_file(dir: &Path, name: &str, size: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ size as u64;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let path = dir.join("www").join(name);
    std::fs::write(&path, bytes).expect("write big file");
    sha256(&path)
}

pub fn sha256(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    run(cmd).split_whitespace().next().unwrap_or("").to_owned()
}

/// Parses "PATH LENGTH SHA256" lines into path → [(length, sha256)].
pub fn received(out: &str) -> BTreeMap<String, Vec<(usize, String)>> {
    let mut map: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [path, len, sha] = f[..] {
            map.entry(path.to_owned())
                .or_default()
                .push((len.parse().unwrap_or(0), sha.to_owned()));
        }
    }
    map
}

/// The FIONREAD-sized client: pipelined, then sequential, one connection.
pub fn fionread_client(pod: &Pod, ip: &str, port: u16, paths: &[&str]) -> String {
    let port = port.to_string();
    let script = fixture("fionread_client.py");
    let mut args = vec![script.as_str(), ip, port.as_str()];
    args.extend_from_slice(paths);
    run(pod.cmd("python3", &args))
}

/// The Node client: each path twice over one keep-alive connection.
pub fn node_client(pod: &Pod, ip: &str, port: u16, paths: &[&str]) -> String {
    let port = port.to_string();
    let script = fixture("keepalive_client.js");
    let mut args = vec![script.as_str(), ip, port.as_str()];
    args.extend_from_slice(paths);
    run(pod.cmd("node", &args))
}

/// Java's HttpClient: each path twice, pooled keep-alive connections.
pub fn java_client(pod: &Pod, ip: &str, port: u16, paths: &[&str]) -> String {
    let classes = super::chain::java_classes();
    let port = port.to_string();
    let mut args = vec![
        "-cp",
        classes.to_str().expect("utf-8 path"),
        "BigClient",
        ip,
        port.as_str(),
    ];
    args.extend_from_slice(paths);
    run(pod.cmd("java", &args))
}

/// curl fetching each path once on one keep-alive connection into `dir`.
pub fn curl_client(pod: &Pod, ip: &str, port: u16, paths: &[&str], dir: &Path) -> String {
    curl_fetch(pod, &format!("http://{ip}:{port}"), paths, dir)
}

/// curl over TLS (the test's self-signed certificate accepted), as
/// [`curl_client`].
pub fn curl_tls_client(pod: &Pod, ip: &str, port: u16, paths: &[&str], dir: &Path) -> String {
    curl_fetch(pod, &format!("https://{ip}:{port}"), paths, dir)
}

fn curl_fetch(pod: &Pod, base: &str, paths: &[&str], dir: &Path) -> String {
    let mut args: Vec<String> = vec!["-s".into(), "--fail".into(), "-k".into()];
    let mut files = Vec::new();
    let tag = if base.starts_with("https") { "tls" } else { "plain" };
    for (i, p) in paths.iter().enumerate() {
        let file = dir.join(format!("curl-{tag}-{i}.out"));
        args.extend(["-o".into(), file.display().to_string(), format!("{base}{p}")]);
        files.push((p, file));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(pod.cmd("curl", &refs));
    files
        .iter()
        .map(|(p, f)| {
            let len = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            format!("{p} {len} {}\n", sha256(f))
        })
        .collect()
}

/// One case of rawbytes.py: what the client sent, what the server got.
pub struct RawCase {
    pub name: String,
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
}

/// The raw-bytes recorder: server in `server`, client cases from `client`.
pub fn raw_bytes(server: &Pod, client: &Pod, port: u16, dir: &Path) -> Vec<RawCase> {
    let script = fixture("rawbytes.py");
    let (port_s, out) = (port.to_string(), dir.display().to_string());
    let _server = spawn(server.cmd("python3", &[&script, "server", &server.ip, &port_s, &out]));
    client.wait_port(&server.ip, port);
    let names = run(client.cmd("python3", &[&script, "client", &server.ip, &port_s, &out]));
    let read = |name: String| std::fs::read(dir.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    names
        .lines()
        .enumerate()
        .map(|(k, name)| RawCase {
            name: name.to_owned(),
            sent: read(format!("sent-{k}.bin")),
            received: read(format!("recv-{k}.bin")),
        })
        .collect()
}

/// TCP options seen on the wire by fixtures/chain/tcp_options.py.
pub struct OptionSniffer {
    out: std::path::PathBuf,
    _proc: Proc,
}

impl OptionSniffer {
    /// Starts sniffing segments to or from `port` in `pod`'s namespace.
    pub fn start(pod: &Pod, port: u16, dir: &Path) -> OptionSniffer {
        let out = dir.join(format!("tcp-options-{port}.txt"));
        let file = std::fs::File::create(&out).expect("sniffer output file");
        let script = fixture("tcp_options.py");
        let mut cmd = pod.cmd("python3", &[&script, &port.to_string()]);
        cmd.stdout(file).stderr(std::process::Stdio::null());
        let proc = Proc(cmd.spawn().expect("start tcp_options.py"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&out).unwrap_or_default().starts_with("ready") {
            assert!(std::time::Instant::now() < deadline, "tcp_options.py never got ready");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        OptionSniffer { out, _proc: proc }
    }

    /// (segments seen, option kind → segments carrying it).
    pub fn kinds(&self) -> (usize, BTreeMap<u8, usize>) {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let mut kinds = BTreeMap::new();
        let mut segments = 0;
        for line in text.lines().skip(1) {
            segments += 1;
            let list = line.split_whitespace().nth(3).unwrap_or("");
            for k in list.split(',').filter_map(|k| k.parse::<u8>().ok()) {
                *kinds.entry(k).or_default() += 1;
            }
        }
        (segments, kinds)
    }
}

/// Kinds every TCP stack uses: end, nop, mss, window scale, sack-permitted,
/// sack, timestamps.
pub const STANDARD_TCP_OPTIONS: [u8; 7] = [0, 1, 2, 3, 4, 5, 8];

/// BPF program and map types the process `pid` holds open, from
/// /proc/PID/fdinfo (prog_type / map_type numbers of the kernel UAPI).
pub fn bpf_objects(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let (mut progs, mut maps) = (Vec::new(), Vec::new());
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in info.lines() {
            let num = |prefix: &str| line.strip_prefix(prefix).and_then(|v| v.trim().parse::<u32>().ok());
            progs.extend(num("prog_type:"));
            maps.extend(num("map_type:"));
        }
    }
    (progs, maps)
}

/// bpf_prog_type / bpf_map_type values that touch socket data paths.
pub const BPF_PROG_TYPE_SK_SKB: u32 = 14;
pub const BPF_PROG_TYPE_SK_MSG: u32 = 16;
pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
pub const BPF_MAP_TYPE_SOCKHASH: u32 = 18;

/// The sock_ops program type (TCP header options are written from it).
pub const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;

/// Pids of meshless agents running besides `mine` (other tests on this
/// machine): their cgroup-root programs act on our pods' sockets too.
pub fn other_agents(mine: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != mine)
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "meshless"))
        .collect()
}
