//! Pods whose traffic must carry no trace option: opted out with the
//! annotation `meshless.io/trace: "false"`, or in a namespace that is not
//! traced (`--namespaces` / `--exclude-namespaces`). The metadata index
//! keeps the set; the process classifier marks their processes
//! ([`meshless_common::LINK_QUIET`]) when they start, so the kernel leaves
//! their sockets alone from their first request on.
use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use super::cgroup;

/// Most pods remembered; a node runs at most a few hundred.
const MAX_PODS: usize = 16_384;

/// Pod UIDs whose processes stay quiet. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct QuietPods(Arc<RwLock<HashSet<String>>>);

impl QuietPods {
    /// Records whether a pod is quiet.
    pub fn set(&self, uid: &str, quiet: bool) {
        let mut pods = self.0.write().unwrap_or_else(|e| e.into_inner());
        if !quiet {
            pods.remove(uid);
        } else if pods.len() < MAX_PODS || pods.contains(uid) {
            pods.insert(uid.to_owned());
        }
    }

    /// Forgets every pod (a full relist follows).
    pub fn clear(&self) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).contains(uid)
    }

    /// True if process `pid` runs in a quiet pod (by its cgroup path).
    pub fn holds_process(&self, pid: u32) -> bool {
        cgroup::of_process(pid)
            .and_then(|path| cgroup::parse(&path))
            .is_some_and(|pod| self.contains(&pod.pod_uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_quiet_until_it_is_traced_again() {
        let q = QuietPods::default();
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        q.set(uid, true);
        assert!(q.contains(uid));
        q.clone().set(uid, false);
        assert!(!q.contains(uid), "clones share one set");
    }

    #[test]
    fn this_process_is_in_no_pod() {
        let q = QuietPods::default();
        assert!(!q.holds_process(std::process::id()));
    }
}
