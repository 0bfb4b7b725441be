//! The metadata index, owned by one stage and fed by watcher updates.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use foldhash::HashMap;
use tokio::sync::mpsc;

use super::{cgroup, quiet::QuietPods, PeerK8s, PodMeta, ServiceMeta, SliceMeta, SpanK8s};

mod enrich;

/// Which resource a watcher follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Pods,
    Services,
    Slices,
}

/// A change from a watcher.
#[derive(Debug, Clone)]
pub enum Update {
    Pod(PodMeta),
    PodGone {
        uid: String,
    },
    Service(ServiceMeta),
    ServiceGone {
        namespace: String,
        name: String,
    },
    Slice(SliceMeta),
    SliceGone {
        namespace: String,
        name: String,
    },
    /// A full (re)list: these are all the objects of `kind` now.
    Replace(Kind, Vec<Update>),
}

/// Which namespaces are traced.
#[derive(Debug, Clone, Default)]
pub struct NamespaceFilter {
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

impl NamespaceFilter {
    pub fn allows(&self, ns: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|n| n == ns)) && !self.exclude.iter().any(|n| n == ns)
    }
}

/// Decision for one span.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// The pod opted out or its namespace is not traced.
    Drop,
}

/// Entries each [`Shared`] cache keeps at most; it starts over past it.
const MAX_SHARED: usize = 4096;

/// See [`Index::shared`].
#[derive(Default)]
struct Shared {
    own: HashMap<u64, Option<SpanK8s>>,
    peers: HashMap<(IpAddr, Option<IpAddr>), Option<Arc<PeerK8s>>>,
}

impl Shared {
    fn clear(&mut self) {
        self.own.clear();
        self.peers.clear();
    }
}

pub struct Index {
    updates: mpsc::Receiver<Update>,
    pods: HashMap<String, Arc<PodMeta>>,
    pod_by_ip: HashMap<IpAddr, String>,
    services: HashMap<(String, String), ServiceMeta>,
    service_by_ip: HashMap<IpAddr, (String, String)>,
    slices: HashMap<(String, String), SliceMeta>,
    /// Endpoint address → (namespace, service, target pod name).
    endpoint_by_ip: HashMap<IpAddr, (String, Option<String>, Option<String>)>,
    /// cgroup id → pod UID and container id (None: not in a pod).
    cgroups: HashMap<u64, Option<cgroup::PodCgroup>>,
    /// What spans are given, built on first use and shared by `Arc` until
    /// the metadata changes (any update empties them): the pod and
    /// container of a cgroup, and what is known about a peer address (and
    /// the pod a Service IP was DNATed to). A span then costs no copy of
    /// the names; each cache is bounded by [`MAX_SHARED`].
    shared: Shared,
    synced: HashSet<Kind>,
    filter: NamespaceFilter,
    cgroup_root: Option<std::path::PathBuf>,
    last_scan: Option<std::time::Instant>,
    quiet: QuietPods,
}

impl Index {
    /// `quiet` is kept up to date with the pods this node must not trace.
    pub fn new(updates: mpsc::Receiver<Update>, filter: NamespaceFilter, quiet: QuietPods) -> Self {
        Self {
            updates,
            pods: HashMap::default(),
            pod_by_ip: HashMap::default(),
            services: HashMap::default(),
            service_by_ip: HashMap::default(),
            slices: HashMap::default(),
            endpoint_by_ip: HashMap::default(),
            cgroups: HashMap::default(),
            shared: Shared::default(),
            synced: HashSet::new(),
            filter,
            cgroup_root: cgroup::cgroup2_root(),
            last_scan: None,
            quiet,
        }
    }

    /// Takes `cgroup_id` to be a container of the pod `pod_uid` without
    /// reading `/proc` (the replay benchmark: a recording's processes
    /// are gone).
    #[doc(hidden)]
    pub fn assume_cgroup(&mut self, cgroup_id: u64, pod_uid: &str, container_id: Option<&str>) {
        let cg = cgroup::PodCgroup {
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.map(str::to_owned),
        };
        self.cgroups.insert(cgroup_id, Some(cg));
        self.shared.own.remove(&cgroup_id);
    }

    /// True once every watcher delivered its first full list.
    pub fn synced(&self) -> bool {
        self.synced.len() == 3
    }

    /// Applies every pending update (never waits).
    pub fn refresh(&mut self) {
        while let Ok(update) = self.updates.try_recv() {
            self.apply(update);
        }
    }

