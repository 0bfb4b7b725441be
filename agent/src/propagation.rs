//! Trace context across the wire and the capture scope.
//!
//! - `--cgroup` scopes capture to one cgroup2 subtree: the kernel compares
//!   each task's ancestor at the subtree's level with the subtree's id.
//! - `--propagation tcp-options` attaches the sock_ops program there: it
//!   writes the client span's ids into a TCP option of the request's first
//!   segment and parses it on the server's node (see ebpf/src/probes/sockops.rs).
//! - The kernel links a process's outbound requests to the one inbound
//!   request it is serving per thread; for runtimes whose threads are not
//!   tied to requests (Go) [`Classifier`] tells it to link by goroutine
//!   (uprobes, see [`crate::golang`]) or, failing that, per process.
use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{links::CgroupAttachMode, SockOps},
    Ebpf,
};
use meshless_common::{LinkPolicy, LINK_POLICY_MAP, LINK_QUIET, SOCKOPS_PROGRAM};
use tracing::{debug, warn};

use crate::{
    config::Propagation,
    k8s::{
        cgroup::cgroup2_root,
        quiet::{QuietCgroups, QuietPods},
    },
};

/// Why the trace-context set-up failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PropagationError {
    #[error("no cgroup2 file system is mounted (see /proc/mounts); --cgroup and --propagation tcp-options need one")]
    NoCgroup2,
    #[error("--cgroup {path}: {source}; give a cgroup2 directory (absolute, or relative to {root})")]
    Cgroup {
        path: PathBuf,
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cgroup {0} is not inside the cgroup2 mount {1}")]
    OutsideMount(PathBuf, PathBuf),
    #[error(
        "--propagation headers is refused: injecting traceparent needs sockets in a sockmap, which \
         makes ioctl(FIONREAD) return 0 on Linux 6.6.128+/6.12.75+/6.18.14+ and stalls nginx, Java and \
         .NET; use --propagation tcp-options (default) or off"
    )]
    HeadersRefused,
    #[error("attaching the TCP-option program to {path}: {detail}")]
    Attach { path: PathBuf, detail: String },
}

/// The cgroup2 subtree that capture (and propagation) is limited to.
#[derive(Debug, Clone)]
pub struct Scope {
    pub path: PathBuf,
    /// The directory's inode: the id `bpf_get_current_cgroup_id` reports.
    pub id: u64,
    /// Depth below the cgroup2 root (the root is level 0).
    pub level: u32,
    /// True when no `--cgroup` was given (the whole machine).
    pub everything: bool,
}

impl Scope {
    /// Resolves `--cgroup` (or the whole cgroup2 tree).
    pub fn resolve(cgroup: Option<&Path>) -> Result<Scope, PropagationError> {
        let root = cgroup2_root().ok_or(PropagationError::NoCgroup2)?;
        let Some(given) = cgroup else {
            return Ok(Scope {
                path: root,
                id: 0,
                level: 0,
                everything: true,
            });
        };
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            root.join(given)
        };
        let err = |source| PropagationError::Cgroup {
            path: given.to_path_buf(),
            root: root.clone(),
            source,
        };
        let path = joined.canonicalize().map_err(err)?;
        let meta = std::fs::metadata(&path).map_err(err)?;
        let rel = path
            .strip_prefix(&root)
            .map_err(|_| PropagationError::OutsideMount(path.clone(), root.clone()))?;
        Ok(Scope {
            level: rel.components().count() as u32,
            id: meta.ino(),
            path,
            everything: false,
        })
    }

    /// (cgroup id, level) for the kernel's filter; id 0 traces everything.
    pub fn kernel_filter(&self) -> (u64, u32) {
        if self.everything {
            (0, 0)
        } else {
            (self.id, self.level)
        }
    }
}

/// Checks the mode before anything is loaded.
pub fn check(mode: Propagation) -> Result<bool, PropagationError> {
    match mode {
        Propagation::TcpOptions => Ok(true),
        Propagation::Off => Ok(false),
        Propagation::Headers => Err(PropagationError::HeadersRefused),
    }
}

