//! Enrichment from the index: the pod a process runs in (by its cgroup),
//! what the cluster knows about an address, and both put on a span.
use std::{net::IpAddr, sync::Arc};

use super::{Index, Verdict, MAX_SHARED};
use crate::{
    k8s::{cgroup, fqdn, PeerK8s, PodMeta, SpanK8s},
    span::{Span, SpanKind},
};

/// Most cgroup ids remembered (ids of gone containers are not reused soon).
const MAX_CGROUPS: usize = 16_384;

/// Least time between two scans of the cgroup tree.
const RESCAN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

impl Index {
    /// The pod a process runs in, via its cgroup (built once per cgroup
    /// and shared until the next metadata update).
    pub fn pod_of(&mut self, pid: u32, cgroup_id: u64) -> Option<SpanK8s> {
        if let Some(known) = self.shared.own.get(&cgroup_id) {
            return known.clone();
        }
        let pod = self.pod_meta(pid, cgroup_id).cloned();
        // Only a cgroup already resolved is an answer to keep: one not
        // found yet may be found by the next scan.
        let cg = self.cgroups.get(&cgroup_id)?;
        let own = pod.zip(cg.as_ref()).map(|(pod, cg)| SpanK8s {
            container: pod.container_name(cg.container_id.as_deref()).map(Arc::from),
            pod,
            service_fqdn: None,
        });
        if self.shared.own.len() >= MAX_SHARED {
            self.shared.own.clear();
        }
        self.shared.own.insert(cgroup_id, own.clone());
        own
    }

    /// True when the spans of a process are dropped (see [`Self::untraced`]).
    fn drops_spans_of(&mut self, pid: u32, cgroup_id: u64) -> bool {
        let pod = self.pod_meta(pid, cgroup_id).cloned();
        self.untraced(pod.as_deref())
    }

    /// True when spans of a process in `pod` (None: in no pod) are not
    /// exported: the pod opted out, its namespace is not traced, or only
    /// selected namespaces are traced and the process is in none.
    fn untraced(&self, pod: Option<&PodMeta>) -> bool {
        match pod {
            Some(pod) => pod.opted_out || !self.filter.allows(&pod.namespace),
            None => !self.filter.include.is_empty(),
        }
    }

    /// The pod of a process (by its cgroup), borrowed.
    fn pod_meta(&mut self, pid: u32, cgroup_id: u64) -> Option<&Arc<PodMeta>> {
        if !self.cgroups.contains_key(&cgroup_id) {
            if self.cgroups.len() >= MAX_CGROUPS {
                self.cgroups.clear();
            }
            // A cgroup's path never changes, so the answer (pod or not) is
            // cached. A process that already exited is found by scanning the
            // pod cgroup trees for the id (an inode), at most once a second.
            match cgroup::of_process(pid) {
                Some(path) => {
                    self.cgroups.insert(cgroup_id, cgroup::parse(&path));
                }
                None => self.scan_cgroups(),
            }
        }
        let cg = self.cgroups.get(&cgroup_id)?.as_ref()?;
        self.pods.get(&cg.pod_uid)
    }

