//! An in-process fake Kubernetes API server speaking the real list/watch
//! protocol for pods, services and endpointslices: resourceVersions, watch
//! event streams, bookmarks, `fieldSelector=spec.nodeName=…`, and `410 Gone`
//! for resource versions that were compacted away (forcing a relist). It can
//! be stopped and restarted on the same port.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pods,
    Services,
    Slices,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Pods => "PodList",
            Kind::Services => "ServiceList",
            Kind::Slices => "EndpointSliceList",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::Slices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Services => "Service",
            Kind::Slices => "EndpointSlice",
        }
    }
}

#[derive(Default)]
struct World {
    rv: u64,
    objects: HashMap<Kind, BTreeMap<String, Value>>,
    /// (resourceVersion, kind, event type, object)
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from resource versions at or below this get 410 Gone.
    compacted: u64,
    /// Requests served, by "list"/"watch" and kind.
    requests: Vec<String>,
}

#[derive(Clone)]
struct Shared {
    world: Arc<Mutex<World>>,
    changed: broadcast::Sender<()>,
    /// Ends every open watch (as an API server restart would).
    cut: broadcast::Sender<()>,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<String>,
    timeout_seconds: Option<u64>,
}

fn node_matches(obj: &Value, selector: &Option<String>) -> bool {
    match selector.as_deref().and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(node) => obj["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

async fn handle(kind: Kind, shared: Shared, p: Params) -> Response {
    let watching = matches!(p.watch.as_deref(), Some("true" | "1"));
    if !watching {
        let mut w = shared.world.lock().expect("world");
        w.requests.push(format!("list {kind:?}"));
        let items: Vec<Value> = w
            .objects
            .get(&kind)
            .map(|m| {
                m.values()
                    .filter(|o| node_matches(o, &p.field_selector))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let body = json!({
            "apiVersion": kind.api_version(),
            "kind": kind.list_kind(),
            "metadata": { "resourceVersion": w.rv.to_string() },
            "items": items,
        });
        return (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response();
    }
    let from: u64 = p.resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = matches!(p.allow_watch_bookmarks.as_deref(), Some("true" | "1"));
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(290));
    {
        let mut w = shared.world.lock().expect("world");
        w.requests.push(format!("watch {kind:?} from {from}"));
        if from <= w.compacted {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", w.compacted),
                "reason": "Expired", "code": 410 }});
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                format!("{gone}\n"),
            )
                .into_response();
        }
    }
    let mut changed = shared.changed.subscribe();
    let mut cut = shared.cut.subscribe();
    let world = shared.world.clone();
    let selector = p.field_selector.clone();
    let stream = async_stream(move |tx: tokio::sync::mpsc::Sender<Bytes>| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        loop {
            let (lines, latest) = {
                let w = world.lock().expect("world");
                let lines: Vec<String> = w
                    .events
                    .iter()
                    .filter(|(rv, k, _, o)| *rv > sent && *k == kind && node_matches(o, &selector))
                    .map(|(_, _, t, o)| json!({"type": t, "object": o}).to_string() + "\n")
                    .collect();
                (lines, w.rv)
            };
            for line in lines {
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            sent = latest;
            tokio::select! {
                _ = changed.recv() => {}
                _ = cut.recv() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if bookmarks {
                        let b = json!({"type": "BOOKMARK", "object": {
                            "kind": kind.kind(), "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": sent.to_string()}}});
                        if tx.send(Bytes::from(b.to_string() + "\n")).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// A byte stream fed by a producer task.
fn async_stream<F, Fut>(produce: F) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) })
}

pub struct FakeApi {
    pub addr: SocketAddr,
    shared: Shared,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = runtime.block_on(async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
                .local_addr()
                .expect("addr")
        });
        let shared = Shared {
            world: Arc::default(),
            changed: broadcast::channel(1024).0,
            cut: broadcast::channel(16).0,
        };
        shared.world.lock().expect("world").rv = 100;
        let mut api = FakeApi {
            addr,
            shared,
            runtime,
            stop: None,
        };
        api.resume();
        api
    }

    /// Stops serving and ends every open watch (the data is kept).
    pub fn stop(&mut self) {
        let _ = self.shared.cut.send(());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Serves again on the same port.
    pub fn resume(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        let addr = self.addr;
        let listener = super::rebind(&self.runtime, addr);
        let route = |kind: Kind| {
            get(move |State(s): State<Shared>, Query(p): Query<Params>| async move { handle(kind, s, p).await })
        };
        let app = Router::new()
            .route("/api/v1/pods", route(Kind::Pods))
            .route("/api/v1/services", route(Kind::Services))
            .route("/apis/discovery.k8s.io/v1/endpointslices", route(Kind::Slices))
            .with_state(self.shared.clone());
        self.runtime.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
    }

    /// Writes a kubeconfig pointing a kube client at this server.
    pub fn kubeconfig(&self, path: &Path) {
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(path, cfg).expect("write kubeconfig");
    }

    fn key(obj: &Value) -> String {
        format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap_or("")
        )
    }

    /// Creates or replaces an object (ADDED / MODIFIED event).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        {
            let mut w = self.shared.world.lock().expect("world");
            w.rv += 1;
            let rv = w.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = Self::key(&obj);
            let existed = w.objects.entry(kind).or_default().insert(key, obj.clone()).is_some();
            w.events
                .push((rv, kind, if existed { "MODIFIED" } else { "ADDED" }, obj));
        }
        let _ = self.shared.changed.send(());
    }

    /// Deletes an object (DELETED event).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        {
            let mut w = self.shared.world.lock().expect("world");
            let key = format!("{namespace}/{name}");
            if let Some(mut obj) = w.objects.entry(kind).or_default().remove(&key) {
                w.rv += 1;
                let rv = w.rv;
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                w.events.push((rv, kind, "DELETED", obj));
            }
        }
        let _ = self.shared.changed.send(());
    }

    /// Forgets the event history: watches resuming from an older version
    /// get `410 Gone` and must relist. Open watches are cut.
    pub fn compact(&self) {
        {
            let mut w = self.shared.world.lock().expect("world");
            w.compacted = w.rv;
            w.events.clear();
        }
        let _ = self.shared.cut.send(());
    }

    pub fn requests(&self) -> Vec<String> {
        self.shared.world.lock().expect("world").requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.shared.cut.send(());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A pod object as the API server would return it.
#[allow(clippy::too_many_arguments)]
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    ip: &str,
    owner: (&str, &str),
    labels: Value,
    container: (&str, &str),
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid, "labels": labels,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": owner.0, "name": owner.1, "uid": "00000000-0000-0000-0000-000000000001", "controller": true}],
            "managedFields": [{"manager": "kubelet", "operation": "Update"}]
        },
        "spec": {"nodeName": node, "containers": [{"name": container.0, "image": "example"}]},
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "containerStatuses": [{"name": container.0, "containerID": format!("containerd://{}", container.1),
                "image": "example", "imageID": "", "ready": true, "restartCount": 0}]
        }
    })
}

pub fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("svc-{name}")},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"port": 80}]}
    })
}

pub fn slice(namespace: &str, service: &str, ip: &str, pod: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace}}],
        "ports": [{"port": 80}]
    })
}
