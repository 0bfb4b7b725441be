//! The connected-trace fixtures (tests/fixtures/chain): building them,
//! starting them in simulated pods, and the chain
//! curl → Python → Go → Java with its expected trace shape.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use super::{nodes::*, run, spans::*, spawn, Proc};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chain")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// Builds the Go service once (Go 1.26 from /usr/local/go when present).
pub fn go_service() -> PathBuf {
    go_service_built("chain-go-service", "")
}

/// The Go service built without symbol table and DWARF (`-ldflags=-s -w`).
pub fn go_service_stripped() -> PathBuf {
    go_service_built("chain-go-service-stripped", "-s -w")
}

fn go_service_built(name: &str, ldflags: &str) -> PathBuf {
    let out = tmp(name);
    let mut cmd = go_command();
    cmd.args(["build", "-ldflags", ldflags, "-o"])
        .arg(&out)
        .arg(fixture("service.go"))
        .env("GOPATH", tmp("gocache").join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "");
    run(cmd);
    out
}

/// The Go module in tests/fixtures/grpc/go (a grpc-go server and client of
/// meshless.test.Echo, and an HTTP server that accepts `Upgrade: h2c`),
/// built once per test binary with the module versions of its go.sum.
pub fn go_echo() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = tmp("grpc-go-echo");
        let mut cmd = go_command();
        cmd.args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/grpc/go"))
            .env("GOFLAGS", "-mod=readonly");
        run(cmd);
        out
    })
}

