//! Pods whose traffic must carry no trace option: opted out with the
//! annotation `meshless.io/trace: "false"`, or in a namespace that is not
//! traced (`--namespaces` / `--exclude-namespaces`). The metadata index
//! keeps the set. The kernel learns it two ways: [`QuietCgroups`] writes
//! the pods' cgroup ids (checked on every request, so a process that has
//! just started — a `curl`, a `kubectl exec` — is quiet from its first
//! request), and the process classifier marks each process it classifies
//! ([`meshless_common::LINK_QUIET`]).
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use meshless_common::{MAX_QUIET_CGROUPS, MAX_QUIET_LEVEL, QUIET_CGROUPS_MAP, QUIET_LEVELS_MAP};
use tracing::{debug, warn};

use super::cgroup;

/// Most pods remembered; a node runs at most a few hundred.
const MAX_PODS: usize = 16_384;

/// Pod UIDs whose processes stay quiet. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct QuietPods(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    pods: RwLock<HashSet<String>>,
    /// Bumped on every change, so the kernel maps follow at once.
    generation: AtomicU64,
}

impl QuietPods {
    /// Records whether a pod is quiet.
    pub fn set(&self, uid: &str, quiet: bool) {
        let mut pods = self.0.pods.write().unwrap_or_else(|e| e.into_inner());
        let changed = if !quiet {
            pods.remove(uid)
        } else if pods.len() < MAX_PODS && !pods.contains(uid) {
            pods.insert(uid.to_owned())
        } else {
            false
        };
        if changed {
            self.0.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Forgets every pod (a full relist follows).
    pub fn clear(&self) {
        self.0.pods.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.0.generation.fetch_add(1, Ordering::Release);
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.0.pods.read().unwrap_or_else(|e| e.into_inner()).contains(uid)
    }

    fn len(&self) -> usize {
        self.0.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// True if process `pid` runs in a quiet pod (by its cgroup path).
    pub fn holds_process(&self, pid: u32) -> bool {
        cgroup::of_process(pid)
            .and_then(|path| cgroup::parse(&path))
            .is_some_and(|pod| self.contains(&pod.pod_uid))
    }
}

/// Rescan period while a quiet pod's cgroup has not appeared yet (kubelet
/// creates it after the pod is scheduled, before its containers start).
const PENDING_SCAN: Duration = Duration::from_millis(250);
/// Rescan period otherwise (pods restarted under a new cgroup).
const SETTLED_SCAN: Duration = Duration::from_secs(2);

/// Keeps the kernel's `QUIET_CGROUPS` / `QUIET_LEVELS` maps equal to the
/// cgroups of the quiet pods on this node.
pub struct QuietCgroups {
    cgroups: BpfHashMap<MapData, u64, u32>,
    levels: Array<MapData, u32>,
    root: PathBuf,
    pods: QuietPods,
    /// What the kernel map holds: cgroup id → level.
    written: HashMap<u64, u32>,
    generation: u64,
    next_scan: Instant,
}

impl QuietCgroups {
    /// None (logged) when the maps or the cgroup2 mount are missing: then
    /// only classified processes are quiet.
    pub fn new(ebpf: &mut aya::Ebpf, pods: QuietPods) -> Option<Self> {
        let maps = ebpf.take_map(QUIET_CGROUPS_MAP).zip(ebpf.take_map(QUIET_LEVELS_MAP));
        let maps = maps.and_then(|(c, l)| Some((BpfHashMap::try_from(c).ok()?, Array::try_from(l).ok()?)));
        let (Some((cgroups, levels)), Some(root)) = (maps, cgroup::cgroup2_root()) else {
            warn!("opted-out pods are quiet from their processes' classification on, not from their first request");
            return None;
        };
        Some(QuietCgroups {
            cgroups,
            levels,
            root,
            generation: pods.generation().wrapping_sub(1),
            pods,
            written: HashMap::new(),
            next_scan: Instant::now(),
        })
    }

    /// Rescans when the quiet pods changed or a scan is due.
    pub fn tick(&mut self, now: Instant) {
        let generation = self.pods.generation();
        if generation == self.generation && now < self.next_scan {
            return;
        }
        self.generation = generation;
        let quiet = self.pods.len();
        let mut want = HashMap::new();
        if quiet > 0 {
            for (id, level, uid) in cgroup::pod_dirs(&self.root) {
                if (1..=MAX_QUIET_LEVEL).contains(&level)
                    && want.len() < MAX_QUIET_CGROUPS as usize
                    && self.pods.contains(&uid)
                {
                    want.insert(id, level);
                }
            }
        }
        self.write(&want);
        let pending = want.len() < quiet;
        self.next_scan = now + if pending { PENDING_SCAN } else { SETTLED_SCAN };
    }

    fn write(&mut self, want: &HashMap<u64, u32>) {
        if *want == self.written {
            return;
        }
        let mask = want.values().fold(0u32, |m, &level| m | 1 << level);
        for (&id, &level) in want {
            if self.written.get(&id) != Some(&level) {
                if let Err(error) = self.cgroups.insert(id, level, 0) {
                    warn!(%error, cgroup = id, "cannot mark a quiet pod's cgroup");
                }
            }
        }
        // Levels of removed cgroups go before the cgroups themselves.
        if let Err(error) = self.levels.set(0, mask, 0) {
            warn!(%error, "cannot set the quiet cgroup levels");
        }
        for id in self.written.keys().filter(|id| !want.contains_key(id)) {
            let _ = self.cgroups.remove(id);
        }
        debug!(cgroups = want.len(), mask, "quiet pod cgroups");
        self.written.clone_from(want);
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
