//! HTTPS: uprobes on OpenSSL's `SSL_read`/`SSL_write` (and `_ex`) read the
//! plaintext, which flows into the same parsers as plaintext HTTP (see
//! ebpf/src/probes/tls.rs for how it is tied to its socket).
//!
//! A uprobe sits on a file (device + inode), so each libssl file is
//! attached once and then covers every process that maps it, also those
//! started later. Files are found in the host's usual library paths at
//! start and in `/proc/<pid>/maps` of new processes (through
//! `/proc/<pid>/root`, which reaches container images), on a side thread.
//! A process's executable is also read once per file: Node.js (official
//! builds) carries its own OpenSSL inside the `node` binary and exports the
//! SSL functions; a statically linked program may keep them in `.symtab`.
pub mod go;
pub mod library;

use std::{
    ffi::CString,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
    time::Duration,
};

use aya::{
    maps::{MapData, PerCpuArray, ProgramArray},
    programs::ProgramFd,
    Ebpf,
};
use meshless_common::{
    TlsCounter, TAIL_H2_WALK, TAIL_SERVER_CTX, TLS_COUNTERS_MAP, TLS_H2_WALK_PROGRAM, TLS_SERVER_CTX_MAP,
    TLS_SERVER_CTX_PROGRAM, TLS_UPROBES,
};
use tracing::{debug, info, warn};

use crate::uprobe::{load_program, Pmu, UprobeError};

