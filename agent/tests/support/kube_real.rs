//! A real Kubernetes control plane for tests: Debian's etcd and the pinned
//! kube-apiserver that `cargo xtask setup` builds from Go modules, on
//! loopback ports chosen at run time, with a self-made CA and serving
//! certificate, a static token file (an admin in `system:masters`),
//! RBAC authorization, service-account signing keys and an audit log of
//! every request. There is no kubelet or controller-manager: tests create
//! pods bound to a node and patch their status themselves.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{
    pki::{ca_and_server_cert, openssl},
    Scratch,
};

const ADMIN_TOKEN: &str = "meshless-test-admin-token";

/// etcd + kube-apiserver, both stopped by pid on drop.
pub struct RealApi {
    dir: Scratch,
    pub port: u16,
    etcd_port: u16,
    etcd: Child,
    apiserver: Option<Child>,
    /// A kubeconfig for the admin (`system:masters`).
    pub admin: PathBuf,
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The kube-apiserver built by `cargo xtask setup` (or `MESHLESS_KUBE_APISERVER`).
pub fn apiserver_binary() -> PathBuf {
    if let Ok(p) = std::env::var("MESHLESS_KUBE_APISERVER") {
        return PathBuf::from(p);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kube-apiserver");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("kube-apiserver"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "no kube-apiserver under {}: run `cargo xtask setup` (builds it from the k8s.io/kubernetes module once)",
            dir.display()
        )
    })
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CA, serving certificate for 127.0.0.1 and service-account keys.
fn make_pki(dir: &Path) {
    ca_and_server_cert(dir, "IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc");
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

impl RealApi {
    /// Starts etcd and kube-apiserver and waits until the server is ready;
    /// creates Node objects named `nodes`.
    pub fn start(nodes: &[&str]) -> RealApi {
        let dir = Scratch::new(&format!("kube-real-{}", free_port()));
        make_pki(&dir.0);
        std::fs::write(
            dir.0.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .expect("tokens.csv");
        std::fs::write(
            dir.0.join("audit.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [\"RequestReceived\"]\nrules:\n- level: Metadata\n",
        )
        .expect("audit policy");
        let (etcd_port, peer_port) = (free_port(), free_port());
        let etcd = start_etcd(&dir.0, etcd_port, peer_port);
        let mut api = RealApi {
            port: free_port(),
            etcd_port,
            etcd,
            apiserver: None,
            admin: dir.0.join("admin.kubeconfig"),
            dir,
        };
        api.write_kubeconfig(&api.admin, ADMIN_TOKEN, api.port);
        api.start_apiserver();
        for node in nodes {
            api.create(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
        }
        api
    }

    fn start_apiserver(&mut self) {
        let d = |f: &str| self.dir.0.join(f).display().to_string();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.0.join("apiserver.log"))
            .expect("apiserver.log");
        let child = Command::new(apiserver_binary())
            .args([
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
                format!("--secure-port={}", self.port),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", d("certs")),
                format!("--tls-cert-file={}", d("server.crt")),
                format!("--tls-private-key-file={}", d("server.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--allow-privileged=true".into(),
                format!("--audit-policy-file={}", d("audit.yaml")),
                format!("--audit-log-path={}", d("audit.log")),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kube-apiserver");
        self.apiserver = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ok = self
                .kubectl_output(&["get", "--raw", "/readyz"], None)
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            if let Some(Ok(Some(st))) = self.apiserver.as_mut().map(Child::try_wait) {
                panic!("kube-apiserver exited ({st}):\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 90 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.0.join("apiserver.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops kube-apiserver (by pid) and starts it again on the same port.
    pub fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.start_apiserver();
    }

    fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Compacts etcd's history up to its current revision, so watches
    /// resuming from older resource versions get `410 Gone`.
    pub fn compact_etcd(&self) -> u64 {
        let base = format!("http://127.0.0.1:{}", self.etcd_port);
        // The revision: a range read of any key returns the store's header.
        let range = sh(Command::new("curl").args([
            "-sf",
            "-X",
            "POST",
            &format!("{base}/v3/kv/range"),
            "-d",
            r#"{"key":"AA=="}"#,
        ]));
        let v: Value = serde_json::from_str(&range).expect("etcd range answer");
        let revision: u64 = v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .expect("etcd revision");
        sh(Command::new("curl").args([
            "-sf",
            "-X",
            "POST",
            &format!("{base}/v3/kv/compaction"),
            "-d",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        ]));
        revision
    }

    /// Writes a kubeconfig for `token` pointing at `port` (this server, or a gate in front of it).
    pub fn write_kubeconfig(&self, path: &Path, token: &str, port: u16) {
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: real\n  context:\n    cluster: real\n    user: u\ncurrent-context: real\n",
            ca = self.dir.0.join("ca.crt").display()
        );
        std::fs::write(path, cfg).expect("write kubeconfig");
    }

    /// A path in this control plane's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> std::io::Result<Output> {
        kubectl_as(&self.admin, args, stdin)
    }

    /// Runs kubectl as the admin, asserting success; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        expect_ok(args, self.kubectl_output(args, None))
    }

    /// Creates an object (JSON) as the admin; returns it as created.
    pub fn create(&self, obj: &Value) -> Value {
        let args = ["create", "-o", "json", "-f", "-"];
        let out = expect_ok(&args, self.kubectl_output(&args, Some(&obj.to_string())));
        serde_json::from_str(&out).expect("kubectl printed JSON")
    }

    /// Replaces (or creates) an object with `kubectl apply`.
    pub fn apply(&self, obj: &Value) {
        let args = ["apply", "-f", "-"];
        expect_ok(&args, self.kubectl_output(&args, Some(&obj.to_string())));
    }

    /// A namespace with its `default` ServiceAccount (no controller makes it).
    pub fn namespace(&self, name: &str) {
        self.create(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}));
        self.create(&json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": name}}));
    }

    /// Creates a running pod bound to `node` and sets its status as a kubelet
    /// would (phase, podIP, containerStatuses[].containerID); returns its UID.
    pub fn running_pod(&self, p: &PodSpec) -> String {
        let created = self.create(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": p.owner.0, "name": p.owner.1,
                    "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]},
            "spec": {"nodeName": p.node, "serviceAccountName": "default",
                "containers": [{"name": p.container, "image": "example"}]}
        }));
        let status = json!({"status": {
            "phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
            "containerStatuses": [{"name": p.container, "containerID": format!("containerd://{}", p.container_id),
                "image": "example", "imageID": "", "ready": true, "restartCount": 0,
                "started": true, "state": {"running": {}}}]
        }});
        self.kubectl(&[
            "patch",
            "pod",
            p.name,
            "-n",
            p.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        created["metadata"]["uid"].as_str().expect("pod uid").to_owned()
    }

    /// A token for ServiceAccount `namespace/name` (TokenRequest API).
    pub fn token(&self, namespace: &str, name: &str) -> String {
        self.kubectl(&["create", "token", name, "-n", namespace, "--duration=1h"])
            .trim()
            .to_owned()
    }

    /// Requests the audit log recorded for `user`, one per request, except
    /// those kubectl made (tests use kubectl with the same identities).
    pub fn requests_by(&self, user: &str) -> Vec<(String, String, u64)> {
        let log = std::fs::read_to_string(self.dir.0.join("audit.log")).unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["user"]["username"].as_str() == Some(user))
            .filter(|e| !e["userAgent"].as_str().unwrap_or_default().starts_with("kubectl"))
            .filter(|e| seen.insert(e["auditID"].as_str().unwrap_or_default().to_owned()))
            .map(|e| {
                (
                    e["verb"].as_str().unwrap_or_default().to_owned(),
                    e["requestURI"].as_str().unwrap_or_default().to_owned(),
                    e["responseStatus"]["code"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

impl Drop for RealApi {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

/// What a simulated pod looks like in the API.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub ip: &'a str,
    /// (kind, name) of the controlling owner.
    pub owner: (&'a str, &'a str),
    pub labels: Value,
    pub container: &'a str,
    pub container_id: &'a str,
}

/// Runs kubectl with `kubeconfig`.
pub fn kubectl_as(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> std::io::Result<Output> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    child.wait_with_output()
}

fn expect_ok(args: &[&str], out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_etcd(dir: &Path, port: u16, peer: u16) -> Child {
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd.log");
    let child = Command::new("etcd")
        .args([
            "--name=test",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=test={peer}"),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start etcd (Debian package etcd-server, installed by `cargo xtask setup`)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("curl")
        .args(["-sf", &format!("{client}/health")])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(Instant::now() < deadline, "etcd not healthy in 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// Debian's Prometheus scraping `target` every second; stopped by pid on drop.
pub struct Prometheus {
    child: Child,
    pub addr: String,
    _dir: Scratch,
}

impl Prometheus {
    pub fn start(target: &str) -> Prometheus {
        let dir = Scratch::new(&format!("prometheus-{}", free_port()));
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: meshless\n  static_configs:\n  - targets: [\"{target}\"]\n"
            ),
        )
        .expect("prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package, installed by `cargo xtask setup`)");
        Prometheus { child, addr, _dir: dir }
    }

    /// The result vector of an instant query (empty while Prometheus is not up).
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return vec![];
        };
        use std::io::{Read, Write};
        let _ = write!(
            s,
            "GET /api/v1/query?query={encoded} HTTP/1.0\r\nHost: prometheus\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits until `promql` returns a series for which `matches` holds.
    pub fn wait_for(&self, promql: &str, matches: impl Fn(&Value) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(promql);
            if got.iter().any(|s| matches(&s["metric"])) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
