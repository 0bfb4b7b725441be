//! Simulated Kubernetes nodes on one machine: each node is a cgroup2
//! subtree (what `--cgroup` scopes an agent to) plus a "node" network
//! namespace with a bridge that routes between its pods and to the other
//! nodes; each pod is a network namespace with a veth into its node's
//! bridge and a cgroup directory under its node. Service IPs are virtual
//! addresses DNATed with iptables in the calling pod, as kube-proxy does.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static CLUSTER_SEQ: AtomicU32 = AtomicU32::new(0);

/// A set of simulated nodes with routes between all their pods.
///
/// Node `i` has pod subnet 10.X.(C+i).0/24 with its bridge at .254; X
/// depends on the test process, C on the cluster, so parallel test
/// processes and other pod helpers (10.200+.*) do not collide.
pub struct Cluster {
    tag: String,
    x: u8,
    base: u8,
    pub nodes: Vec<Node>,
    pods: Vec<Pod>,
}

/// One simulated node.
pub struct Node {
    pub name: String,
    /// The node's cgroup2 directory (absolute), parent of its pods' cgroups.
    pub cgroup: PathBuf,
    /// The network namespace routing for this node's pods.
    pub netns: String,
    subnet: u8,
}

/// One simulated pod: its own network namespace and cgroup, on a node.
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub cgroup: PathBuf,
    pub node: usize,
}

impl Cluster {
    /// Creates `n` nodes (at most 4) with routes between all of them.
    pub fn new(n: usize) -> Cluster {
        assert!((1..=4).contains(&n), "1 to 4 simulated nodes");
        let seq = CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, seq);
        let x = 150 + (pid % 50) as u8;
        let base = ((seq % 24) * 8) as u8 + 8;
        let root = meshless::k8s::cgroup::cgroup2_root().expect("a cgroup2 mount");
        let mut cluster = Cluster {
            tag: tag.clone(),
            x,
            base,
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        for i in 0..n {
            let name = format!("node{}", (b'a' + i as u8) as char);
            let cgroup = root.join(format!("meshless-test-{tag}-{name}"));
            std::fs::create_dir_all(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
            let netns = format!("mln{tag}{i}");
            let subnet = base + i as u8;
            sh(&["ip", "netns", "add", &netns]);
            nsh(&netns, &["ip", "link", "set", "lo", "up"]);
            nsh(&netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            nsh(&netns, &["ip", "link", "add", "br0", "type", "bridge"]);
            nsh(
                &netns,
                &["ip", "addr", "add", &format!("10.{x}.{subnet}.254/24"), "dev", "br0"],
            );
            nsh(&netns, &["ip", "link", "set", "br0", "up"]);
            cluster.nodes.push(Node {
                name,
                cgroup,
                netns,
                subnet,
            });
        }
        // Point-to-point links between every pair of nodes, /30 each, and a
        // route to the peer's pod subnet over it.
        let mut link = 0u8;
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&cluster.nodes[i], &cluster.nodes[j]);
                let (va, vb) = (format!("t{tag}{i}{j}a"), format!("t{tag}{i}{j}b"));
                let transit = base + 7;
                let (ia, ib) = (
                    format!("10.{x}.{transit}.{}", 4 * link + 1),
                    format!("10.{x}.{transit}.{}", 4 * link + 2),
                );
                sh(&[
                    "ip", "link", "add", &va, "netns", &a.netns, "type", "veth", "peer", "name", &vb, "netns", &b.netns,
                ]);
                nsh(&a.netns, &["ip", "addr", "add", &format!("{ia}/30"), "dev", &va]);
                nsh(&b.netns, &["ip", "addr", "add", &format!("{ib}/30"), "dev", &vb]);
                nsh(&a.netns, &["ip", "link", "set", &va, "up"]);
                nsh(&b.netns, &["ip", "link", "set", &vb, "up"]);
                nsh(
                    &a.netns,
                    &["ip", "route", "add", &format!("10.{x}.{}.0/24", b.subnet), "via", &ib],
                );
                nsh(
                    &b.netns,
                    &["ip", "route", "add", &format!("10.{x}.{}.0/24", a.subnet), "via", &ia],
                );
                link += 1;
            }
        }
        cluster
    }

    /// Adds a pod named `name` on node `node` and returns it.
    pub fn pod(&mut self, node: usize, name: &str) -> Pod {
        let k = self.pods.len();
        let (tag, x) = (&self.tag, self.x);
        let n = &self.nodes[node];
        let netns = format!("mlp{tag}{k}");
        let ip = format!("10.{x}.{}.{}", n.subnet, k + 1);
        sh(&["ip", "netns", "add", &netns]);
        nsh(&netns, &["ip", "link", "set", "lo", "up"]);
        let (inner, outer) = (format!("e{tag}{k}"), format!("h{tag}{k}"));
        sh(&[
            "ip", "link", "add", &inner, "netns", &netns, "type", "veth", "peer", "name", &outer, "netns", &n.netns,
        ]);
        nsh(&netns, &["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner]);
        nsh(&netns, &["ip", "link", "set", &inner, "up"]);
        nsh(
            &netns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("10.{x}.{}.254", n.subnet),
            ],
        );
        nsh(&n.netns, &["ip", "link", "set", &outer, "master", "br0"]);
        nsh(&n.netns, &["ip", "link", "set", &outer, "up"]);
        let cgroup = n.cgroup.join(format!("pod-{name}"));
        std::fs::create_dir_all(&cgroup).unwrap_or_else(|e| panic!("mkdir {}: {e}", cgroup.display()));
        let pod = Pod {
            name: name.to_owned(),
            netns,
            ip,
            cgroup,
            node,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// A virtual Service IP (not assigned anywhere; only DNAT rules know it).
    pub fn service_ip(&self, n: u8) -> String {
        format!("10.96.{}.{}", self.x, n)
    }

    /// The node's cgroup, absolute (one form `--cgroup` takes).
    pub fn node_cgroup(&self, node: usize) -> &Path {
        &self.nodes[node].cgroup
    }

    /// The node's cgroup relative to the cgroup2 mount (the other form).
    pub fn node_cgroup_relative(&self, node: usize) -> String {
        let root = meshless::k8s::cgroup::cgroup2_root().expect("a cgroup2 mount");
        let cgroup = &self.nodes[node].cgroup;
        cgroup.strip_prefix(&root).unwrap_or(cgroup).display().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pod in self.pods.iter().rev() {
            kill_all(&pod.netns, &pod.cgroup);
            let _ = Command::new("ip").args(["netns", "del", &pod.netns]).status();
            remove_cgroup(&pod.cgroup);
        }
        for node in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &node.netns]).status();
            remove_cgroup(&node.cgroup);
        }
    }
}

