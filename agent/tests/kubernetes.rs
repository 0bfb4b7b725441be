//! Kubernetes metadata on the real kernel: simulated pods (a network
//! namespace with its own IP and a cgroup named as kubelet names it, with a
//! real process inside) and an in-process fake API server speaking list/watch.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{fake_k8s::*, otlp::*, *};

const NODE: &str = "node-a";
const WEB_UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const WEB_CID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const LOAD_UID: &str = "6fa459ea-ee8a-3ca4-894e-db77e160355e";
const LOAD_CID: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

struct Cluster {
    api: FakeApi,
    _scratch: Scratch,
    kubeconfig: String,
}

fn cluster(pods: &PodPair) -> Cluster {
    let api = FakeApi::start();
    let scratch = Scratch::new("k8s");
    let kubeconfig = scratch.0.join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "web-5d4f8b7c9-x7k2p",
            WEB_UID,
            NODE,
            &pods.ip_b,
            ("ReplicaSet", "web-5d4f8b7c9"),
            json!({"app.kubernetes.io/name": "web", "pod-template-hash": "5d4f8b7c9"}),
            ("app", WEB_CID),
        ),
    );
    api.apply(
        Kind::Pods,
        pod(
            "tools",
            "loadgen-0",
            LOAD_UID,
            NODE,
            &pods.ip_a,
            ("StatefulSet", "loadgen"),
            json!({}),
            ("curl", LOAD_CID),
        ),
    );
    // A pod on another node: must not be listed by this node's agent.
    api.apply(
        Kind::Pods,
        pod(
            "shop",
            "web-5d4f8b7c9-other",
            "9c1185a5-c5e9-4f3a-bc1d-0e8f2e7f6a11",
            "node-b",
            "10.99.0.9",
            ("ReplicaSet", "web-5d4f8b7c9"),
            json!({"pod-template-hash": "5d4f8b7c9"}),
            ("app", WEB_CID),
        ),
    );
    api.apply(Kind::Services, service("shop", "web", "10.96.0.80"));
    api.apply(Kind::Slices, slice("shop", "web", &pods.ip_b, "web-5d4f8b7c9-x7k2p"));
    Cluster {
        api,
        kubeconfig: kubeconfig.display().to_string(),
        _scratch: scratch,
    }
}

fn agent(c: &Cluster, receiver: &Receiver) -> Agent {
    Agent::start_env(
        &["--otlp-endpoint", &receiver.endpoint(), "--traces-exporter", "otlp"],
        &[("NODE_NAME", NODE), ("KUBECONFIG", &c.kubeconfig)],
    )
}

