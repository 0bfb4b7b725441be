//! Stage 4 (optional): Kubernetes metadata for every span.
//!
//! Watchers (kube-rs, list + watch, never polling) stream pods on this node,
//! services and endpointslices into [`index::Index`], owned by the export
//! router. A traced process is mapped to its pod and container through its
//! cgroup (`/proc/<pid>/cgroup`, kubelet's layouts in [`cgroup`]); a peer IP
//! to a pod or service through pod IPs, endpointslices and cluster IPs.
//! If the API server is unreachable the last known metadata stays in use
//! and the watchers reconnect with backoff; the data path never waits.
pub mod cgroup;
pub mod index;
pub mod quiet;
pub mod watch;

use std::{net::IpAddr, sync::Arc};

/// The controller that owns a pod, as far as names tell without API calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    /// The resource attribute naming a workload of this kind.
    pub fn attribute(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::ReplicaSet => "k8s.replicaset.name",
            WorkloadKind::StatefulSet => "k8s.statefulset.name",
            WorkloadKind::DaemonSet => "k8s.daemonset.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
        }
    }
}

/// What we keep of a pod (managed fields, spec and most of status dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// `app.kubernetes.io/name`, else `app` label.
    pub app_label: Option<String>,
    pub workload: Option<(WorkloadKind, String)>,
    /// (container id, container name) from the pod status.
    pub containers: Vec<(String, String)>,
    /// Annotated `meshless.io/trace: "false"`.
    pub opted_out: bool,
    /// The labels Istio's metrics are named by (boxed: rarely read, and
    /// it keeps watcher updates small).
    pub istio: Box<IstioLabels>,
}

/// What Istio's standard metric labels take from a pod's labels.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IstioLabels {
    /// `app`, else `app.kubernetes.io/name` (`*_app`).
    pub app: Option<String>,
    /// `version`, else `app.kubernetes.io/version` (`*_version`).
    pub version: Option<String>,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`.
    pub canonical_service: Option<String>,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`.
    pub canonical_revision: Option<String>,
}

impl IstioLabels {
    pub fn from_labels(labels: &std::collections::BTreeMap<String, String>) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
        IstioLabels {
            app: first(&["app", "app.kubernetes.io/name"]),
            version: first(&["version", "app.kubernetes.io/version"]),
            canonical_service: first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ]),
        }
    }
}

impl PodMeta {
    /// `service.name`: the app label, else the workload, else the pod name.
    pub fn service_name(&self) -> String {
        self.app_label
            .clone()
            .or_else(|| self.workload.as_ref().map(|(_, n)| n.clone()))
            .unwrap_or_else(|| self.name.clone())
    }

    /// The workload name as Istio labels use it.
    pub fn workload_name(&self) -> String {
        self.workload
            .as_ref()
            .map_or_else(|| self.name.clone(), |(_, n)| n.clone())
    }

    /// Istio's canonical service: the label, else the workload name.
    pub fn canonical_service(&self) -> String {
        self.istio
            .canonical_service
            .clone()
            .unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision: the label, else `latest`.
    pub fn canonical_revision(&self) -> String {
        self.istio
            .canonical_revision
            .clone()
            .unwrap_or_else(|| "latest".to_owned())
    }

    pub fn container_name(&self, container_id: Option<&str>) -> Option<&str> {
        let id = container_id?;
        self.containers
            .iter()
            .find(|(cid, _)| cid == id)
            .map(|(_, n)| n.as_str())
    }
}

/// A service (cluster IPs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceMeta {
    pub name: String,
    pub namespace: String,
    pub cluster_ips: Vec<IpAddr>,
}

/// One endpointslice: the service it belongs to and its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceMeta {
    pub name: String,
    pub namespace: String,
    pub service: Option<String>,
    /// (address, target pod name).
    pub endpoints: Vec<(IpAddr, Option<String>)>,
}

/// What a span learned about its own side. Every field is shared with the
/// index's caches (see [`index::Index`]): putting it on a span allocates
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanK8s {
    pub pod: Arc<PodMeta>,
    pub container: Option<Arc<str>>,
    /// The service this pod serves behind, for server spans.
    pub service_fqdn: Option<Arc<str>>,
}

/// What is known about the other end of a span (built once per address
/// and shared by the spans, see [`index::Index`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerK8s {
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub pod: Option<String>,
    /// `<service>.<namespace>.svc.cluster.local` when the peer is behind a service.
    pub service_fqdn: Option<Arc<str>>,
    /// Istio's labels of the peer pod, when it runs on this node.
    pub istio: Option<IstioLabels>,
}

/// The cluster-local DNS name of a service.
pub fn fqdn(service: &str, namespace: &str) -> String {
    format!("{service}.{namespace}.svc.cluster.local")
}

/// (service, namespace) of a name made by [`fqdn`].
pub fn split_fqdn(fqdn: &str) -> Option<(&str, &str)> {
    fqdn.strip_suffix(".svc.cluster.local")?.split_once('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn istio_names_come_from_istio_labels_first_then_the_recommended_labels() {
        let l = IstioLabels::from_labels(&labels(&[
            ("app.kubernetes.io/name", "web"),
            ("app.kubernetes.io/version", "v2"),
            ("service.istio.io/canonical-name", "storefront"),
        ]));
        assert_eq!(l.canonical_service.as_deref(), Some("storefront"));
        assert_eq!(l.canonical_revision.as_deref(), Some("v2"));
        assert_eq!(l.app.as_deref(), Some("web"));
        assert_eq!(l.version.as_deref(), Some("v2"));
    }

    #[test]
    fn without_labels_the_canonical_service_is_the_workload_and_the_revision_latest() {
        let pod = PodMeta {
            uid: "u".into(),
            name: "web-5d4f8b7c9-x7k2p".into(),
            namespace: "shop".into(),
            node: "n".into(),
            ips: vec![],
            app_label: None,
            workload: Some((WorkloadKind::Deployment, "web".into())),
            containers: vec![],
            opted_out: false,
            istio: Box::default(),
        };
        assert_eq!(pod.canonical_service(), "web");
        assert_eq!(pod.canonical_revision(), "latest");
        assert_eq!(split_fqdn(&fqdn("web", "shop")), Some(("web", "shop")));
    }
}