/// Why the TLS uprobes cannot be used (HTTPS is then not traced).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Uprobe(#[from] UprobeError),
    #[error("loading {name}: {detail}")]
    Slot { name: &'static str, detail: String },
    #[error("map {0} is missing from the eBPF object or has another layout (rebuild)")]
    Map(&'static str),
}

/// Library files attached at most (distinct OpenSSL builds on one node).
const MAX_LIBRARIES: usize = 64;
/// Processes remembered as scanned; beyond it the set starts over.
const MAX_PROCESSES: usize = 65_536;
/// How often a process's maps are read: libraries are loaded at start or
/// soon after (Python imports `ssl` when a module needs it).
const SCANS_PER_PROCESS: u8 = 3;
/// Time between scans of /proc for new processes.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The loaded TLS programs and the library files they are attached to.
pub struct TlsProbes {
    /// Program fds in `TLS_UPROBES` order.
    programs: Vec<ProgramFd>,
    pmu: Pmu,
    /// Also probe libraries where that single-steps (slow on VMs).
    expensive_too: bool,
    /// (device, inode) → perf event fds (closed on drop), or None when the
    /// file cannot be probed (remembered so it is not read again).
    libraries: foldhash::HashMap<(u64, u64), Option<Vec<OwnedFd>>>,
    /// Executables read that contain no OpenSSL (not read again).
    plain_executables: foldhash::HashSet<(u64, u64)>,
    /// pid → how many times its maps were read.
    scanned: foldhash::HashMap<u32, u8>,
    counters: Option<PerCpuArray<MapData, u64>>,
    last_counts: Vec<u64>,
    last_log: std::time::Instant,
    /// Go executables' crypto/tls (None when its programs did not load).
    go: Option<go::GoTls>,
}

impl TlsProbes {
    /// Loads (verifies) the uprobe programs; attaching happens per library.
    /// `expensive_too`: also attach where the probes single-step (libraries
    /// whose code does not fit the cheap placement, see [`library::plan`]).
    pub fn load(ebpf: &mut Ebpf, expensive_too: bool) -> Result<TlsProbes, TlsError> {
        for (name, slot) in [
            (TLS_SERVER_CTX_PROGRAM, TAIL_SERVER_CTX),
            (TLS_H2_WALK_PROGRAM, TAIL_H2_WALK),
        ] {
            let tail = load_program(ebpf, name)?;
            let map = ebpf
                .map_mut(TLS_SERVER_CTX_MAP)
                .ok_or(TlsError::Map(TLS_SERVER_CTX_MAP))?;
            let mut slots = ProgramArray::try_from(map).map_err(|_| TlsError::Map(TLS_SERVER_CTX_MAP))?;
            slots.set(slot, &tail, 0).map_err(|e| TlsError::Slot {
                name,
                detail: e.to_string(),
            })?;
        }
        let mut programs = Vec::new();
        for (name, _, _) in TLS_UPROBES {
            programs.push(load_program(ebpf, name)?);
        }
        let pmu = Pmu::read()?;
        let go = go::GoTls::load(ebpf, pmu)
            .inspect_err(|error| warn!(%error, "HTTPS of Go programs (crypto/tls) is not traced"))
            .ok();
        let counters = ebpf
            .take_map(TLS_COUNTERS_MAP)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        Ok(TlsProbes {
            programs,
            pmu,
            expensive_too,
            libraries: foldhash::HashMap::default(),
            plain_executables: foldhash::HashSet::default(),
            scanned: foldhash::HashMap::default(),
            counters,
            last_counts: Vec::new(),
            last_log: std::time::Instant::now(),
            go,
        })
    }

    /// Number of library files with probes attached.
    pub fn attached(&self) -> usize {
        self.libraries.values().filter(|l| l.is_some()).count()
    }

    /// Attaches the host's usual libssl files (processes started later map them).
    pub fn attach_host(&mut self) {
        for path in library::HOST_CANDIDATES {
            let path = Path::new(path);
            if path.exists() {
                self.attach_file(path, None, &path.display().to_string(), true);
            }
        }
        for path in library::HOST_EXECUTABLES {
            let path = Path::new(path);
            if path.exists() {
                self.attach_file(path, None, &path.display().to_string(), false);
            }
        }
    }

    /// Reads the maps of processes not scanned often enough yet and
    /// attaches the libssl files they map; forgets processes that ended.
    pub fn scan(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let me = std::process::id();
        let mut alive = foldhash::HashSet::default();
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            alive.insert(pid);
            if pid == me {
                continue;
            }
            let scans = self.scanned.entry(pid).or_insert(0);
            if *scans >= SCANS_PER_PROCESS {
                continue;
            }
            *scans += 1;
            if *scans == 1 {
                if let Some(go) = &mut self.go {
                    go.process(pid);
                }
            }
            let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
                continue;
            };
            for (range, path) in library::mapped_libssl(&maps) {
                if let Some(file) = library::candidates(pid, range, path).into_iter().find(|p| p.exists()) {
                    self.attach_file(&file, Some(pid), path, true);
                }
            }
            self.scan_executable(pid);
        }
        self.scanned.retain(|pid, _| alive.contains(pid));
        if self.scanned.len() > MAX_PROCESSES {
            self.scanned.clear();
        }
    }

    /// Attaches the process's executable when it contains OpenSSL (Node.js).
    fn scan_executable(&mut self, pid: u32) {
        let exe = std::path::PathBuf::from(format!("/proc/{pid}/exe"));
        let Ok(meta) = std::fs::metadata(&exe) else {
            return;
        };
        let id = (meta.dev(), meta.ino());
        if self.plain_executables.contains(&id) || self.libraries.contains_key(&id) {
            return;
        }
        let shown = std::fs::read_link(&exe).map_or_else(|_| exe.display().to_string(), |p| p.display().to_string());
        if !self.attach_file(&exe, Some(pid), &shown, false) {
            if self.plain_executables.len() >= MAX_PROCESSES {
                self.plain_executables.clear();
            }
            self.plain_executables.insert(id);
        }
    }

    /// Attaches every probe to one library file, once per file (`path`
    /// opens it; `shown` is its name in logs, as the process maps it).
    /// False when the file has no SSL functions (then only a libssl-named
    /// file, `expected`, is remembered and logged as such).
    fn attach_file(&mut self, path: &Path, pid: Option<u32>, shown: &str, expected: bool) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let id = (meta.dev(), meta.ino());
        if self.libraries.contains_key(&id) {
            return true;
        }
        if self.libraries.len() >= MAX_LIBRARIES {
            debug!(
                path = shown,
                limit = MAX_LIBRARIES,
                "too many TLS libraries: not attached"
            );
            return true;
        }
        let attached = match library::symbols(path) {
            Ok(plan) if !plan.cheap && !self.expensive_too => {
                info!(
                    path = shown,
                    pid,
                    "TLS library not traced by default: its probes would single-step (~29 µs per SSL call on VMs); --tls on traces it anyway"
                );
                None
            }
            Ok(plan) => match self.attach_plan(path, &plan.probes) {
                Ok(fds) => {
                    info!(
                        path = shown,
                        pid,
                        uprobes = fds.len(),
                        cheap = plan.cheap,
                        "TLS library: tracing HTTPS through it"
                    );
                    Some(fds)
                }
                Err(error) => {
                    warn!(pid, path = shown, %error, "TLS library not traced: attaching uprobes failed");
                    None
                }
            },
            Err(error) if expected => {
                warn!(pid, path = shown, %error, "TLS library not traced");
                None
            }
            Err(error) => {
                debug!(pid, path = shown, %error, "executable without OpenSSL");
                return false;
            }
        };
        self.libraries.insert(id, attached);
        true
    }

    /// Return probes first: an entry probe whose call returns unseen would
    /// leave the thread marked as inside an SSL call.
    fn attach_plan(&self, path: &Path, probes: &[(usize, u64)]) -> std::io::Result<Vec<OwnedFd>> {
        let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        let mut fds = Vec::new();
        for want_return in [true, false] {
            for (i, offset) in probes {
                let is_return = TLS_UPROBES[*i].2;
                if is_return == want_return {
                    fds.push(self.pmu.attach(&cpath, *offset, is_return, &self.programs[*i])?);
                }
            }
        }
        Ok(fds)
    }

    /// Logs the TLS counters when they changed, at most every few seconds.
    pub fn log_counters(&mut self) {
        let Some(map) = &self.counters else {
            return;
        };
        if self.last_log.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.last_log = std::time::Instant::now();
        let counts: Vec<u64> = TlsCounter::ALL
            .iter()
            .map(|(c, _)| map.get(&(*c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect();
        if counts != self.last_counts {
            let text: Vec<String> = TlsCounter::ALL
                .iter()
                .zip(&counts)
                .map(|((_, name), v)| format!("{name}={v}"))
                .collect();
            info!("tls counters {}", text.join(" "));
            self.last_counts = counts;
        }
    }
}

/// Keeps attaching libraries of new processes on a thread of its own
/// (reading /proc and ELF files must not stall the event path).
pub fn spawn(mut probes: TlsProbes) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("tls-attach".into())
        .spawn(move || loop {
            std::thread::sleep(SCAN_EVERY);
            probes.scan();
            probes.log_counters();
        })?;
    Ok(())
}