fn wait_ready(agent: &Agent) {
    let addr = agent.metrics_addr.clone().expect("admin server");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&addr, "/readyz").trim() != "ready" {
        assert!(
            Instant::now() < deadline,
            "agent never became ready (caches not synced)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_web(pods: &PodPair, cg: &PodCgroup, port: u16) -> Proc {
    let p = spawn(cg.cmd_in(
        &pods.b,
        "python3",
        &["-m", "http.server", &port.to_string(), "--bind", &pods.ip_b],
    ));
    wait_port(&pods.a, &pods.ip_b, port);
    p
}

fn curl_from(pods: &PodPair, cg: &PodCgroup, url: &str) {
    let out = cg
        .cmd_in(&pods.a, "curl", &["-s", "-o", "/dev/null", url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn on_path(path: &'static str) -> impl Fn(&Received) -> bool {
    move |s| s.attr("url.path").as_deref() == Some(path)
}

#[test]
fn a_two_pod_call_carries_pod_workload_namespace_and_container_on_both_spans() {
    let _serial = serial();
    let pods = PodPair::new();
    let c = cluster(&pods);
    let receiver = Receiver::start(Transport::Grpc);
    let agent = agent(&c, &receiver);
    wait_ready(&agent);
    let web_cg = PodCgroup::create(Driver::Systemd, WEB_UID, WEB_CID);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, LOAD_UID, LOAD_CID);
    let port = 8501;
    let _web = start_web(&pods, &web_cg, port);
    curl_from(&pods, &load_cg, &format!("http://{}:{port}/k8s-call", pods.ip_b));

    let spans = receiver.wait_spans(on_path("/k8s-call"), 2, Duration::from_secs(15));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans.iter().find(|s| s.span.kind == 2).expect("server span");
    let client = spans.iter().find(|s| s.span.kind == 3).expect("client span");
    let r = |s: &Received, k: &str| s.resource.get(k).cloned().unwrap_or_default();
    assert_eq!(r(server, "k8s.pod.name"), "web-5d4f8b7c9-x7k2p");
    assert_eq!(r(server, "k8s.pod.uid"), WEB_UID);
    assert_eq!(r(server, "k8s.namespace.name"), "shop");
    assert_eq!(r(server, "k8s.deployment.name"), "web");
    assert_eq!(r(server, "k8s.container.name"), "app");
    assert_eq!(r(server, "k8s.node.name"), NODE);
    assert_eq!(r(server, "service.name"), "web");
    assert_eq!(r(server, "service.namespace"), "shop");
    assert_eq!(r(client, "k8s.pod.name"), "loadgen-0");
    assert_eq!(r(client, "k8s.statefulset.name"), "loadgen");
    assert_eq!(r(client, "k8s.container.name"), "curl");
    assert_eq!(r(client, "service.name"), "loadgen");
    assert_eq!(
        client.attr("server.address").as_deref(),
        Some("web.shop.svc.cluster.local")
    );
    assert_eq!(server.parent_span_id(), client.span_id());

    // Istio-compatible series carry workloads and namespaces from the cluster.
    let m = scrape(&agent);
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "loadgen"),
        ("source_workload_namespace", "tools"),
        ("destination_workload", "web"),
        ("destination_workload_namespace", "shop"),
        ("destination_service", "web.shop.svc.cluster.local"),
    ];
    assert_eq!(metric_sum(&m, "istio_requests_total", &labels), 1.0);
    let requests = c.api.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("watch Pods")),
        "watches, not polling: {requests:?}"
    );
}

#[test]
fn pods_come_and_go_ips_are_reused_and_metadata_survives_an_api_outage() {
    let _serial = serial();
    let pods = PodPair::new();
    let mut c = cluster(&pods);
    let receiver = Receiver::start(Transport::Grpc);
    let agent = agent(&c, &receiver);
    wait_ready(&agent);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, LOAD_UID, LOAD_CID);
    let port = 8502;

    // The API server goes away: the last known metadata keeps being used.
    c.api.stop();
    let web_cg = PodCgroup::create(Driver::Systemd, WEB_UID, WEB_CID);
    let web = start_web(&pods, &web_cg, port);
    curl_from(&pods, &load_cg, &format!("http://{}:{port}/during-outage", pods.ip_b));
    let spans = receiver.wait_spans(on_path("/during-outage"), 2, Duration::from_secs(15));
    let server = spans.iter().find(|s| s.span.kind == 2).expect("server span");
    assert_eq!(
        server.resource.get("k8s.pod.name").map(String::as_str),
        Some("web-5d4f8b7c9-x7k2p")
    );
    drop(web);
    drop(web_cg);

    // While it is down the web pod is replaced by a new one with the same IP;
    // the history is compacted, so the watch must relist (410 Gone).
    const NEW_UID: &str = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    const NEW_CID: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    c.api.delete(Kind::Pods, "shop", "web-5d4f8b7c9-x7k2p");
    c.api.apply(
        Kind::Pods,
        pod(
            "shop",
            "api-6c8f7d9b5-q4w8e",
            NEW_UID,
            NODE,
            &pods.ip_b,
            ("ReplicaSet", "api-6c8f7d9b5"),
            json!({"app": "api", "pod-template-hash": "6c8f7d9b5"}),
            ("server", NEW_CID),
        ),
    );
    c.api.compact();
    c.api.resume();
    let new_cg = PodCgroup::create(Driver::Systemd, NEW_UID, NEW_CID);
    let _new = start_web(&pods, &new_cg, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    let (server, client) = loop {
        let path = format!("/after-{i}");
        curl_from(&pods, &load_cg, &format!("http://{}:{port}{path}", pods.ip_b));
        let got = receiver.wait_spans(
            |s| s.attr("url.path").as_deref() == Some(path.as_str()),
            2,
            Duration::from_secs(5),
        );
        let server = got.iter().find(|s| s.span.kind == 2).cloned();
        let client = got.iter().find(|s| s.span.kind == 3).cloned();
        if let (Some(s), Some(cl)) = (server, client) {
            if s.resource.get("k8s.pod.name").map(String::as_str) == Some("api-6c8f7d9b5-q4w8e") {
                break (s, cl);
            }
        }
        assert!(Instant::now() < deadline, "the new pod never showed up in metadata");
        i += 1;
    };
    assert_eq!(
        server.resource.get("k8s.deployment.name").map(String::as_str),
        Some("api")
    );
    assert_eq!(server.resource.get("service.name").map(String::as_str), Some("api"));
    assert_eq!(
        client.resource.get("k8s.pod.name").map(String::as_str),
        Some("loadgen-0")
    );
    let relisted = c.api.requests().iter().filter(|r| r.as_str() == "list Pods").count();
    assert!(relisted >= 2, "410 Gone forced a relist: {:?}", c.api.requests());
}

