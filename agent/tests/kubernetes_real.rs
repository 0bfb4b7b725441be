//! Kubernetes metadata against a real control plane: etcd + the pinned
//! kube-apiserver (support/kube_real.rs), the project's own manifests and
//! RBAC, and simulated pods (network namespace + kubelet-named cgroup with
//! a real process) registered as Pod objects bound to this node with the
//! status a kubelet would write. Faults a real server cannot produce on
//! demand stay in kubernetes.rs against the in-process fake.
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{gate::Gate, kube_real::*, otlp::*, *};

const NODE: &str = "node-a";
const OTHER_NODE: &str = "node-b";
const AGENT_USER: &str = "system:serviceaccount:meshless:meshless";
const WEB_CID: &str = "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1";
const LOAD_CID: &str = "b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2";
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes");

/// The project's manifests applied for real; returns a kubeconfig holding a
/// token of the agent's own ServiceAccount.
fn install_meshless(api: &RealApi) -> String {
    api.kubectl(&["create", "namespace", "meshless"]);
    api.kubectl(&["apply", "-k", DEPLOY, "--dry-run=server"]);
    api.kubectl(&["apply", "-k", DEPLOY]);
    let token = api.token("meshless", "meshless");
    let path = api.path("agent.kubeconfig");
    api.write_kubeconfig(&path, &token, api.port);
    path.display().to_string()
}

fn start_agent(kubeconfig: &str, receiver: &Receiver) -> Agent {
    let agent = Agent::start_env(
        &["--otlp-endpoint", &receiver.endpoint(), "--traces-exporter", "otlp"],
        &[("NODE_NAME", NODE), ("KUBECONFIG", kubeconfig)],
    );
    let addr = agent.metrics_addr.clone().expect("admin server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&addr, "/readyz").trim() != "ready" {
        assert!(
            Instant::now() < deadline,
            "agent never synced with the real API server: {:?}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent
}

/// The web Deployment's pod (pod b) and a StatefulSet client (pod a), both
/// on this node, and a Service `web` with an EndpointSlice naming pod b.
struct Shop {
    web_uid: String,
    load_uid: String,
    vip: String,
}

fn web_pod<'a>(pods: &'a PodPair, name: &'a str, cid: &'a str) -> PodSpec<'a> {
    PodSpec {
        namespace: "shop",
        name,
        node: NODE,
        ip: &pods.ip_b,
        owner: ("ReplicaSet", "web-5d4f8b7c9"),
        labels: json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/version": "v2",
            "pod-template-hash": "5d4f8b7c9"}),
        container: "app",
        container_id: cid,
    }
}

fn slice(name: &str, ip: &str, pod: &str, port: u16) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE,
            "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

fn shop(api: &RealApi, pods: &PodPair, port: u16) -> Shop {
    api.namespace("shop");
    api.namespace("tools");
    let web_uid = api.running_pod(&web_pod(pods, "web-5d4f8b7c9-x7k2p", WEB_CID));
    let load_uid = api.running_pod(&PodSpec {
        namespace: "tools",
        name: "loadgen-0",
        node: NODE,
        ip: &pods.ip_a,
        owner: ("StatefulSet", "loadgen"),
        labels: json!({"app": "loadgen"}),
        container: "curl",
        container_id: LOAD_CID,
    });
    // 10.96.0.0/16 is the server's service range; the address is virtual
    // (DNATed inside pod a, as kube-proxy would).
    let vip = format!("10.96.{}.{}", port % 200, 10 + port % 100);
    api.create(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": vip, "selector": {"app.kubernetes.io/name": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": port}]}
    }));
    api.create(&slice("web-abcde", &pods.ip_b, "web-5d4f8b7c9-x7k2p", port));
    Shop { web_uid, load_uid, vip }
}

