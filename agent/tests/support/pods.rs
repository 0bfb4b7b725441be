//! Simulated pods: network namespaces joined by veth pairs, and cgroup
//! directories named as kubelet names them, with real processes inside.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces ("pods") joined by a veth pair:
/// `a` has 10.X.Y.1, `b` has 10.X.Y.2 (X, Y unique per pair).
pub struct PodPair {
    pub a: String,
    pub b: String,
    pub ip_a: String,
    pub ip_b: String,
}

impl PodPair {
    pub fn new() -> PodPair {
        let n = NETNS_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let (x, y) = (200 + (pid % 50) as u8, (n % 250) as u8 + 1);
        let tag = format!("{}{}", pid % 100_000, n);
        let pair = PodPair {
            a: format!("mla{tag}"),
            b: format!("mlb{tag}"),
            ip_a: format!("10.{x}.{y}.1"),
            ip_b: format!("10.{x}.{y}.2"),
        };
        let veth_a = format!("va{tag}");
        let veth_b = format!("vb{tag}");
        for ns in [&pair.a, &pair.b] {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", &veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b, "netns", &pair.b,
        ]);
        sh(&[
            "ip",
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{}/24", pair.ip_a),
            "dev",
            &veth_a,
        ]);
        sh(&[
            "ip",
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{}/24", pair.ip_b),
            "dev",
            &veth_b,
        ]);
        sh(&["ip", "-n", &pair.a, "link", "set", &veth_a, "up"]);
        sh(&["ip", "-n", &pair.b, "link", "set", &veth_b, "up"]);
        pair
    }

    /// A command to run inside namespace `ns`.
    pub fn cmd(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for PodPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(st.success(), "{args:?} failed: {st}");
}

/// Waits until a TCP port accepts connections inside namespace `ns`.
/// A Python server in pod b on `port`, one thread per connection running
/// `serve(c)`: `serve` is Python source defining it (`socket`, `threading`
/// and `time` are imported). Returns once the port accepts.
pub fn python_conn_server(pods: &PodPair, port: u16, serve: &str) -> super::Proc {
    let script = format!(
        r#"import socket, threading, time
{serve}
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{ip}", {port}))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#,
        ip = pods.ip_b
    );
    let mut cmd = PodPair::cmd(&pods.b, "python3");
    cmd.args(["-c", &script]);
    let p = super::spawn(cmd);
    wait_port(&pods.a, &pods.ip_b, port);
    p
}

pub fn wait_port(ns: &str, ip: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let probe = format!("import socket; socket.create_connection(('{ip}', {port}), timeout=1).close()");
    while Instant::now() < deadline {
        let ok = PodPair::cmd(ns, "python3")
            .args(["-c", &probe])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{ip}:{port} in {ns} never accepted connections");
}

/// A cgroup directory named as kubelet names it; removed on drop.
pub struct PodCgroup {
    /// Directories created, outermost first.
    dirs: Vec<PathBuf>,
}

/// kubelet's cgroup driver layouts.
#[derive(Clone, Copy)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

impl PodCgroup {
    pub fn create(driver: Driver, pod_uid: &str, container_id: &str) -> PodCgroup {
        let root = meshless::k8s::cgroup::cgroup2_root().expect("a cgroup2 mount");
        let rel: Vec<String> = match driver {
            Driver::Systemd => vec![
                "kubepods.slice".into(),
                "kubepods-besteffort.slice".into(),
                format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_")),
                format!("cri-containerd-{container_id}.scope"),
            ],
            Driver::Cgroupfs => vec![
                "kubepods".into(),
                "besteffort".into(),
                format!("pod{pod_uid}"),
                container_id.into(),
            ],
        };
        let mut dirs = Vec::new();
        let mut path = root;
        for seg in rel {
            path = path.join(seg);
            if !path.exists() {
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
            }
            dirs.push(path.clone());
        }
        PodCgroup { dirs }
    }

    /// The leaf (container) directory.
    pub fn leaf(&self) -> &std::path::Path {
        self.dirs.last().expect("leaf")
    }

    /// A command that joins this cgroup, then runs `program` in namespace `ns`
    /// (`ip netns exec` remounts /sys, so the cgroup is joined first).
    pub fn cmd_in(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let procs = self.leaf().join("cgroup.procs");
        let mut script = format!("echo $$ > {} && exec ip netns exec {ns} {program}", procs.display());
        for a in args {
            script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // Move stragglers out, then remove (fails harmlessly if shared/busy).
            if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in pids.split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            for _ in 0..20 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
