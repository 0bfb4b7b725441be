//! Go binaries: whether a process can link by goroutine, and the uprobes
//! that make it possible (see ebpf/src/golang.rs for the kernel side).
//!
//! A Go executable links by goroutine when it is amd64, built by Go >= 1.18
//! (register ABI, inline build info) and its symbol table names
//! `runtime.goexit1` (and, when it has an HTTP/1 client,
//! `persistConn.roundTrip` + `Request.write`). Stripped binaries
//! (`-ldflags=-s`) have no symbol table: they keep the per-process policy.
//! Uprobes are attached once per executable file (device + inode) through
//! `/proc/<pid>/exe`, which also reaches binaries in other mount namespaces.
use std::{
    ffi::CString,
    fs::File,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::ProgramFd,
    Ebpf,
};
use meshless_common::{GoCounter, GO_COUNTERS_MAP, GO_PENDING_MAP, GO_POINTER_MAPS, GO_UPROBES};
use object::{Object, ObjectSection};
use tracing::{debug, info, warn};

use crate::uprobe::{file_offset, load_program, Pmu, UprobeError};

/// Why the Go uprobes cannot be used (Go processes then link per process).
#[derive(Debug, thiserror::Error)]
pub enum GoError {
    #[error(transparent)]
    Uprobe(#[from] UprobeError),
    #[error("map {0} is missing from the eBPF object or has another layout (rebuild)")]
    Map(&'static str),
}

/// What an executable is, for linking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binary {
    /// Not a Go executable.
    NotGo,
    /// A Go executable whose goroutines cannot be followed (why).
    GoWithout(&'static str),
    /// A Go executable with the symbols' file offsets (in `GO_UPROBES` order;
    /// `None` when the binary has no HTTP/1 client).
    Go { version: String, offsets: [Option<u64>; 3] },
}

/// Userspace view of the kernel's `GoKey` (tgid, Go pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GoKey {
    tgid: u32,
    _pad: u32,
    ptr: u64,
}
// SAFETY: plain integers, explicit padding.
unsafe impl aya::Pod for GoKey {}
/// The kernel's `GoCtx` (trace context, fd, time, request), never read here.
type GoCtx = [u8; 64];

/// Executables with uprobes attached at most; beyond it Go processes keep
/// the per-process policy (counted in the log).
const MAX_BINARIES: usize = 256;

/// The loaded uprobe programs and the executables they are attached to.
pub struct GoProbes {
    programs: Vec<ProgramFd>,
    pmu: Pmu,
    /// (device, inode) → attached (perf event fds, closed on drop) or not.
    binaries: foldhash::HashMap<(u64, u64), Option<Vec<OwnedFd>>>,
    over_limit: u64,
    counters: Option<PerCpuArray<MapData, u64>>,
    last_counts: Vec<u64>,
    last_log: std::time::Instant,
    by_pointer: Vec<BpfHashMap<MapData, GoKey, GoCtx>>,
    pending: BpfHashMap<MapData, u64, GoCtx>,
}

impl GoProbes {
    /// Loads (verifies) the uprobe programs; attaching happens per binary.
    pub fn load(ebpf: &mut Ebpf) -> Result<GoProbes, GoError> {
        let mut programs = Vec::new();
        for (name, _) in GO_UPROBES {
            programs.push(load_program(ebpf, name)?);
        }
        let pmu = Pmu::read()?;
        let counters = ebpf
            .take_map(GO_COUNTERS_MAP)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        let mut by_pointer = Vec::new();
        for name in GO_POINTER_MAPS {
            let map = ebpf.take_map(name).ok_or(GoError::Map(name))?;
            by_pointer.push(BpfHashMap::try_from(map).map_err(|_| GoError::Map(name))?);
        }
        let pending = ebpf
            .take_map(GO_PENDING_MAP)
            .and_then(|m| BpfHashMap::try_from(m).ok())
            .ok_or(GoError::Map(GO_PENDING_MAP))?;
        Ok(GoProbes {
            programs,
            pmu,
            binaries: foldhash::HashMap::default(),
            over_limit: 0,
            counters,
            last_counts: Vec::new(),
            last_log: std::time::Instant::now(),
            by_pointer,
            pending,
        })
    }

    /// True when process `tgid` runs a Go executable whose uprobes are
    /// attached (attaching them now if this is the first such process).
    /// Entries an earlier program of this pid left behind (exec keeps the
    /// pid and runs no goroutine exits) are removed first: a new program's
    /// goroutine at the same address must not inherit them.
    pub fn follow(&mut self, tgid: u32) -> bool {
        let ok = self.attached(tgid);
        if ok {
            self.forget(tgid);
        }
        ok
    }

