//! Scale check against the real API server: 5,000 pods (most on other
//! nodes), 1,000 Services and 1,000 EndpointSlices. The agent must sync,
//! stay under its DaemonSet memory limit and load the API server with one
//! list and one watch per resource, not with polling. Prints the numbers
//! docs/kubernetes.md records (start-up time, RSS, requests).
mod support;

use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use serde_json::json;
use support::{kube_real::*, otlp::*, *};

const NODE: &str = "node-a";
const PODS: usize = 5_000;
const PODS_HERE: usize = 50;
const SERVICES: usize = 1_000;
const NAMESPACES: usize = 20;
/// The DaemonSet's memory limit (deploy/kubernetes/daemonset.yaml).
const LIMIT_KIB: u64 = 256 * 1024;

async fn client(kubeconfig: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

fn ip(i: usize) -> String {
    format!("10.244.{}.{}", i / 250, i % 250 + 1)
}

/// Loads the cluster with 16 requests in flight.
async fn load(client: Client) {
    let pods = stream::iter(0..PODS).map(|i| {
        let c = client.clone();
        async move {
            let ns = format!("scale-{}", i % NAMESPACES);
            let node = if i < PODS_HERE { NODE.to_owned() } else { format!("node-{}", i % 9) };
            let name = format!("app{}-5d4f8b7c9-p{i}", i % SERVICES);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns,
                    "labels": {"app.kubernetes.io/name": format!("app{}", i % SERVICES), "pod-template-hash": "5d4f8b7c9"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app{}-5d4f8b7c9", i % SERVICES),
                        "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example"}]}
            }))
            .expect("pod");
            let api: Api<Pod> = Api::namespaced(c, &ns);
            api.create(&PostParams::default(), &pod).await.expect("create pod");
            let status = json!({"status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}],
                "containerStatuses": [{"name": "app", "containerID": format!("containerd://{i:064x}"),
                    "image": "example", "imageID": "", "ready": true, "restartCount": 0}]}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .expect("pod status");
        }
    });
    pods.buffer_unordered(16).collect::<Vec<()>>().await;
    let services = stream::iter(0..SERVICES).map(|s| {
        let c = client.clone();
        async move {
            let ns = format!("scale-{}", s % NAMESPACES);
            let name = format!("app{s}");
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"selector": {"app.kubernetes.io/name": name}, "ports": [{"port": 80}]}
            }))
            .expect("service");
            Api::<Service>::namespaced(c.clone(), &ns)
                .create(&PostParams::default(), &svc)
                .await
                .expect("create service");
            // The pods of app<s>: every SERVICES-th pod.
            let endpoints: Vec<_> = (s..PODS)
                .step_by(SERVICES)
                .map(|i| {
                    json!({"addresses": [ip(i)], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": format!("app{s}-5d4f8b7c9-p{i}"), "namespace": ns}})
                })
                .collect();
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-abcde"), "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "endpoints": endpoints, "ports": [{"port": 8080}]
            }))
            .expect("slice");
            Api::<EndpointSlice>::namespaced(c, &ns)
                .create(&PostParams::default(), &slice)
                .await
                .expect("create slice");
        }
    });
    services.buffer_unordered(16).collect::<Vec<()>>().await;
}

#[test]
fn with_5000_pods_and_1000_services_the_agent_syncs_under_its_memory_limit_with_one_list_and_watch_each() {
    let _serial = serial();
    let nodes: Vec<String> = std::iter::once(NODE.to_owned())
        .chain((0..9).map(|n| format!("node-{n}")))
        .collect();
    let api = RealApi::start(&nodes.iter().map(String::as_str).collect::<Vec<_>>());
    api.kubectl(&["create", "namespace", "meshless"]);
    api.kubectl(&[
        "apply",
        "-k",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes"),
    ]);
    for n in 0..NAMESPACES {
        api.namespace(&format!("scale-{n}"));
    }
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async { load(client(&api.admin).await).await });
    println!(
        "scale: loaded {PODS} pods, {SERVICES} services and slices in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let token = api.token("meshless", "meshless");
    let kubeconfig = api.path("agent.kubeconfig");
    api.write_kubeconfig(&kubeconfig, &token, api.port);
    let receiver = Receiver::start(Transport::Grpc);
    let started = Instant::now();
    let agent = Agent::start_env(
        &["--otlp-endpoint", &receiver.endpoint(), "--traces-exporter", "otlp"],
        &[("NODE_NAME", NODE), ("KUBECONFIG", &kubeconfig.display().to_string())],
    );
    let addr = agent.metrics_addr.clone().expect("admin server");
    while http_get(&addr, "/readyz").trim() != "ready" {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "agent never synced: {:?}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready = started.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    let rss = agent.rss_kib();
    let requests = api.requests_by("system:serviceaccount:meshless:meshless");
    let count = |verb: &str| requests.iter().filter(|(v, _, _)| v == verb).count();
    println!(
        "scale: agent ready {:.2} s after start, RSS {} MiB after sync; API requests: {} list, {} watch, {} other",
        ready.as_secs_f64(),
        rss / 1024,
        count("list"),
        count("watch"),
        requests.len() - count("list") - count("watch")
    );
    assert!(rss > 0 && rss < LIMIT_KIB, "RSS {rss} KiB over the DaemonSet limit");
    // One list per resource, paged by 500 (kube-rs's default page size).
    assert!(
        (3..=3 + 2 * SERVICES.div_ceil(500)).contains(&count("list")),
        "one (paged) list per resource: {requests:?}"
    );
    assert!(
        (3..=6).contains(&count("watch")),
        "a watch per resource, no polling: {requests:?}"
    );
}