    fn scan_cgroups(&mut self) {
        let due = self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_AFTER);
        let Some(root) = self.cgroup_root.as_ref().filter(|_| due) else {
            return;
        };
        self.last_scan = Some(std::time::Instant::now());
        for (id, path) in cgroup::scan(root) {
            if let Some(found) = cgroup::parse(&path) {
                self.cgroups.insert(id, Some(found));
            }
        }
    }

    /// What the cluster knows about the other end at `ip`, merged with the
    /// pod `resolved` names when `ip` was a Service IP DNATed to it; built
    /// once per pair and shared (see [`Index::shared`]).
    fn shared_peer(&mut self, ip: IpAddr, resolved: Option<IpAddr>) -> Option<Arc<PeerK8s>> {
        if let Some(known) = self.shared.peers.get(&(ip, resolved)) {
            return known.clone();
        }
        let mut peer = self.peer(ip);
        if let Some(real) = resolved.and_then(|r| self.peer(r)) {
            // A Service IP names the service; the pod it was DNATed to
            // names the workload.
            let p = peer.get_or_insert_with(PeerK8s::default);
            p.pod = real.pod.or(p.pod.take());
            p.workload = real.workload.or(p.workload.take());
            p.istio = real.istio.or(p.istio.take());
            p.namespace = p.namespace.take().or(real.namespace);
            p.service_fqdn = p.service_fqdn.take().or(real.service_fqdn);
        }
        let peer = peer.map(Arc::new);
        if self.shared.peers.len() >= MAX_SHARED {
            self.shared.peers.clear();
        }
        self.shared.peers.insert((ip, resolved), peer.clone());
        peer
    }

    /// What the cluster knows about an address.
    pub fn peer(&self, ip: IpAddr) -> Option<PeerK8s> {
        let mut peer = PeerK8s::default();
        if let Some(pod) = self.pod_by_ip.get(&ip).and_then(|uid| self.pods.get(uid)) {
            peer.namespace = Some(pod.namespace.clone());
            peer.workload = Some(pod.workload_name());
            peer.pod = Some(pod.name.clone());
            let mut istio = (*pod.istio).clone();
            istio.canonical_service.get_or_insert_with(|| pod.canonical_service());
            peer.istio = Some(istio);
        }
        if let Some((ns, svc, pod)) = self.endpoint_by_ip.get(&ip) {
            peer.namespace.get_or_insert_with(|| ns.clone());
            if let Some(svc) = svc {
                peer.service_fqdn = Some(fqdn(svc, ns).into());
            }
            if peer.pod.is_none() {
                peer.pod.clone_from(pod);
            }
            if peer.workload.is_none() {
                // A pod on another node: its workload from the pod name.
                peer.workload = pod.as_deref().map(workload_from_pod_name);
            }
        }
        if let Some((ns, name)) = self.service_by_ip.get(&ip) {
            peer.namespace.get_or_insert_with(|| ns.clone());
            peer.service_fqdn = Some(fqdn(name, ns).into());
        }
        (peer != PeerK8s::default()).then_some(peer)
    }

    /// Adds pod and peer metadata to a span; says whether to keep it.
    pub fn enrich(&mut self, span: &mut Span) -> Verdict {
        let k8s = self.pod_of(span.process.pid, span.process.cgroup_id);
        if self.untraced(k8s.as_ref().map(|k| &*k.pod)) {
            return Verdict::Drop;
        }
        if let Some(mut k8s) = k8s {
            if span.kind == SpanKind::Server {
                k8s.service_fqdn = span
                    .server
                    .and_then(|a| self.shared_peer(a.ip(), None))
                    .and_then(|p| p.service_fqdn.clone());
            }
            span.k8s = Some(k8s);
        }
        // A server span that adopted the ids of a local client whose spans
        // are dropped would name a parent that is never exported.
        if let Some((pid, cgroup_id)) = span.peer_process.filter(|_| !span.parent_is_remote) {
            if self.drops_spans_of(pid, cgroup_id) {
                span.parent_span_id = None;
            }
        }
        let peer_ip = match span.kind {
            SpanKind::Server => span.client,
            SpanKind::Client => span.server,
        };
        let resolved = span.resolved_server.map(|a| a.ip());
        span.peer_k8s = match (peer_ip, resolved) {
            (Some(a), _) => self.shared_peer(a.ip(), resolved),
            // No address for the other end: only the DNAT target is known.
            (None, Some(r)) => self.shared_peer(r, None),
            (None, None) => None,
        };
        Verdict::Keep
    }
}