    /// Removes every Go entry of `tgid`.
    fn forget(&mut self, tgid: u32) {
        for map in &mut self.by_pointer {
            let keys: Vec<GoKey> = map.keys().flatten().filter(|k| k.tgid == tgid).collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
        let keys: Vec<u64> = self
            .pending
            .keys()
            .flatten()
            .filter(|k| (k >> 32) as u32 == tgid)
            .collect();
        for key in keys {
            let _ = self.pending.remove(&key);
        }
    }

    fn attached(&mut self, tgid: u32) -> bool {
        let exe = format!("/proc/{tgid}/exe");
        let Ok(meta) = std::fs::metadata(&exe) else {
            return false;
        };
        let id = (meta.dev(), meta.ino());
        if let Some(done) = self.binaries.get(&id) {
            return done.is_some();
        }
        if self.binaries.len() >= MAX_BINARIES {
            self.over_limit += 1;
            if self.over_limit.is_power_of_two() {
                warn!(
                    pid = tgid,
                    limit = MAX_BINARIES,
                    skipped = self.over_limit,
                    "too many Go executables: this one links per process"
                );
            }
            return false;
        }
        let attached = match inspect(Path::new(&exe)) {
            Binary::Go { version, offsets } => match self.attach(&exe, &offsets) {
                Ok(fds) => {
                    info!(pid = tgid, %version, uprobes = fds.len(), "Go executable: linking by goroutine");
                    Some(fds)
                }
                Err(error) => {
                    warn!(pid = tgid, %error, "Go uprobes not attached: this executable links per process");
                    None
                }
            },
            Binary::GoWithout(why) => {
                info!(pid = tgid, why, "Go executable links per process");
                None
            }
            Binary::NotGo => None,
        };
        let ok = attached.is_some();
        self.binaries.insert(id, attached);
        ok
    }

    /// Attaches every program whose symbol the binary has.
    fn attach(&self, exe: &str, offsets: &[Option<u64>; 3]) -> std::io::Result<Vec<OwnedFd>> {
        let path = CString::new(exe).map_err(std::io::Error::other)?;
        let mut fds = Vec::new();
        for (program, offset) in self.programs.iter().zip(offsets) {
            if let Some(offset) = offset {
                fds.push(self.pmu.attach(&path, *offset, false, program)?);
            }
        }
        Ok(fds)
    }

    /// Logs the Go counters when they changed (uprobe hits, links made),
    /// at most every few seconds.
    pub fn log_counters(&mut self) {
        let Some(map) = &self.counters else {
            return;
        };
        if self.last_log.elapsed() < std::time::Duration::from_secs(5) {
            return;
        }
        self.last_log = std::time::Instant::now();
        let counts: Vec<u64> = GoCounter::ALL
            .iter()
            .map(|(c, _)| map.get(&(*c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect();
        if counts != self.last_counts {
            let text: Vec<String> = GoCounter::ALL
                .iter()
                .zip(&counts)
                .map(|((_, name), v)| format!("{name}={v}"))
                .collect();
            info!("go linking counters {}", text.join(" "));
            self.last_counts = counts;
        }
    }
}

/// Reads what linking needs to know from an executable.
pub fn inspect(exe: &Path) -> Binary {
    let Ok(file) = File::open(exe) else {
        return Binary::NotGo;
    };
    // SAFETY: a read-only private mapping (see propagation::memmap_file).
    let Ok(map) = (unsafe { crate::propagation::memmap_file(&file) }) else {
        return Binary::NotGo;
    };
    let Ok(elf) = object::File::parse(&*map) else {
        return Binary::NotGo;
    };
    let Some(info) = elf.section_by_name(".go.buildinfo") else {
        return Binary::NotGo;
    };
    if elf.architecture() != object::Architecture::X86_64 {
        return Binary::GoWithout("not amd64 (the goroutine register is only known for amd64)");
    }
    let Some(version) = info.data().ok().and_then(go_version) else {
        return Binary::GoWithout("built by Go older than 1.18 (no register ABI guarantee)");
    };
    let object::File::Elf64(elf64) = &elf else {
        return Binary::NotGo;
    };
    // Read in chunks, not walked in the mapping: a Go `.symtab` and its
    // strings are megabytes the walk would make resident (elf_symbols).
    let found = crate::elf_symbols::scan(
        &file,
        elf64,
        crate::elf_symbols::Table::Static,
        &GO_UPROBES.map(|(_, s)| s),
    )
    .unwrap_or_default();
    let offsets = found.map(|s| {
        s.and_then(|s| file_offset(&elf, s.address))
            .map(|at| at + past_stack_check(&map, at))
    });
    match offsets {
        [None, ..] => Binary::GoWithout("no symbol table (stripped) or no runtime.goexit1"),
        [Some(_), Some(_), None] | [Some(_), None, Some(_)] => Binary::GoWithout("net/http client symbols incomplete"),
        _ => {
            debug!(?offsets, "Go uprobe offsets");
            Binary::Go { version, offsets }
        }
    }
}

/// Where a uprobe goes in a Go function whose code starts at file offset
/// `at`: on the conditional jump of the stack-bound check, when the
/// prologue is the usual one, else on the first instruction.
///
/// Why: a uprobe on most instructions single-steps a copy of it, and the
/// debug trap that follows makes the hypervisor step in on VMs (measured
/// here: ~28 µs per hit on the first instruction); the kernel emulates
/// jumps instead (no single step). The checked registers (R14 = g, RAX,
/// RBX) are unchanged by the compare before the jump.
pub fn past_stack_check(code: &[u8], at: u64) -> u64 {
    let Some(c) = usize::try_from(at).ok().and_then(|at| code.get(at..)) else {
        return 0;
    };
    // CMPQ SP, 0x10(R14)
    let cmp_sp: &[u8] = &[0x49, 0x3b, 0x66, 0x10];
    // CMPQ R12, 0x10(R14) after LEAQ -n(SP), R12 (disp32 or disp8)
    let cmp_r12: &[u8] = &[0x4d, 0x3b, 0x66, 0x10];
    let jump_at = if c.starts_with(cmp_sp) {
        4
    } else if c.starts_with(&[0x4c, 0x8d, 0xa4, 0x24]) && c.get(8..12) == Some(cmp_r12) {
        12
    } else if c.starts_with(&[0x4c, 0x8d, 0x64, 0x24]) && c.get(5..9) == Some(cmp_r12) {
        9
    } else {
        return 0;
    };
    // JBE rel8 or JBE rel32
    match (c.get(jump_at), c.get(jump_at + 1)) {
        (Some(0x76), _) | (Some(0x0f), Some(0x86)) => jump_at as u64,
        _ => 0,
    }
}

/// The Go version in a `.go.buildinfo` section of Go >= 1.18 (strings
/// inline: flags bit 2), else None.
pub fn go_version(data: &[u8]) -> Option<String> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if !data.starts_with(MAGIC) || data.len() < 33 || data[15] & 2 == 0 {
        return None;
    }
    let (len, used) = uvarint(&data[32..])?;
    let start = 32 + used;
    let text = data.get(start..start.checked_add(usize::try_from(len).ok()?)?)?;
    let version = std::str::from_utf8(text).ok()?;
    version.starts_with("go").then(|| version.to_owned())
}

fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in b.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buildinfo(flags: u8, version: &str) -> Vec<u8> {
        let mut b = b"\xff Go buildinf:".to_vec();
        b.extend([8, flags]);
        b.resize(32, 0);
        b.push(version.len() as u8);
        b.extend(version.as_bytes());
        b
    }

    #[test]
    fn reads_the_go_version_of_inline_build_info() {
        assert_eq!(go_version(&buildinfo(2, "go1.26.8")).as_deref(), Some("go1.26.8"));
    }

    #[test]
    fn pointer_build_info_of_go_before_1_18_gives_no_version() {
        assert_eq!(go_version(&buildinfo(0, "go1.16")), None);
        assert_eq!(go_version(b"not build info at all, long enough to be read"), None);
        assert_eq!(go_version(&buildinfo(2, "go1.2")[..34]), None);
    }

    #[test]
    fn uprobes_go_on_the_jump_of_go_stack_checks() {
        // runtime.goexit1 (go1.26): CMPQ SP, 0x10(R14); JBE rel32; PUSHQ BP
        let small = [0x49, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x8c, 0, 0, 0, 0x55];
        assert_eq!(past_stack_check(&small, 0), 4);
        // Request.write: LEAQ -0x120(SP), R12; CMPQ R12, 0x10(R14); JBE rel32
        let big = [
            0x4c, 0x8d, 0xa4, 0x24, 0xe0, 0xfe, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86, 0x0a, 0x0e, 0, 0,
        ];
        let mut at_100 = vec![0x90; 100];
        at_100.extend(big);
        assert_eq!(past_stack_check(&at_100, 100), 12);
        let byte_disp = [0x4c, 0x8d, 0x64, 0x24, 0xd8, 0x4d, 0x3b, 0x66, 0x10, 0x76, 0x20];
        assert_eq!(past_stack_check(&byte_disp, 0), 9);
    }

    #[test]
    fn uprobes_stay_on_the_entry_of_unknown_prologues() {
        assert_eq!(past_stack_check(&[0x55, 0x48, 0x89, 0xe5], 0), 0);
        assert_eq!(past_stack_check(&[0x49, 0x3b, 0x66, 0x10, 0x90], 0), 0);
        assert_eq!(past_stack_check(&[0x49, 0x3b], 0), 0);
        assert_eq!(past_stack_check(&[0x49, 0x3b, 0x66, 0x10, 0x76], 99), 0);
    }

    #[test]
    fn this_test_binary_is_not_go() {
        let exe = std::env::current_exe().expect("exe");
        assert_eq!(inspect(&exe), Binary::NotGo);
    }
}