fn dnat(pods: &PodPair, vip: &str, port: u16) {
    // A route first: locally sent packets are routed before OUTPUT's DNAT.
    let mut route = PodPair::cmd(&pods.a, "ip");
    route.args(["route", "add", &format!("{vip}/32"), "via", &pods.ip_b]);
    run(route);
    let mut cmd = PodPair::cmd(&pods.a, "iptables");
    cmd.args([
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        vip,
        "-p",
        "tcp",
        "--dport",
        "80",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{}:{port}", pods.ip_b),
    ]);
    run(cmd);
}

/// The web server's document root: `/kiali` answers 200, any other path
/// but `/` a 404 (a complete exchange still).
fn docroot(api: &RealApi) -> std::path::PathBuf {
    let dir = api.path("www");
    std::fs::create_dir_all(&dir).expect("docroot");
    std::fs::write(dir.join("kiali"), "ok\n").expect("docroot page");
    dir
}

/// Python's http.server in pod b on `ip`:`port`, serving `root`.
fn start_web(pods: &PodPair, cg: &PodCgroup, ip: &str, port: u16, root: &std::path::Path) -> Proc {
    let root = root.to_str().expect("utf-8 path");
    let p = spawn(cg.cmd_in(
        &pods.b,
        "python3",
        &[
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            ip,
            "--directory",
            root,
        ],
    ));
    wait_port(&pods.a, ip, port);
    p
}

/// A second address in pod b (10.X.Y.3, on the same veth), as a second
/// endpoint of the Service would have.
fn second_address(pods: &PodPair) -> String {
    let mut show = PodPair::cmd(&pods.b, "ip");
    show.args(["-o", "-4", "addr", "show"]);
    let out = run(show);
    let dev = out
        .lines()
        .find(|l| l.contains(&format!("inet {}/", pods.ip_b)))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("pod b's device: {out}"))
        .to_owned();
    let (net, _) = pods.ip_b.rsplit_once('.').expect("IPv4");
    let ip = format!("{net}.3");
    let mut add = PodPair::cmd(&pods.b, "ip");
    add.args(["addr", "add", &format!("{ip}/24"), "dev", &dev]);
    run(add);
    ip
}

fn curl(pods: &PodPair, cg: &PodCgroup, url: &str) {
    run(cg.cmd_in(&pods.a, "curl", &["-s", "-o", "/dev/null", url]));
}

fn res(s: &Received, key: &str) -> String {
    s.resource.get(key).cloned().unwrap_or_default()
}

/// The server and client span of one request to `path`.
fn call(receiver: &Receiver, path: &str) -> (Received, Received) {
    let spans = receiver.wait_spans(
        |s| s.attr("url.path").as_deref() == Some(path),
        2,
        Duration::from_secs(15),
    );
    let server = spans.iter().find(|s| s.span.kind == 2).cloned();
    let client = spans.iter().find(|s| s.span.kind == 3).cloned();
    match (server, client) {
        (Some(s), Some(c)) => (s, c),
        _ => panic!("expected a server and a client span for {path}: {spans:#?}"),
    }
}