    pub fn apply(&mut self, update: Update) {
        self.shared.clear();
        match update {
            Update::Pod(p) => self.put_pod(p),
            Update::PodGone { uid } => self.remove_pod(&uid),
            Update::Service(s) => self.put_service(s),
            Update::ServiceGone { namespace, name } => self.remove_service(&(namespace, name)),
            Update::Slice(s) => self.put_slice(s),
            Update::SliceGone { namespace, name } => self.remove_slice(&(namespace, name)),
            Update::Replace(kind, items) => {
                match kind {
                    Kind::Pods => {
                        self.quiet.clear();
                        self.pods.clear();
                        self.pod_by_ip.clear();
                    }
                    Kind::Services => {
                        self.services.clear();
                        self.service_by_ip.clear();
                    }
                    Kind::Slices => {
                        self.slices.clear();
                        self.endpoint_by_ip.clear();
                    }
                }
                items.into_iter().for_each(|u| self.apply(u));
                self.synced.insert(kind);
            }
        }
    }

    fn put_pod(&mut self, p: PodMeta) {
        if let Some(old) = self.pods.get(&p.uid).cloned() {
            self.unindex_pod(&old);
        }
        for ip in &p.ips {
            // A reused IP now belongs to the newest pod that claims it.
            self.pod_by_ip.insert(*ip, p.uid.clone());
        }
        self.quiet.set(&p.uid, p.opted_out || !self.filter.allows(&p.namespace));
        self.pods.insert(p.uid.clone(), Arc::new(p));
    }

    fn unindex_pod(&mut self, p: &PodMeta) {
        for ip in &p.ips {
            if self.pod_by_ip.get(ip) == Some(&p.uid) {
                self.pod_by_ip.remove(ip);
            }
        }
    }

    fn remove_pod(&mut self, uid: &str) {
        self.quiet.set(uid, false);
        if let Some(p) = self.pods.remove(uid) {
            self.unindex_pod(&p);
        }
    }

    fn put_service(&mut self, s: ServiceMeta) {
        let key = (s.namespace.clone(), s.name.clone());
        self.remove_service(&key);
        for ip in &s.cluster_ips {
            self.service_by_ip.insert(*ip, key.clone());
        }
        self.services.insert(key, s);
    }

    fn remove_service(&mut self, key: &(String, String)) {
        if let Some(s) = self.services.remove(key) {
            for ip in &s.cluster_ips {
                if self.service_by_ip.get(ip) == Some(key) {
                    self.service_by_ip.remove(ip);
                }
            }
        }
    }

    fn put_slice(&mut self, s: SliceMeta) {
        let key = (s.namespace.clone(), s.name.clone());
        self.remove_slice(&key);
        for (ip, pod) in &s.endpoints {
            self.endpoint_by_ip
                .insert(*ip, (s.namespace.clone(), s.service.clone(), pod.clone()));
        }
        self.slices.insert(key, s);
    }

    fn remove_slice(&mut self, key: &(String, String)) {
        if let Some(s) = self.slices.remove(key) {
            for (ip, _) in &s.endpoints {
                if self
                    .endpoint_by_ip
                    .get(ip)
                    .is_some_and(|(ns, svc, _)| *ns == s.namespace && *svc == s.service)
                {
                    self.endpoint_by_ip.remove(ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn pod(uid: &str, name: &str, ip: &str) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            name: name.into(),
            namespace: "shop".into(),
            node: "n1".into(),
            ips: vec![ip.parse().expect("ip")],
            app_label: None,
            workload: Some((super::super::WorkloadKind::Deployment, "web".into())),
            containers: vec![],
            opted_out: false,
            istio: Default::default(),
        }
    }

    pub(super) fn index() -> Index {
        let (_tx, rx) = mpsc::channel(1);
        Index::new(rx, NamespaceFilter::default(), QuietPods::default())
    }

    #[test]
    fn a_reused_ip_belongs_to_the_new_pod_even_when_the_old_one_goes_later() {
        let mut ix = index();
        ix.apply(Update::Pod(pod("u1", "web-a", "10.0.0.5")));
        ix.apply(Update::Pod(pod("u2", "web-b", "10.0.0.5")));
        ix.apply(Update::PodGone { uid: "u1".into() });
        let peer = ix.peer("10.0.0.5".parse().expect("ip")).expect("known");
        assert_eq!(peer.pod.as_deref(), Some("web-b"));
    }

    #[test]
    fn a_relist_replaces_everything_of_its_kind_and_marks_it_synced() {
        let mut ix = index();
        ix.apply(Update::Pod(pod("u1", "web-a", "10.0.0.5")));
        ix.apply(Update::Replace(
            Kind::Pods,
            vec![Update::Pod(pod("u3", "web-c", "10.0.0.7"))],
        ));
        assert!(ix.peer("10.0.0.5".parse().expect("ip")).is_none());
        assert!(ix.peer("10.0.0.7".parse().expect("ip")).is_some());
        assert!(!ix.synced());
        ix.apply(Update::Replace(Kind::Services, vec![]));
        ix.apply(Update::Replace(Kind::Slices, vec![]));
        assert!(ix.synced());
    }
}