impl Pod {
    /// A command that joins this pod's cgroup, then runs `program` in its
    /// network namespace (`ip netns exec` remounts /sys, so the cgroup is
    /// joined first).
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let procs = self.cgroup.join("cgroup.procs");
        let mut script = format!(
            "echo $$ > '{}' && exec ip netns exec {} '{program}'",
            procs.display(),
            self.netns
        );
        for a in args {
            script.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    }

    /// Sends this pod's TCP connections to `vip:vport` to `to_ip:to_port`,
    /// as kube-proxy's iptables mode does for a ClusterIP.
    pub fn dnat(&self, vip: &str, vport: u16, to_ip: &str, to_port: u16) {
        nsh(
            &self.netns,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                vip,
                "-p",
                "tcp",
                "--dport",
                &vport.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{to_ip}:{to_port}"),
            ],
        );
    }

    /// Waits until `ip:port` accepts connections from this pod.
    pub fn wait_port(&self, ip: &str, port: u16) {
        super::wait_port(&self.netns, ip, port);
    }
}

fn kill_all(netns: &str, cgroup: &Path) {
    let mut pids: Vec<String> = Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        pids.extend(procs.split_whitespace().map(str::to_owned));
    }
    for pid in pids {
        let _ = Command::new("kill").args(["-9", &pid]).status();
    }
}

fn remove_cgroup(dir: &Path) {
    for _ in 0..40 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command inside network namespace `ns`, asserting success.
fn nsh(ns: &str, args: &[&str]) {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full);
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