#[test]
fn the_manifests_apply_server_side_and_the_agents_service_account_may_watch_what_it_needs_and_nothing_else() {
    let _serial = serial();
    let api = RealApi::start(&[NODE]);
    let kubeconfig = install_meshless(&api);
    let as_agent = |args: &[&str]| kubectl_as(std::path::Path::new(&kubeconfig), args, None).expect("run kubectl");
    for allowed in [
        ["get", "pods", "-A", "--field-selector", "spec.nodeName=node-a"].as_slice(),
        &["get", "services", "-A"],
        &["get", "endpointslices.discovery.k8s.io", "-A"],
    ] {
        let out = as_agent(allowed);
        assert!(
            out.status.success(),
            "{allowed:?} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for refused in [
        ["get", "secrets", "-A"].as_slice(),
        &["get", "configmaps", "-n", "meshless"],
        &["get", "nodes"],
        &["delete", "pod", "-n", "meshless", "anything"],
        &["create", "namespace", "intruder"],
        &["create", "token", "meshless", "-n", "meshless"],
    ] {
        let out = as_agent(refused);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.to_lowercase().contains("forbidden"),
            "{refused:?} was not refused: {stderr}"
        );
    }
    for verb in ["create", "update", "patch", "delete"] {
        for resource in ["pods", "services", "endpointslices.discovery.k8s.io"] {
            let out = as_agent(&["auth", "can-i", verb, resource, "-A"]);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                "no",
                "{verb} {resource} must be refused"
            );
        }
    }

    // The agent, with that token, lists and watches what it needs and is
    // refused nothing.
    let receiver = Receiver::start(Transport::Grpc);
    let _agent = start_agent(&kubeconfig, &receiver);
    let requests = api.requests_by(AGENT_USER);
    let refused: Vec<_> = requests.iter().filter(|(_, _, code)| *code >= 400).collect();
    assert!(refused.is_empty(), "the agent was refused: {refused:?}");
    for (verb, prefix) in [
        ("list", "/api/v1/pods?"),
        ("watch", "/api/v1/pods?"),
        ("list", "/api/v1/services?"),
        ("watch", "/api/v1/services?"),
        ("list", "/apis/discovery.k8s.io/v1/endpointslices?"),
        ("watch", "/apis/discovery.k8s.io/v1/endpointslices?"),
    ] {
        assert!(
            requests.iter().any(|(v, uri, _)| v == verb && uri.starts_with(prefix)),
            "no {verb} {prefix}: {requests:?}"
        );
    }
}

#[test]
fn two_pods_calling_through_a_service_carry_metadata_from_the_real_api_and_pods_of_other_nodes_never_reach_the_agent() {
    let _serial = serial();
    let pods = PodPair::new();
    let api = RealApi::start(&[NODE, OTHER_NODE]);
    let kubeconfig = install_meshless(&api);
    let port = 8601;
    let shop = shop(&api, &pods, port);
    // A pod of the same client workload scheduled on another node, whose
    // processes (simulated here) must not be attributed by this node's agent.
    const OTHER_CID: &str = "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3";
    let other_uid = api.running_pod(&PodSpec {
        namespace: "tools",
        name: "loadgen-1",
        node: OTHER_NODE,
        ip: &pods.ip_a,
        owner: ("StatefulSet", "loadgen"),
        labels: json!({"app": "loadgen"}),
        container: "curl",
        container_id: OTHER_CID,
    });
    let receiver = Receiver::start(Transport::Grpc);
    let agent = start_agent(&kubeconfig, &receiver);
    let prometheus = Prometheus::start(agent.metrics_addr.as_deref().expect("metrics"));
    let web_cg = PodCgroup::create(Driver::Systemd, &shop.web_uid, WEB_CID);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, &shop.load_uid, LOAD_CID);
    let other_cg = PodCgroup::create(Driver::Cgroupfs, &other_uid, OTHER_CID);
    let _web = start_web(&pods, &web_cg, &pods.ip_b, port, &docroot(&api));
    dnat(&pods, &shop.vip, port);

    curl(&pods, &load_cg, &format!("http://{}/via-service", shop.vip));
    let (server, client) = call(&receiver, "/via-service");
    assert_eq!(res(&server, "k8s.pod.name"), "web-5d4f8b7c9-x7k2p");
    assert_eq!(res(&server, "k8s.pod.uid"), shop.web_uid);
    assert_eq!(res(&server, "k8s.namespace.name"), "shop");
    assert_eq!(res(&server, "k8s.deployment.name"), "web");
    assert_eq!(res(&server, "k8s.container.name"), "app");
    assert_eq!(res(&server, "k8s.node.name"), NODE);
    assert_eq!(res(&client, "k8s.pod.name"), "loadgen-0");
    assert_eq!(res(&client, "k8s.pod.uid"), shop.load_uid);
    assert_eq!(res(&client, "k8s.namespace.name"), "tools");
    assert_eq!(res(&client, "k8s.statefulset.name"), "loadgen");
    assert_eq!(res(&client, "k8s.container.name"), "curl");
    assert_eq!(res(&client, "k8s.node.name"), NODE);
    assert_eq!(
        client.attr("server.address").as_deref(),
        Some("web.shop.svc.cluster.local"),
        "the client span names the Service it called"
    );
    assert_eq!(server.parent_span_id(), client.span_id());

    // The same call from the other node's pod: the agent never heard of it.
    curl(&pods, &other_cg, &format!("http://{}/from-other-node", shop.vip));
    let (_, foreign) = call(&receiver, "/from-other-node");
    assert_eq!(
        res(&foreign, "k8s.pod.name"),
        "",
        "a pod on another node reached the agent"
    );
    let pod_requests: Vec<_> = api
        .requests_by(AGENT_USER)
        .into_iter()
        .filter(|(_, uri, _)| uri.starts_with("/api/v1/pods"))
        .collect();
    assert!(!pod_requests.is_empty());
    for (verb, uri, _) in &pod_requests {
        assert!(
            uri.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{verb} {uri} is not node-scoped"
        );
    }

    // Kiali's graph and the Istio dashboards work on what Prometheus scraped.
    kiali_and_grafana_queries_show_the_call(&prometheus, || {
        curl(&pods, &load_cg, &format!("http://{}/kiali", shop.vip));
        curl(&pods, &load_cg, &format!("http://{}/kiali-missing", shop.vip));
    });
}