/// Go 1.26 from /usr/local/go when present, with a build cache under target/.
fn go_command() -> Command {
    let go = ["/usr/local/go/bin/go"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("go");
    let mut cmd = Command::new(go);
    cmd.env("GOCACHE", tmp("gocache"));
    cmd
}

/// Compiles the Java fixtures unless their classes are newer than the
/// sources; returns the classpath directory.
pub fn java_classes() -> PathBuf {
    let dir = tmp("chain-java");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let sources = ["Service", "BigClient"];
    let stale = sources.iter().any(|name| {
        let class = modified(&dir.join(format!("{name}.class")));
        class.is_none() || class < modified(&fixture(&format!("{name}.java")))
    });
    if stale {
        let mut cmd = Command::new("javac");
        cmd.arg("-d").arg(&dir);
        for name in sources {
            cmd.arg(fixture(&format!("{name}.java")));
        }
        run(cmd);
    }
    dir
}

/// The thread-per-request Python service on `pod`:`port`, calling
/// `downstream` (a base URL) for each request when given.
pub fn python_service(pod: &Pod, port: u16, downstream: Option<&str>) -> Proc {
    let script = fixture("service.py");
    let port = port.to_string();
    let mut args = vec![script.to_str().expect("utf-8 path"), pod.ip.as_str(), port.as_str()];
    args.extend(downstream);
    spawn(pod.cmd("python3", &args))
}

pub fn go_service_on(bin: &std::path::Path, pod: &Pod, port: u16, downstream: Option<&str>) -> Proc {
    let addr = format!("{}:{port}", pod.ip);
    let mut args = vec![addr.as_str()];
    args.extend(downstream);
    spawn(pod.cmd(bin.to_str().expect("utf-8 path"), &args))
}

pub fn java_service(classes: &std::path::Path, pod: &Pod, port: u16, downstream: Option<&str>) -> Proc {
    let port = port.to_string();
    let mut args = vec![
        "-Xshare:auto",
        "-XX:TieredStopAtLevel=1",
        "-cp",
        classes.to_str().expect("utf-8 path"),
        "Service",
        pod.ip.as_str(),
        port.as_str(),
    ];
    args.extend(downstream);
    spawn(pod.cmd("java", &args))
}

/// The Node keep-alive service on `pod`:`port` calling `/d/<id>` on
/// `ds_ip`:`ds_port` for each `/r/<id>`.
pub fn node_keepalive_service(pod: &Pod, port: u16, ds_ip: &str, ds_port: u16) -> Proc {
    let script = fixture("keepalive.js");
    let (port, ds_port) = (port.to_string(), ds_port.to_string());
    spawn(pod.cmd(
        "node",
        &[script.to_str().expect("utf-8 path"), &pod.ip, &port, ds_ip, &ds_port],
    ))
}

/// The six spans of one chained request, in order; each one's parent is
/// the one before it (the first is the root).
pub const ROLES: [&str; 6] = [
    "curl CLIENT",
    "python SERVER",
    "python CLIENT",
    "go SERVER",
    "go CLIENT",
    "java SERVER",
];

/// One hop of the chain: where the server listens and what the caller dials.
pub struct Hop {
    /// `ip:port` of the server pod.
    pub pod_addr: String,
    /// `ip:port` the caller dials: the pod itself or a DNATed Service IP.
    pub dialled: String,
}

/// curl → Python → Go → Java, each in its own pod, none forwarding headers.
pub struct Chain {
    pub client: Pod,
    pub hops: [Hop; 3],
    _procs: Vec<Proc>,
}

/// Which node each of curl, Python, Go, Java runs on, and whether every
/// hop goes through a DNATed Service IP.
pub struct Placement {
    pub nodes: [usize; 4],
    pub service_ips: bool,
}

impl Chain {
    pub fn start(cluster: &mut Cluster, placement: &Placement) -> Chain {
        let (go, java) = (go_service(), java_classes());
        let names = ["curl", "python", "go", "java"];
        let pods: Vec<Pod> = (0..4).map(|i| cluster.pod(placement.nodes[i], names[i])).collect();
        let ports = [8081u16, 8082, 8083];
        let hops: Vec<Hop> = (0..3)
            .map(|h| {
                let server = &pods[h + 1];
                let pod_addr = format!("{}:{}", server.ip, ports[h]);
                let dialled = if placement.service_ips {
                    let vip = cluster.service_ip(h as u8 + 1);
                    pods[h].dnat(&vip, 80, &server.ip, ports[h]);
                    format!("{vip}:80")
                } else {
                    pod_addr.clone()
                };
                Hop { pod_addr, dialled }
            })
            .collect();
        let url = |h: usize| format!("http://{}", hops[h].dialled);
        let java_url = url(2);
        let go_url = url(1);
        let mut procs = vec![java_service(&java, &pods[3], ports[2], None)];
        wait_dialled(&pods[2], &hops[2]);
        procs.push(go_service_on(&go, &pods[2], ports[1], Some(&java_url)));
        wait_dialled(&pods[1], &hops[1]);
        procs.push(python_service(&pods[1], ports[0], Some(&go_url)));
        wait_dialled(&pods[0], &hops[0]);
        let [h0, h1, h2]: [Hop; 3] = hops.try_into().unwrap_or_else(|_| unreachable!());
        Chain {
            client: pods[0].clone(),
            hops: [h0, h1, h2],
            _procs: procs,
        }
    }

    /// A chain known only by its addresses (no processes), to check
    /// span sets against; `hops` are (server pod ip:port, dialled ip:port).
    pub fn described(hops: [(&str, &str); 3]) -> Chain {
        let hop = |(pod_addr, dialled): (&str, &str)| Hop {
            pod_addr: pod_addr.to_owned(),
            dialled: dialled.to_owned(),
        };
        Chain {
            client: Pod {
                name: "curl".into(),
                netns: String::new(),
                ip: String::new(),
                cgroup: PathBuf::new(),
                node: 0,
            },
            hops: hops.map(hop),
            _procs: Vec::new(),
        }
    }

    /// Sends `n` requests `/r/c<i>` with curl from the client pod, one
    /// connection each; asserts every one came back 200 (the chain works).
    pub fn send(&self, n: usize, extra_curl_args: &[&str]) {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://{}/r/c{i}", self.hops[0].dialled))
            .collect();
        let mut args: Vec<&str> = vec!["-s", "-w", "%{http_code}\\n"];
        args.extend_from_slice(extra_curl_args);
        for u in &urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        let out = run(self.client.cmd("curl", &args));
        let codes: Vec<&str> = out.lines().collect();
        assert!(
            codes.len() == n && codes.iter().all(|c| *c == "200"),
            "the chain itself must work (curl → python → go → java): got HTTP codes {codes:?}"
        );
    }

    /// The role (index into [`ROLES`]) a span of this chain plays, if any.
    pub fn role(&self, s: &SpanView) -> Option<usize> {
        let server = s.server();
        let hop = self
            .hops
            .iter()
            .position(|h| server == h.pod_addr || server == h.dialled)?;
        match s.kind.as_str() {
            "CLIENT" => Some(2 * hop),
            "SERVER" => Some(2 * hop + 1),
            _ => None,
        }
    }

    /// Spans of this chain's requests.
    pub fn filter(&self) -> impl Fn(&SpanView) -> bool + '_ {
        move |s| s.path().starts_with("/r/") && self.role(s).is_some()
    }

    /// Checks `n` requests gave `n` traces of exactly the six spans in
    /// [`ROLES`], each the child of the one before; returns the failure
    /// report (per-runtime linked/wrong counts and every span) if not.
    pub fn check(&self, spans: &[SpanView], n: usize) -> Result<(), String> {
        // request id → role → spans of that role
        let mut by_id: BTreeMap<&str, [Vec<&SpanView>; 6]> = BTreeMap::new();
        for s in spans {
            if let Some(role) = self.role(s) {
                by_id.entry(s.path()).or_default()[role].push(s);
            }
        }
        let mut problems = Vec::new();
        // [count, linked, wrong parent, no parent, of the wrong: another
        // span, an id nobody exported, the right id in another trace]
        let mut table = [[0usize; 7]; 6];
        for roles in by_id.values() {
            for (r, got) in roles.iter().enumerate() {
                table[r][0] += got.len();
                for s in got {
                    let expected = if r == 0 { None } else { roles[r - 1].first().copied() };
                    let col = match (r, Parentage::of(s, expected, spans)) {
                        (0, Parentage::Root) | (_, Parentage::Linked) => 1,
                        (_, Parentage::Root) => 3,
                        (_, Parentage::WrongSpan) => 4,
                        (_, Parentage::Dangling) => 5,
                        (_, Parentage::OtherTrace) => 6,
                    };
                    table[r][col] += 1;
                    if col >= 4 {
                        table[r][2] += 1;
                    }
                }
            }
        }
        for (r, row) in table.iter().enumerate() {
            if row[0] != n || row[1] != n {
                problems.push(format!(
                    "{:<14} spans {:>3}/{n}  linked {:>3}  wrong parent {:>3}  no parent {:>3}  (parent should be {}; wrong = {} another span, {} an unexported id, {} the right id in another trace)",
                    ROLES[r],
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    if r == 0 { "none: root" } else { ROLES[r - 1] },
                    row[4],
                    row[5],
                    row[6],
                ));
            }
        }
        if by_id.len() != n {
            problems.push(format!("{} request ids seen, {n} sent", by_id.len()));
        }
        let mut traces: BTreeMap<&str, usize> = BTreeMap::new();
        for s in spans {
            *traces.entry(&s.trace_id).or_default() += 1;
        }
        let sizes: BTreeSet<usize> = traces.values().copied().collect();
        if traces.len() != n || sizes != BTreeSet::from([6]) {
            problems.push(format!(
                "{} traces (want {n}) with span counts {sizes:?} (want exactly 6 each)",
                traces.len()
            ));
        }
        for (id, roles) in &by_id {
            let ids: BTreeSet<&str> = roles.iter().flatten().map(|s| s.trace_id.as_str()).collect();
            if ids.len() > 1 {
                problems.push(format!("request {id} is split over {} traces", ids.len()));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("{}\n\n{}", problems.join("\n"), dump(spans)))
        }
    }
}

fn wait_dialled(caller: &Pod, hop: &Hop) {
    let (ip, port) = hop.dialled.rsplit_once(':').expect("ip:port");
    caller.wait_port(ip, port.parse().expect("port"));
}