/// `web-7d4b9c8f6-x2x9z` → `web`: strips the ReplicaSet hash and pod suffix.
fn workload_from_pod_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('-').collect();
    if parts.len() >= 3 {
        parts[..parts.len() - 2].join("-")
    } else if parts.len() == 2 {
        parts[0].to_owned()
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{tests::*, NamespaceFilter, Update};
    use super::*;
    use crate::k8s::{quiet::QuietPods, ServiceMeta, SliceMeta};
    use tokio::sync::mpsc;

    #[test]
    fn peers_are_named_by_endpointslice_and_cluster_ip() {
        let mut ix = index();
        ix.apply(Update::Service(ServiceMeta {
            name: "orders".into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
        }));
        ix.apply(Update::Slice(SliceMeta {
            name: "orders-abc".into(),
            namespace: "shop".into(),
            service: Some("orders".into()),
            endpoints: vec![("10.1.2.3".parse().expect("ip"), Some("orders-5d4f8b7c9-x7k2p".into()))],
        }));
        let by_vip = ix.peer("10.96.0.10".parse().expect("ip")).expect("vip");
        assert_eq!(by_vip.service_fqdn.as_deref(), Some("orders.shop.svc.cluster.local"));
        let by_endpoint = ix.peer("10.1.2.3".parse().expect("ip")).expect("endpoint");
        assert_eq!(by_endpoint.workload.as_deref(), Some("orders"));
        assert_eq!(
            by_endpoint.service_fqdn.as_deref(),
            Some("orders.shop.svc.cluster.local")
        );
        assert!(ix.peer("192.0.2.1".parse().expect("ip")).is_none());
    }

    #[test]
    fn a_client_span_through_a_service_ip_names_the_service_and_the_pod_it_reached() {
        let mut ix = index();
        ix.apply(Update::Service(ServiceMeta {
            name: "orders".into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
        }));
        ix.apply(Update::Pod(pod("u9", "orders-5d4f8b7c9-x7k2p", "10.1.2.3")));
        ix.cgroups.insert(21, None);
        let mut span = span_in_cgroup(21);
        span.kind = SpanKind::Client;
        span.server = Some("10.96.0.10:80".parse().expect("addr"));
        span.resolved_server = Some("10.1.2.3:8080".parse().expect("addr"));
        assert_eq!(ix.enrich(&mut span), Verdict::Keep);
        let peer = span.peer_k8s.expect("peer");
        assert_eq!(peer.service_fqdn.as_deref(), Some("orders.shop.svc.cluster.local"));
        assert_eq!(peer.pod.as_deref(), Some("orders-5d4f8b7c9-x7k2p"));
        assert_eq!(peer.workload.as_deref(), Some("web"));
    }

    fn span_in_cgroup(cgroup_id: u64) -> Span {
        Span {
            trace_id: crate::trace_context::TraceId::random(),
            span_id: crate::trace_context::SpanId::random(),
            parent_span_id: None,
            sampled: true,
            parent_is_remote: false,
            trace_state: None,
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            method: "GET".into(),
            request: crate::span::RequestText::new("/", None),
            status_code: Some(200),
            protocol_version: "1.1",
            tls: false,
            rpc: None,
            client: "10.0.0.9:5000".parse().ok(),
            server: "10.0.0.5:80".parse().ok(),
            process: crate::span::Process {
                pid: u32::MAX,
                tid: 1,
                name: "app".into(),
                executable: "app".into(),
                thread: Default::default(),
                cgroup_id,
            },
            peer_comm: None,
            peer_process: None,
            resolved_server: None,
            k8s: None,
            peer_k8s: None,
            request_headers: vec![],
            response_headers: vec![],
            truncated: false,
            unanswered: None,
        }
    }

    #[test]
    fn opted_out_pods_and_excluded_namespaces_are_dropped_others_kept_and_quiet() {
        let (_tx, rx) = mpsc::channel(1);
        let quiet_pods = QuietPods::default();
        let mut ix = Index::new(
            rx,
            NamespaceFilter {
                include: vec![],
                exclude: vec!["kube-system".into()],
            },
            quiet_pods.clone(),
        );
        let mut quiet = pod("u1", "quiet-0", "10.0.0.5");
        quiet.opted_out = true;
        let mut system = pod("u2", "dns-0", "10.0.0.6");
        system.namespace = "kube-system".into();
        ix.apply(Update::Pod(quiet));
        ix.apply(Update::Pod(system));
        ix.apply(Update::Pod(pod("u3", "web-0", "10.0.0.7")));
        for (id, uid) in [(11, "u1"), (12, "u2"), (13, "u3")] {
            ix.cgroups.insert(
                id,
                Some(cgroup::PodCgroup {
                    pod_uid: uid.into(),
                    container_id: None,
                }),
            );
        }
        assert_eq!(ix.enrich(&mut span_in_cgroup(11)), Verdict::Drop, "annotation opt-out");
        assert_eq!(ix.enrich(&mut span_in_cgroup(12)), Verdict::Drop, "excluded namespace");
        let mut kept = span_in_cgroup(13);
        assert_eq!(ix.enrich(&mut kept), Verdict::Keep);
        assert_eq!(kept.k8s.map(|k| k.pod.name.clone()).as_deref(), Some("web-0"));
        assert!(
            quiet_pods.contains("u1") && quiet_pods.contains("u2"),
            "no options from dropped pods"
        );
        assert!(!quiet_pods.contains("u3"));
        // A traced server called by a local client: the parent is the
        // client's span, which an opted-out or untraced client never exports.
        let parent = crate::trace_context::SpanId::random();
        let called_by = |client_cgroup: u64, remote: bool| {
            let mut s = span_in_cgroup(13);
            s.parent_span_id = Some(parent);
            s.parent_is_remote = remote;
            s.peer_process = Some((u32::MAX, client_cgroup));
            s
        };
        for (client, remote, kept_parent) in [
            (11, false, None),
            (12, false, None),
            (13, false, Some(parent)),
            (11, true, Some(parent)),
        ] {
            let mut server = called_by(client, remote);
            assert_eq!(ix.enrich(&mut server), Verdict::Keep);
            assert_eq!(
                server.parent_span_id, kept_parent,
                "client cgroup {client}, remote parent {remote}"
            );
        }
        ix.apply(Update::PodGone { uid: "u1".into() });
        assert!(!quiet_pods.contains("u1"), "forgotten with the pod");
        // A process outside any pod keeps its process metadata.
        ix.cgroups.insert(14, None);
        let mut host = span_in_cgroup(14);
        assert_eq!(ix.enrich(&mut host), Verdict::Keep);
        assert!(host.k8s.is_none());
    }

    #[test]
    fn spans_share_what_is_known_until_the_metadata_changes() {
        let mut ix = index();
        let mut web = pod("u3", "web-0", "10.0.0.5");
        web.containers = vec![("c1".into(), "app".into())];
        ix.apply(Update::Pod(web));
        ix.apply(Update::Pod(pod("u4", "orders-5d4f8b7c9-x7k2p", "10.0.0.9")));
        ix.cgroups.insert(
            13,
            Some(cgroup::PodCgroup {
                pod_uid: "u3".into(),
                container_id: Some("c1".into()),
            }),
        );
        let enriched = |ix: &mut Index| {
            let mut span = span_in_cgroup(13);
            assert_eq!(ix.enrich(&mut span), Verdict::Keep);
            span
        };
        let (a, b) = (enriched(&mut ix), enriched(&mut ix));
        let (pa, pb) = (a.peer_k8s.expect("peer"), b.peer_k8s.expect("peer"));
        assert!(Arc::ptr_eq(&pa, &pb), "one peer for both spans");
        let (ka, kb) = (a.k8s.expect("own"), b.k8s.expect("own"));
        assert_eq!(ka.container.as_deref(), Some("app"));
        assert!(Arc::ptr_eq(
            ka.container.as_ref().expect("c"),
            kb.container.as_ref().expect("c")
        ));
        assert_eq!(ka.service_fqdn, None);
        // The peer gets a Service, this pod one too: the next span says so.
        ix.apply(Update::Slice(SliceMeta {
            name: "orders-abc".into(),
            namespace: "shop".into(),
            service: Some("orders".into()),
            endpoints: vec![("10.0.0.9".parse().expect("ip"), Some("orders-5d4f8b7c9-x7k2p".into()))],
        }));
        ix.apply(Update::Service(ServiceMeta {
            name: "web".into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.0.0.5".parse().expect("ip")],
        }));
        let c = enriched(&mut ix);
        let pc = c.peer_k8s.expect("peer");
        assert_eq!(pc.service_fqdn.as_deref(), Some("orders.shop.svc.cluster.local"));
        assert_eq!(pa.service_fqdn, None, "a span keeps what it was given");
        assert_eq!(
            c.k8s.expect("own").service_fqdn.as_deref(),
            Some("web.shop.svc.cluster.local")
        );
        // The pod goes: its spans name no pod any more.
        ix.apply(Update::PodGone { uid: "u3".into() });
        assert!(enriched(&mut ix).k8s.is_none());
    }

    #[test]
    fn the_shared_caches_stay_within_their_bound() {
        let mut ix = index();
        for i in 0..(MAX_SHARED as u32 + 100) {
            let mut span = span_in_cgroup(u64::from(i));
            span.client = Some(std::net::SocketAddr::from((
                std::net::Ipv4Addr::from(0x0a00_0000 + i),
                5000,
            )));
            ix.cgroups.insert(u64::from(i), None);
            assert_eq!(ix.enrich(&mut span), Verdict::Keep);
            assert!(ix.shared.own.len() <= MAX_SHARED && ix.shared.peers.len() <= MAX_SHARED);
        }
        assert!(!ix.shared.peers.is_empty());
        // A cgroup not resolved yet is not remembered as outside every pod.
        assert!(ix.pod_of(u32::MAX, u64::MAX).is_none());
        assert!(!ix.shared.own.contains_key(&u64::MAX));
    }

    #[test]
    fn with_an_include_list_processes_outside_it_are_dropped() {
        let (_tx, rx) = mpsc::channel(1);
        let mut ix = Index::new(
            rx,
            NamespaceFilter {
                include: vec!["shop".into()],
                exclude: vec![],
            },
            QuietPods::default(),
        );
        ix.apply(Update::Pod(pod("u3", "web-0", "10.0.0.7")));
        ix.cgroups.insert(
            13,
            Some(cgroup::PodCgroup {
                pod_uid: "u3".into(),
                container_id: None,
            }),
        );
        ix.cgroups.insert(14, None);
        assert_eq!(ix.enrich(&mut span_in_cgroup(13)), Verdict::Keep);
        assert_eq!(ix.enrich(&mut span_in_cgroup(14)), Verdict::Drop);
        // A server in the list called by a local process outside it: that
        // client's span is dropped, so the server names no parent.
        let mut server = span_in_cgroup(13);
        server.parent_span_id = Some(crate::trace_context::SpanId::random());
        server.peer_process = Some((u32::MAX, 14));
        assert_eq!(ix.enrich(&mut server), Verdict::Keep);
        assert_eq!(server.parent_span_id, None);
    }
}