/// What Kiali groups its graph queries by.
const KIALI_GROUP: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,\
source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,\
destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,\
destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";

/// Kiali's namespace, workload and service graph queries return the
/// loadgen → web edge with Istio's label values and its 200 traffic (and
/// the namespace graph its 404s too, which Kiali colours as errors); the
/// Istio Grafana dashboards' queries return data. `call` makes one more
/// 200 and one more 404 request (rates need increases between scrapes).
fn kiali_and_grafana_queries_show_the_call(prometheus: &Prometheus, call: impl Fn()) {
    let expected = [
        ("source_cluster", "Kubernetes"),
        ("source_workload_namespace", "tools"),
        ("source_workload", "loadgen"),
        ("source_canonical_service", "loadgen"),
        ("source_canonical_revision", "latest"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service_namespace", "shop"),
        ("destination_service", "web.shop.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_workload_namespace", "shop"),
        ("destination_workload", "web"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v2"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ];
    let rate = |selector: &str| format!("sum(rate(istio_requests_total{{{selector}}}[1m])) by ({KIALI_GROUP}) > 0");
    let graph = [
        // Namespace graph of shop: requests into it, as destinations report.
        rate(r#"reporter="destination",destination_service_namespace="shop""#),
        // Namespace graph of tools: requests out of it, as sources report.
        rate(r#"reporter="source",source_workload_namespace="tools""#),
        // Workload graph of web.
        rate(r#"reporter="destination",destination_workload_namespace="shop",destination_workload="web""#),
        // The web Service's inbound.
        rate(r#"reporter="destination",destination_service_namespace="shop",destination_service_name="web""#),
        // Its outbound side, as the caller reports it.
        rate(r#"reporter="source",destination_service_namespace="shop",destination_service_name="web""#),
    ];
    // Every graph query finds the edge's 200s; the namespace graph its 404s too.
    let wanted: Vec<(&String, &str)> = graph.iter().map(|q| (q, "200")).chain([(&graph[0], "404")]).collect();
    let edge = |m: &Value, code: &str| {
        m["response_code"].as_str() == Some(code) && expected.iter().all(|(k, v)| m[*k].as_str() == Some(*v))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<(String, &str, Vec<Value>)> = vec![];
    for _ in 0..60 {
        call();
        std::thread::sleep(Duration::from_millis(1200));
        missing = wanted
            .iter()
            .map(|(q, code)| ((*q).clone(), *code, prometheus.query(q)))
            .filter(|(_, code, got)| !got.iter().any(|s| edge(&s["metric"], code)))
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    assert!(missing.is_empty(), "Kiali's queries miss the edge: {missing:#?}");
    for dashboard in [
        // Istio Service Dashboard.
        r#"round(sum(irate(istio_requests_total{reporter=~"destination",destination_service=~"web.shop.svc.cluster.local"}[5m])), 0.001)"#,
        r#"histogram_quantile(0.50, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"destination",destination_service=~"web.shop.svc.cluster.local"}[1m])) by (le))"#,
        // Istio Workload Dashboard: inbound by source workload.
        r#"sum(irate(istio_requests_total{reporter=~"destination",destination_workload_namespace=~"shop",destination_workload=~"web"}[5m])) by (source_workload, source_workload_namespace)"#,
        // Istio Mesh Dashboard: success rate per workload.
        r#"sum(rate(istio_requests_total{reporter=~"source",response_code!~"5.*"}[5m])) by (destination_workload, destination_workload_namespace)"#,
    ] {
        assert!(!prometheus.query(dashboard).is_empty(), "no data for {dashboard}");
    }
}

#[test]
fn metadata_stays_right_across_pod_replacement_endpoint_changes_an_api_restart_and_a_compaction() {
    let _serial = serial();
    let pods = PodPair::new();
    let mut api = RealApi::start(&[NODE]);
    let kubeconfig_direct = install_meshless(&api);
    let port = 8602;
    let shop = shop(&api, &pods, port);
    // The agent reaches the API server through a gate the test can close.
    let gate = Gate::start(api.port);
    let token = std::fs::read_to_string(&kubeconfig_direct)
        .expect("kubeconfig")
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
        .expect("token");
    let gated = api.path("gated.kubeconfig");
    api.write_kubeconfig(&gated, &token, gate.port);
    let receiver = Receiver::start(Transport::Grpc);
    let _agent = start_agent(&gated.display().to_string(), &receiver);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, &shop.load_uid, LOAD_CID);
    let web_cg = PodCgroup::create(Driver::Systemd, &shop.web_uid, WEB_CID);
    let root = docroot(&api);
    let web = start_web(&pods, &web_cg, &pods.ip_b, port, &root);
    dnat(&pods, &shop.vip, port);
    curl(&pods, &load_cg, &format!("http://{}/before", shop.vip));
    let (server, _) = call(&receiver, "/before");
    assert_eq!(res(&server, "k8s.pod.name"), "web-5d4f8b7c9-x7k2p");
    drop(web);
    drop(web_cg);
    let lists_before = pod_lists(&api);

    // Cut off, the web pod is replaced by one of another Deployment with
    // the same IP, the Service's endpoints move to it, etcd's history is
    // compacted and the API server restarts: the agent's watch cannot
    // resume (410 Gone) and must relist.
    gate.close();
    // No kubelet confirms a graceful deletion: delete at once, as it would.
    api.kubectl(&[
        "delete",
        "pod",
        "-n",
        "shop",
        "web-5d4f8b7c9-x7k2p",
        "--grace-period=0",
        "--force",
    ]);
    const NEW_CID: &str = "d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4";
    let new_uid = api.running_pod(&PodSpec {
        namespace: "shop",
        name: "api-6c8f7d9b5-q4w8e",
        node: NODE,
        ip: &pods.ip_b,
        owner: ("ReplicaSet", "api-6c8f7d9b5"),
        labels: json!({"app": "api", "pod-template-hash": "6c8f7d9b5"}),
        container: "server",
        container_id: NEW_CID,
    });
    api.kubectl(&["delete", "endpointslice", "-n", "shop", "web-abcde"]);
    api.create(&slice("web-fghij", &pods.ip_b, "api-6c8f7d9b5-q4w8e", port));
    api.compact_etcd();
    api.restart_apiserver();
    gate.open();

    let new_cg = PodCgroup::create(Driver::Systemd, &new_uid, NEW_CID);
    let _new = start_web(&pods, &new_cg, &pods.ip_b, port, &root);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    let (server, client) = loop {
        let path = format!("/after-{i}");
        curl(&pods, &load_cg, &format!("http://{}{path}", shop.vip));
        let (s, c) = call(&receiver, &path);
        if res(&s, "k8s.pod.name") == "api-6c8f7d9b5-q4w8e" {
            break (s, c);
        }
        assert!(
            Instant::now() < deadline,
            "the new pod never showed up in metadata: {:?}",
            api.requests_by(AGENT_USER)
        );
        i += 1;
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(res(&server, "k8s.deployment.name"), "api");
    assert_eq!(res(&server, "k8s.container.name"), "server");
    assert_eq!(res(&server, "k8s.pod.uid"), new_uid);
    assert_eq!(res(&client, "k8s.pod.name"), "loadgen-0");
    assert_eq!(
        client.attr("server.address").as_deref(),
        Some("web.shop.svc.cluster.local")
    );
    assert!(
        pod_lists(&api) > lists_before,
        "the agent relisted pods after its watch expired: {:?}",
        api.requests_by(AGENT_USER)
    );
}

#[test]
fn an_endpointslice_updated_in_place_names_the_service_for_its_new_endpoints_and_no_longer_for_removed_ones() {
    let _serial = serial();
    let pods = PodPair::new();
    let api = RealApi::start(&[NODE]);
    let kubeconfig = install_meshless(&api);
    let port = 8603;
    let shop = shop(&api, &pods, port);
    let receiver = Receiver::start(Transport::Grpc);
    let _agent = start_agent(&kubeconfig, &receiver);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, &shop.load_uid, LOAD_CID);
    let web_cg = PodCgroup::create(Driver::Systemd, &shop.web_uid, WEB_CID);
    let second = second_address(&pods);
    let root = docroot(&api);
    let _web = start_web(&pods, &web_cg, &pods.ip_b, port, &root);
    let _web2 = start_web(&pods, &web_cg, &second, port, &root);
    // A direct call to an address (no Service IP): the client span's
    // server.address is the Service whose EndpointSlice lists it, else the IP.
    let named = |ip: &str, path: &str| -> String {
        curl(&pods, &load_cg, &format!("http://{ip}:{port}{path}"));
        call(&receiver, path).1.attr("server.address").unwrap_or_default()
    };
    const FQDN: &str = "web.shop.svc.cluster.local";
    assert_eq!(named(&pods.ip_b, "/old-before"), FQDN);
    assert_eq!(named(&second, "/new-before"), second, "not an endpoint yet");

    let meta = || {
        api.kubectl(&[
            "get",
            "endpointslice",
            "-n",
            "shop",
            "web-abcde",
            "-o",
            "jsonpath={.metadata.uid} {.metadata.resourceVersion}",
        ])
    };
    let before = meta();
    // The same object, its endpoint replaced (one MODIFIED event), as the
    // EndpointSlice controller does when a pod's address changes.
    api.apply(&slice("web-abcde", &second, "web-5d4f8b7c9-x7k2p", port));
    let after = meta();
    let uid = |m: &str| m.split_whitespace().next().map(str::to_owned);
    assert_eq!(uid(&after), uid(&before), "updated in place, not recreated");
    assert_ne!(after, before, "the update changed the object");

    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        let got = named(&second, &format!("/new-after-{i}"));
        if got == FQDN {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new endpoint never named the Service (last: {got}): {:?}",
            api.requests_by(AGENT_USER)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Applied in the same update: the removed address is no longer claimed.
    assert_eq!(
        named(&pods.ip_b, "/old-after"),
        pods.ip_b,
        "a removed endpoint still names the Service"
    );
    let slice_lists = api
        .requests_by(AGENT_USER)
        .iter()
        .filter(|(verb, uri, _)| verb == "list" && uri.starts_with("/apis/discovery.k8s.io/v1/endpointslices"))
        .count();
    assert_eq!(slice_lists, 1, "followed by the watch, without a relist");
}

/// Pod lists the agent made (a relist after `410 Gone` adds one).
fn pod_lists(api: &RealApi) -> usize {
    api.requests_by(AGENT_USER)
        .iter()
        .filter(|(verb, uri, _)| verb == "list" && uri.starts_with("/api/v1/pods"))
        .count()
}
