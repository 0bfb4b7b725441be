//! Which pod and container a process belongs to, from its cgroup path as
//! kubelet lays it out:
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//!   (also `crio-<id>.scope` and `docker-<id>.scope`);
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<container-id>`.

/// Pod UID and container id found in a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID with dashes (`metadata.uid`).
    pub pod_uid: String,
    /// The container runtime id (64 hex digits), if the path reaches a container.
    pub container_id: Option<String>,
}

const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "containerd-"];

/// The cgroup v2 path of a process (`0::<path>` in /proc/<pid>/cgroup).
pub fn of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// Parses a cgroup v2 path (as in `/proc/<pid>/cgroup`, `0::<path>`).
pub fn parse(path: &str) -> Option<PodCgroup> {
    let mut pod_uid = None;
    let mut container_id = None;
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        if let Some(uid) = pod_segment(seg) {
            pod_uid = Some(uid);
            continue;
        }
        if pod_uid.is_some() {
            if let Some(id) = container_segment(seg) {
                container_id = Some(id);
            }
        }
    }
    pod_uid.map(|pod_uid| PodCgroup { pod_uid, container_id })
}

fn pod_segment(seg: &str) -> Option<String> {
    // systemd: kubepods-burstable-pod1234_5678.slice / kubepods-pod….slice
    if let Some(rest) = seg.strip_suffix(".slice") {
        let at = rest.rfind("-pod")?;
        let uid = &rest[at + 4..];
        return valid_uid(&uid.replace('_', "-"));
    }
    // cgroupfs: pod1234-5678
    seg.strip_prefix("pod").and_then(valid_uid)
}

fn valid_uid(uid: &str) -> Option<String> {
    let ok = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| uid.to_ascii_lowercase())
}

fn container_segment(seg: &str) -> Option<String> {
    let id = match seg.strip_suffix(".scope") {
        Some(scope) => SCOPE_PREFIXES.iter().find_map(|p| scope.strip_prefix(p))?,
        None => seg,
    };
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The container id in a pod status `containerID` (`containerd://<id>`).
pub fn status_container_id(raw: &str) -> Option<String> {
    let id = raw.rsplit_once("://").map_or(raw, |(_, id)| id);
    container_segment(id)
}

/// Where cgroup v2 is mounted, from /proc/self/mounts (hybrid hosts mount
/// it at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_root() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
    })
}

/// Depth of kubelet's cgroup trees (slice/qos/pod/container), with margin.
const MAX_DEPTH: usize = 6;

/// Every cgroup under the `kubepods*` trees: inode (= the cgroup id BPF
/// reports) → path relative to the cgroup2 root. This finds the pod of a
/// process that already exited, which /proc/<pid>/cgroup cannot.
pub fn scan(root: &std::path::Path) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let Ok(top) = std::fs::read_dir(root) else {
        return out;
    };
    let mut stack: Vec<(std::path::PathBuf, String, usize)> = top
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kubepods"))
        .map(|e| (e.path(), format!("/{}", e.file_name().to_string_lossy()), 1))
        .collect();
    while let Some((dir, rel, depth)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        if !meta.is_dir() {
            continue;
        }
        out.push((meta.ino(), rel.clone()));
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((
                    e.path(),
                    format!("{rel}/{}", e.file_name().to_string_lossy()),
                    depth + 1,
                ));
            }
        }
    }
    out
}

/// Every pod cgroup under the `kubepods*` trees (from [`scan`]): (inode =
/// cgroup id, level below the cgroup2 root, pod UID). Containers below
/// pods are not listed.
pub fn pod_dirs(root: &std::path::Path) -> Vec<(u64, u32, String)> {
    scan(root)
        .into_iter()
        .filter_map(|(id, rel)| {
            let uid = pod_segment(rel.rsplit('/').next()?)?;
            Some((id, rel.matches('/').count() as u32, uid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c1a7f7e1c4b6c9e4a9d2a3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";
    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    #[test]
    fn parses_the_systemd_driver_layout_for_each_runtime() {
        for prefix in ["cri-containerd-", "crio-", "docker-"] {
            let path = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/{prefix}{ID}.scope",
                UID.replace('-', "_")
            );
            assert_eq!(
                parse(&path),
                Some(PodCgroup {
                    pod_uid: UID.into(),
                    container_id: Some(ID.into())
                }),
                "{path}"
            );
        }
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse(&guaranteed).map(|p| p.pod_uid), Some(UID.into()));
    }

    #[test]
    fn parses_the_cgroupfs_driver_layout() {
        let path = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(
            parse(&path),
            Some(PodCgroup {
                pod_uid: UID.into(),
                container_id: Some(ID.into())
            })
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}")),
            Some(PodCgroup {
                pod_uid: UID.into(),
                container_id: None
            })
        );
    }

    #[test]
    fn ignores_paths_outside_kubepods() {
        assert_eq!(parse("/user.slice/user-0.slice/session-1.scope"), None);
        assert_eq!(parse("/"), None);
        assert_eq!(parse("/system.slice/containerd.service"), None);
    }

    #[test]
    fn reads_container_ids_from_pod_status() {
        assert_eq!(status_container_id(&format!("containerd://{ID}")), Some(ID.into()));
        assert_eq!(status_container_id(&format!("cri-o://{ID}")), Some(ID.into()));
        assert_eq!(status_container_id("containerd://short"), None);
    }

    #[test]
    fn finds_pod_cgroups_of_both_drivers_at_their_levels_and_not_their_containers() {
        use std::os::unix::fs::MetadataExt;
        let root = std::env::temp_dir().join(format!("meshless-pod-dirs-{}", std::process::id()));
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        );
        let other = "ffffffff-4e5f-6789-abcd-ef0123456789";
        let cgroupfs = format!("kubepods/pod{other}");
        for dir in [
            format!("{systemd}/cri-containerd-{ID}.scope"),
            format!("{cgroupfs}/{ID}"),
            "system.slice/pod0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
        ] {
            std::fs::create_dir_all(root.join(dir)).expect("temp dir");
        }
        let mut found = pod_dirs(&root);
        found.sort_by_key(|(_, level, _)| *level);
        let ino = |p: &str| std::fs::metadata(root.join(p)).expect("made above").ino();
        assert_eq!(
            found,
            vec![
                (ino(&cgroupfs), 2, other.to_owned()),
                (ino(&systemd), 3, UID.to_owned())
            ]
        );
        std::fs::remove_dir_all(&root).expect("remove temp dir");
    }
}
