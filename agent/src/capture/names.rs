//! Process names: what a process is called, not what its threads are.
//!
//! The kernel reports each event's *thread* comm. Runtimes name their
//! threads (grpcio's `event_engine`, Java's `http-nio-8080-exec-1`), so a
//! span named after the thread that happened to touch the connection first
//! names the wrong thing. A process is named by its main thread's comm
//! (`/proc/<pid>/comm`, what `ps` shows) and its executable
//! (`/proc/<pid>/exe`, semconv `process.executable.name`).
//!
//! Resolved once per process when its first connection is tracked (a few
//! µs, never per event), cached, forgotten at exec and some time after the
//! process was last seen. When /proc no longer has the process (it exited
//! before its events were read) the kernel's comm stands in, preferring an
//! event of the main thread (whose comm is the process's name).
use std::{path::Path, sync::Arc};

use foldhash::HashMap;

use super::event::Comm;

/// Processes remembered at most; past it the cache starts over (counted).
pub const MAX_NAMES: usize = 16_384;
/// A name not used for this long is forgotten (its process may be gone).
pub const NAME_TTL_NS: u64 = 60 * 1_000_000_000;

/// What a process is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessName {
    /// Its main thread's comm (up to 15 bytes), as `ps` shows it.
    pub name: Arc<str>,
    /// Base name of its executable; the name when it could not be read.
    pub executable: Arc<str>,
}

#[derive(Debug)]
struct Entry {
    name: ProcessName,
    /// From /proc (true) or from a kernel event (a stand-in).
    from_proc: bool,
    last_used_ns: u64,
}

/// Reads a process's names; `None` when the process is gone.
pub type Source = fn(u32) -> Option<ProcessName>;

/// Cache of process names by pid (tgid).
#[derive(Debug)]
pub struct ProcessNames {
    entries: HashMap<u32, Entry>,
    source: Source,
    /// Times the cache was full and started over.
    pub evictions: u64,
    /// Processes named from a kernel event because /proc had them no more.
    pub stand_ins: u64,
}

impl Default for ProcessNames {
    fn default() -> Self {
        Self::new(from_proc)
    }
}

impl ProcessNames {
    pub fn new(source: Source) -> Self {
        Self {
            entries: HashMap::default(),
            source,
            evictions: 0,
            stand_ins: 0,
        }
    }

    /// The name of process `tgid`, given one of its events (thread `tid`
    /// named `comm`) in case /proc no longer has it.
    pub fn get(&mut self, tgid: u32, tid: u32, comm: &Comm, now_ns: u64) -> ProcessName {
        if let Some(e) = self.entries.get_mut(&tgid) {
            e.last_used_ns = now_ns;
            if !e.from_proc && tid == tgid {
                // The main thread's comm is the process's name.
                e.name = stand_in(comm);
            }
            return e.name.clone();
        }
        if self.entries.len() >= MAX_NAMES {
            self.entries.clear();
            self.evictions += 1;
        }
        let (name, from_proc) = match (self.source)(tgid) {
            Some(name) => (name, true),
            None => {
                self.stand_ins += 1;
                (stand_in(comm), false)
            }
        };
        self.entries.insert(
            tgid,
            Entry {
                name: name.clone(),
                from_proc,
                last_used_ns: now_ns,
            },
        );
        name
    }

    /// The process started a new program: its names change.
    pub fn forget(&mut self, tgid: u32) {
        self.entries.remove(&tgid);
    }

    /// Forgets names not used since `now_ns - NAME_TTL_NS`.
    pub fn purge(&mut self, now_ns: u64) {
        let before = now_ns.saturating_sub(NAME_TTL_NS);
        self.entries.retain(|_, e| e.last_used_ns >= before);
    }

    /// Processes cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A name from a kernel event's comm.
fn stand_in(comm: &Comm) -> ProcessName {
    let name: Arc<str> = Arc::from(comm.to_string_lossy());
    ProcessName {
        executable: name.clone(),
        name,
    }
}

/// Reads `/proc/<tgid>/comm` and `/proc/<tgid>/exe`.
pub fn from_proc(tgid: u32) -> Option<ProcessName> {
    from_dir(&Path::new("/proc").join(tgid.to_string()))
}

fn from_dir(dir: &Path) -> Option<ProcessName> {
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let name: Arc<str> = Arc::from(comm.trim_end_matches('\n'));
    // Kernel threads and processes of other users' namespaces may have no
    // readable exe: the name stands in.
    let executable = std::fs::read_link(dir.join("exe"))
        .ok()
        .and_then(|exe| executable_name(&exe.to_string_lossy()))
        .map_or_else(|| name.clone(), Arc::from);
    Some(ProcessName { name, executable })
}

/// The base name of an exe link's target (`/usr/bin/python3.11 (deleted)`
/// after the file was replaced is still `python3.11`).
fn executable_name(target: &str) -> Option<String> {
    let path = target.strip_suffix(" (deleted)").unwrap_or(target);
    let base = path.rsplit('/').next()?;
    (!base.is_empty()).then(|| base.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(s: &str) -> Comm {
        let mut raw = [0u8; 16];
        raw[..s.len()].copy_from_slice(s.as_bytes());
        Comm(raw)
    }

    fn fixed(_: u32) -> Option<ProcessName> {
        Some(ProcessName {
            name: "python3".into(),
            executable: "python3.11".into(),
        })
    }

    fn gone(_: u32) -> Option<ProcessName> {
        None
    }

    #[test]
    fn names_a_live_process_from_proc_not_from_the_thread() {
        let mut names = ProcessNames::new(fixed);
        let n = names.get(40, 41, &comm("event_engine"), 0);
        assert_eq!(&*n.name, "python3");
        assert_eq!(&*n.executable, "python3.11");
        assert_eq!(names.stand_ins, 0);
    }

    #[test]
    fn a_gone_process_is_named_by_its_main_thread_once_one_is_seen() {
        let mut names = ProcessNames::new(gone);
        assert_eq!(&*names.get(40, 41, &comm("worker"), 0).name, "worker");
        assert_eq!(&*names.get(40, 40, &comm("server"), 1).name, "server");
        assert_eq!(&*names.get(40, 42, &comm("worker"), 2).name, "server");
        assert_eq!(names.stand_ins, 1);
    }

    #[test]
    fn exec_and_idleness_forget_a_name_and_the_cache_stays_bounded() {
        let mut names = ProcessNames::new(fixed);
        names.get(1, 1, &comm("a"), 0);
        names.get(2, 2, &comm("b"), NAME_TTL_NS);
        names.forget(2);
        assert_eq!(names.len(), 1);
        names.purge(NAME_TTL_NS + 1);
        assert!(names.is_empty());
        for pid in 0..=MAX_NAMES as u32 {
            names.get(pid, pid, &comm("c"), 0);
        }
        assert_eq!(names.evictions, 1);
        assert!(names.len() <= MAX_NAMES);
    }

    #[test]
    fn reads_this_process_and_strips_deleted_executables() {
        let me = from_proc(std::process::id()).expect("own /proc entry");
        let exe = std::env::current_exe().expect("exe");
        let base = exe.file_name().expect("file name").to_string_lossy().into_owned();
        assert_eq!(&*me.executable, base.as_str());
        // The kernel cuts comm to 15 bytes of the executable's name.
        assert!(base.starts_with(&*me.name), "{} vs {base}", me.name);
        assert_eq!(
            executable_name("/usr/bin/python3.11 (deleted)").as_deref(),
            Some("python3.11")
        );
        assert_eq!(executable_name("/"), None);
        assert!(from_proc(u32::MAX).is_none());
    }
}