/// The kernel's count of trace options written, as the agent last read it.
fn options_written(agent: &Agent) -> f64 {
    // Kernel counters are copied every 2 s.
    std::thread::sleep(Duration::from_millis(2500));
    metric_sum(&scrape(agent), "meshless_trace_opt_written_total", &[])
}

#[test]
fn a_pod_that_opted_out_sends_no_trace_option_while_a_traced_pod_does() {
    let _serial = serial();
    let pods = PodPair::new();
    let c = cluster(&pods);
    const QUIET_UID: &str = "3c1e9d2a-6b7f-4e0c-9a55-2f8d0c1b7e44";
    const QUIET_CID: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
    let mut quiet = pod(
        "tools",
        "quiet-0",
        QUIET_UID,
        NODE,
        &pods.ip_a,
        ("StatefulSet", "quiet"),
        json!({}),
        ("curl", QUIET_CID),
    );
    quiet["metadata"]["annotations"] = json!({"meshless.io/trace": "false"});
    c.api.apply(Kind::Pods, quiet);
    // The kubepods trees exist before the agent starts, as on a node.
    let web_cg = PodCgroup::create(Driver::Systemd, WEB_UID, WEB_CID);
    let quiet_cg = PodCgroup::create(Driver::Cgroupfs, QUIET_UID, QUIET_CID);
    let load_cg = PodCgroup::create(Driver::Cgroupfs, LOAD_UID, LOAD_CID);
    let receiver = Receiver::start(Transport::Grpc);
    let agent = agent(&c, &receiver);
    wait_ready(&agent);
    let port = 8503;
    let _web = start_web(&pods, &web_cg, port);

    // Each curl is a fresh process the agent has not classified yet: the
    // pod's cgroup keeps even its first request free of the option. (The
    // counter is machine-wide; nothing else on the machine sends options
    // to a non-loopback peer during the test.)
    let mut windows = Vec::new();
    let mut after_quiet = 0.0;
    for attempt in 1..=3 {
        let before = options_written(&agent);
        curl_from(&pods, &quiet_cg, &format!("http://{}:{port}/from-quiet", pods.ip_b));
        let spans = receiver.wait_spans(on_path("/from-quiet"), attempt, Duration::from_secs(15));
        assert!(
            spans.iter().all(|s| s.span.kind == 2),
            "the opted-out pod's client span is not exported: {spans:#?}"
        );
        assert!(
            spans.iter().all(|s| s.span.parent_span_id.is_empty()),
            "the server span names no parent: the opted-out client's span is never exported: {spans:#?}"
        );
        after_quiet = options_written(&agent);
        windows.push((before, after_quiet));
    }
    assert!(
        windows.iter().all(|(b, a)| a == b),
        "a fresh process of the opted-out pod sent a trace option (options written before, after each curl): {windows:?}"
    );

    curl_from(&pods, &load_cg, &format!("http://{}:{port}/from-traced", pods.ip_b));
    receiver.wait_spans(on_path("/from-traced"), 2, Duration::from_secs(15));
    let after_traced = options_written(&agent);
    assert!(
        after_traced > after_quiet,
        "a traced pod's request carries the option ({after_quiet} → {after_traced})"
    );
}
