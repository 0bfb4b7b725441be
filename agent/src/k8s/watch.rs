//! kube-rs watchers (list + watch with backoff) turned into index updates.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    cgroup,
    index::{Kind, Update},
    IstioLabels, PodMeta, ServiceMeta, SliceMeta, WorkloadKind,
};

/// Annotation that keeps a pod out of tracing when set to "false".
pub const OPT_OUT_ANNOTATION: &str = "meshless.io/trace";
/// Updates buffered between the watchers and the index.
const UPDATES: usize = 4096;

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the Kubernetes API ({0}); in a cluster, check the ServiceAccount and RBAC in deploy/; \
     elsewhere set KUBECONFIG, or run with --kubernetes off"
)]
pub struct K8sError(String);

/// Connects and starts the three watchers; updates arrive on the receiver.
pub async fn start(node: &str) -> Result<mpsc::Receiver<Update>, K8sError> {
    let client = Client::try_default().await.map_err(|e| K8sError(e.to_string()))?;
    let (tx, rx) = mpsc::channel(UPDATES);
    let pods: Api<Pod> = Api::all(client.clone());
    let node_pods = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    tokio::spawn(follow(pods, node_pods, Kind::Pods, tx.clone(), pod_update, |p| {
        Update::PodGone {
            uid: p.metadata.uid.clone().unwrap_or_default(),
        }
    }));
    let services: Api<Service> = Api::all(client.clone());
    tokio::spawn(follow(
        services,
        watcher::Config::default(),
        Kind::Services,
        tx.clone(),
        service_update,
        |s| Update::ServiceGone {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
        },
    ));
    let slices: Api<EndpointSlice> = Api::all(client);
    tokio::spawn(follow(
        slices,
        watcher::Config::default(),
        Kind::Slices,
        tx,
        slice_update,
        |s| Update::SliceGone {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
        },
    ));
    Ok(rx)
}

/// Runs one watcher forever: a full list becomes one `Replace`, then each
/// change one update. Errors are retried with kube's default backoff.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    tx: mpsc::Sender<Update>,
    applied: fn(K) -> Option<Update>,
    deleted: fn(&K) -> Update,
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut relist: Option<Vec<Update>> = None;
    let mut last_warning = std::time::Instant::now() - Duration::from_secs(60);
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                relist = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(buf), Some(u)) = (relist.as_mut(), applied(obj)) {
                    buf.push(u);
                }
                None
            }
            Ok(watcher::Event::InitDone) => {
                let items = relist.take().unwrap_or_default();
                info!(?kind, objects = items.len(), "kubernetes metadata listed");
                Some(Update::Replace(kind, items))
            }
            Ok(watcher::Event::Apply(obj)) => applied(obj),
            Ok(watcher::Event::Delete(obj)) => Some(deleted(&obj)),
            Err(error) => {
                // Keep the last known metadata; kube retries with backoff.
                if last_warning.elapsed() > Duration::from_secs(30) {
                    warn!(?kind, %error, "kubernetes watch failed; keeping last known metadata and retrying");
                    last_warning = std::time::Instant::now();
                }
                None
            }
        };
        if let Some(u) = update {
            if tx.send(u).await.is_err() {
                return;
            }
        }
    }
}

fn ips(raw: impl IntoIterator<Item = String>) -> Vec<IpAddr> {
    raw.into_iter().filter_map(|s| s.parse().ok()).collect()
}

/// The owning workload from ownerReferences, resolved by name conventions
/// (no extra API calls): a ReplicaSet named `<deployment>-<pod-template-hash>`
/// belongs to that Deployment; a Job named `<cronjob>-<minutes>` to a CronJob.
fn workload(pod: &Pod) -> Option<(WorkloadKind, String)> {
    let owner = pod.owner_references().iter().find(|o| o.controller == Some(true))?;
    let name = owner.name.clone();
    Some(match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.labels().get("pod-template-hash");
            match hash.and_then(|h| name.strip_suffix(&format!("-{h}"))) {
                Some(deployment) => (WorkloadKind::Deployment, deployment.to_owned()),
                None => (WorkloadKind::ReplicaSet, name),
            }
        }
        "StatefulSet" => (WorkloadKind::StatefulSet, name),
        "DaemonSet" => (WorkloadKind::DaemonSet, name),
        "Job" => match name.rsplit_once('-') {
            Some((cron, stamp)) if stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) => {
                (WorkloadKind::CronJob, cron.to_owned())
            }
            _ => (WorkloadKind::Job, name),
        },
        _ => return None,
    })
}

fn label(labels: &BTreeMap<String, String>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| labels.get(*k).cloned())
}

pub fn pod_update(pod: Pod) -> Option<Update> {
    let uid = pod.metadata.uid.clone()?;
    let status = pod.status.clone().unwrap_or_default();
    let mut addrs: Vec<String> = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip).collect();
    if let Some(ip) = status.pod_ip.clone() {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    let containers = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.init_container_statuses.unwrap_or_default())
        .filter_map(|c| Some((cgroup::status_container_id(c.container_id.as_deref()?)?, c.name)))
        .collect();
    Some(Update::Pod(PodMeta {
        uid,
        name: pod.name_any(),
        namespace: pod.namespace().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ips: ips(addrs),
        app_label: label(pod.labels(), &["app.kubernetes.io/name", "app"]),
        workload: workload(&pod),
        containers,
        opted_out: pod.annotations().get(OPT_OUT_ANNOTATION).is_some_and(|v| v == "false"),
        istio: IstioLabels::from_labels(pod.labels()),
    }))
}

pub fn service_update(svc: Service) -> Option<Update> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut raw = spec.cluster_ips.unwrap_or_default();
    if let Some(ip) = spec.cluster_ip {
        if !raw.contains(&ip) {
            raw.push(ip);
        }
    }
    Some(Update::Service(ServiceMeta {
        name: svc.name_any(),
        namespace: svc.namespace().unwrap_or_default(),
        cluster_ips: ips(raw),
    }))
}

pub fn slice_update(slice: EndpointSlice) -> Option<Update> {
    let service = slice.labels().get("kubernetes.io/service-name").cloned();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| {
            let pod = e
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
                .and_then(|t| t.name.clone());
            e.addresses
                .iter()
                .filter_map(move |a| Some((a.parse::<IpAddr>().ok()?, pod.clone())))
        })
        .collect();
    Some(Update::Slice(SliceMeta {
        name: slice.name_any(),
        namespace: slice.namespace().unwrap_or_default(),
        service,
        endpoints,
    }))
}