/// Where the sock_ops program goes: the `--cgroup` scope, else in
/// Kubernetes mode the kubepods trees (pods only, not the node's own
/// services), else the whole machine.
pub fn option_cgroups(scope: &Scope, kubernetes: bool) -> Vec<PathBuf> {
    if !scope.everything || !kubernetes {
        return vec![scope.path.clone()];
    }
    let Ok(dirs) = std::fs::read_dir(&scope.path) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = dirs
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kubepods") && e.path().is_dir())
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Attaches the sock_ops program to each cgroup in `paths`; the links live
/// in `ebpf` and are detached when it is dropped.
pub fn attach(ebpf: &mut Ebpf, paths: &[PathBuf]) -> Result<(), PropagationError> {
    let Some(first) = paths.first() else {
        warn!("no kubepods cgroup found: trace context will not cross nodes (TCP options off)");
        return Ok(());
    };
    let fail = |detail: String| PropagationError::Attach {
        path: first.clone(),
        detail,
    };
    let program: &mut SockOps = ebpf
        .program_mut(SOCKOPS_PROGRAM)
        .ok_or_else(|| fail("program missing from the eBPF object (rebuild)".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| fail(e.to_string()))?;
    program.load().map_err(|e| fail(e.to_string()))?;
    for path in paths {
        let fail = |detail: String| PropagationError::Attach {
            path: path.clone(),
            detail,
        };
        let dir = File::open(path).map_err(|e| fail(e.to_string()))?;
        // aya passes the mode as bpf_link_create flags, which must be 0
        // for cgroups: links there always coexist with other programs.
        program
            .attach(dir, CgroupAttachMode::Single)
            .map_err(|e| fail(chain(&e)))?;
    }
    Ok(())
}

/// An error with its causes, for messages that must say the errno.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What the correlator tells the classifier.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    /// A connection of this process (classified once).
    Conn(u32),
    /// The process started a new program (classified again).
    Exec(u32),
}

/// Decides each new process's linking policy, off the event path.
pub struct Classifier {
    policies: BpfHashMap<MapData, u32, u32>,
    seen: foldhash::HashSet<u32>,
    quiet: Option<QuietPods>,
    /// The quiet pods' cgroups in the kernel (Kubernetes mode).
    quiet_cgroups: Option<QuietCgroups>,
    /// Uprobes for goroutine linking; None when they could not be loaded.
    go: Option<crate::golang::GoProbes>,
}

/// Longest wait between two [`Classifier::tick`]s.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Processes remembered as classified; beyond it the set starts over.
const MAX_SEEN: usize = 65_536;

impl Classifier {
    /// `quiet`: the pods whose processes must send no trace option
    /// (Kubernetes mode).
    pub fn new(ebpf: &mut Ebpf, quiet: Option<QuietPods>) -> Option<Classifier> {
        let map = ebpf.take_map(LINK_POLICY_MAP)?;
        let policies = BpfHashMap::try_from(map).ok()?;
        let go = crate::golang::GoProbes::load(ebpf)
            .map_err(|error| warn!(%error, "Go processes link per process, not per goroutine"))
            .ok();
        let quiet_cgroups = quiet.clone().and_then(|q| QuietCgroups::new(ebpf, q));
        Some(Classifier {
            policies,
            seen: foldhash::HashSet::default(),
            quiet,
            quiet_cgroups,
            go,
        })
    }

    /// Periodic work between processes (at least every [`TICK`]): follows
    /// the quiet pods' cgroups, logs the Go linking counters.
    pub fn tick(&mut self) {
        if let Some(q) = &mut self.quiet_cgroups {
            q.tick(std::time::Instant::now());
        }
        if let Some(go) = &mut self.go {
            go.log_counters();
        }
    }

    /// Looks at a process the first time it is seen, and after each exec.
    pub fn observe(&mut self, seen: Seen) {
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        let tgid = match seen {
            Seen::Conn(tgid) if !self.seen.insert(tgid) => return,
            Seen::Conn(tgid) => tgid,
            Seen::Exec(tgid) => {
                self.seen.insert(tgid);
                tgid
            }
        };
        let policy = self.policy_of(tgid);
        let quiet = self.quiet.as_ref().is_some_and(|q| q.holds_process(tgid));
        debug!(pid = tgid, ?policy, quiet, "linking policy");
        let value = policy as u32 | if quiet { LINK_QUIET } else { 0 };
        if let Err(error) = self.policies.insert(tgid, value, 0) {
            warn!(%error, pid = tgid, "cannot set the linking policy");
        }
    }
}

impl Classifier {
    /// Go schedules goroutines on any thread: a thread's last request says
    /// nothing about what a goroutine on it serves. Go links by goroutine
    /// where its uprobes attach, else per process.
    fn policy_of(&mut self, tgid: u32) -> LinkPolicy {
        if !is_go_binary(Path::new(&format!("/proc/{tgid}/exe"))) {
            return LinkPolicy::Thread;
        }
        match self.go.as_mut().map(|go| go.follow(tgid)) {
            Some(true) => LinkPolicy::Goroutine,
            _ => LinkPolicy::Process,
        }
    }
}

/// True for Go executables: they carry a `.go.buildinfo` section. Only the
/// ELF section headers are read (memory-mapped), not the whole file.
pub fn is_go_binary(exe: &Path) -> bool {
    use object::Object;
    let Ok(file) = File::open(exe) else {
        return false;
    };
    // SAFETY: a read-only private mapping; a binary replaced underneath
    // (not done by running programs) would at worst misparse.
    let Ok(map) = (unsafe { memmap_file(&file) }) else {
        return false;
    };
    let Ok(elf) = object::File::parse(&*map) else {
        return false;
    };
    let go = elf.section_by_name(".go.buildinfo").is_some();
    drop(elf);
    go
}

/// Maps a file read-only, as it is on disk.
///
/// Shared, not private: the kernel writes the `int3` of every uprobe on a
/// file into each private mapping of it that may execute (a private
/// read-only mapping may), so another tool's probes — or a second agent's
/// — would show up as `0xcc` bytes in code this agent decodes.
///
/// # Safety
/// The caller must not rely on the contents if the file changes.
pub(crate) unsafe fn memmap_file(file: &File) -> std::io::Result<Mapped> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len() as usize;
    if len == 0 {
        return Err(std::io::Error::other("empty file"));
    }
    // SAFETY: a fresh shared read-only mapping of a whole open file.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Mapped { ptr, len })
}

/// A read-only file mapping, unmapped on drop.
pub(crate) struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for the value's life.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_mode_is_refused_with_the_reason() {
        let err = check(Propagation::Headers).expect_err("refused");
        assert!(err.to_string().contains("FIONREAD"), "{err}");
        assert!(check(Propagation::TcpOptions).expect("ok"));
        assert!(!check(Propagation::Off).expect("ok"));
    }

    /// A uprobe registered through tracefs on `file` at `offset`, removed on drop.
    struct TracefsUprobe(String);

    impl TracefsUprobe {
        fn new(file: &std::path::Path, offset: u64) -> TracefsUprobe {
            let group = format!("mlmap{}", std::process::id());
            let def = format!("p:{group}/probe {}:{offset:#x}\n", file.display());
            append("/sys/kernel/tracing/uprobe_events", &def);
            append(&format!("/sys/kernel/tracing/events/{group}/probe/enable"), "1\n");
            TracefsUprobe(group)
        }
    }

    impl Drop for TracefsUprobe {
        fn drop(&mut self) {
            let g = &self.0;
            let _ = std::fs::write(format!("/sys/kernel/tracing/events/{g}/probe/enable"), "0\n");
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open("/sys/kernel/tracing/uprobe_events")
                .and_then(|mut f| std::io::Write::write_all(&mut f, format!("-:{g}/probe\n").as_bytes()));
        }
    }

    fn append(path: &str, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (root and tracefs needed: cargo xtask test mounts it)"));
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
    }

    /// Real kernel: another tool's uprobe on a file must not change the
    /// bytes this agent decodes (Go and TLS probe placement read them).
    #[test]
    fn a_file_with_someone_elses_uprobe_on_it_maps_with_its_bytes_as_on_disk() {
        let dir = std::env::temp_dir().join(format!("meshless-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let copy = dir.join("true");
        std::fs::copy("/bin/true", &copy).expect("copy /bin/true");
        let bytes = std::fs::read(&copy).expect("read copy");
        let elf = object::File::parse(&*bytes).expect("ELF");
        let entry = crate::uprobe::file_offset(&elf, object::Object::entry(&elf)).expect("entry offset");
        let at = usize::try_from(entry).expect("offset");
        assert_ne!(bytes[at], 0xcc, "the entry is not already a breakpoint");
        let probe = TracefsUprobe::new(&copy, entry);
        let file = File::open(&copy).expect("open");
        // SAFETY: nobody writes the copy.
        let map = unsafe { memmap_file(&file) }.expect("map");
        assert_eq!(map[at], bytes[at], "the probe's int3 leaked into the mapping");
        drop(probe);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_test_binary_is_not_a_go_binary() {
        let exe = std::env::current_exe().expect("exe");
        assert!(!is_go_binary(&exe));
    }

    #[test]
    fn in_kubernetes_mode_options_are_attached_to_the_kubepods_trees_only() {
        let root = std::env::temp_dir().join(format!("meshless-cg-{}", std::process::id()));
        for d in ["kubepods.slice", "kubepods", "system.slice", "user.slice"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        let whole = Scope {
            path: root.clone(),
            id: 0,
            level: 0,
            everything: true,
        };
        assert_eq!(
            option_cgroups(&whole, true),
            vec![root.join("kubepods"), root.join("kubepods.slice")]
        );
        assert_eq!(option_cgroups(&whole, false), vec![root.clone()]);
        let scoped = Scope {
            everything: false,
            ..whole
        };
        assert_eq!(option_cgroups(&scoped, true), vec![root.clone()]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_cgroup_outside_the_mount_is_rejected() {
        if cgroup2_root().is_none() {
            return;
        }
        let err = Scope::resolve(Some(Path::new("/tmp"))).expect_err("outside");
        assert!(matches!(err, PropagationError::OutsideMount(..)), "{err}");
    }
}
