//! Loading and attaching the kernel programs.
use aya::{
    maps::{HashMap, MapData, PerCpuArray, ProgramArray},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use meshless_common::{
    Counter, FdVerdict, KernelOffsets, AGENT_TGID_GLOBAL, COUNTERS_MAP, EVENTS_MAP, KERNEL_OFFSETS_GLOBAL,
    PROPAGATION_GLOBAL, SCOPE_CGROUP_GLOBAL, SCOPE_LEVEL_GLOBAL, VERDICTS_MAP, WAKEUP_BYTES_GLOBAL,
};
use tracing::{info, warn};

use super::{
    btf::Btf,
    preflight::{self, PreflightError},
};

/// The eBPF object built by build.rs from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshless.bpf.o"));

/// Every tracepoint program: (program name, category, tracepoint).
pub const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_read", "syscalls", "sys_enter_read"),
    ("sys_exit_read", "syscalls", "sys_exit_read"),
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    ("sys_exit_write", "syscalls", "sys_exit_write"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv"),
    ("sys_exit_readv", "syscalls", "sys_exit_readv"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev"),
    ("sys_exit_writev", "syscalls", "sys_exit_writev"),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("sys_exit_sendto", "syscalls", "sys_exit_sendto"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("sys_exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("sys_exit_sendmsg", "syscalls", "sys_exit_sendmsg"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("sys_exit_recvmsg", "syscalls", "sys_exit_recvmsg"),
    ("sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64"),
    ("sys_exit_sendfile64", "syscalls", "sys_exit_sendfile64"),
    ("sys_enter_accept4", "syscalls", "sys_enter_accept4"),
    ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("sys_enter_accept", "syscalls", "sys_enter_accept"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sys_enter_dup2", "syscalls", "sys_enter_dup2"),
    ("sys_enter_dup3", "syscalls", "sys_enter_dup3"),
    ("sys_enter_close_range", "syscalls", "sys_enter_close_range"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("sched_process_exec", "sched", "sched_process_exec"),
];

/// Why loading failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("loading the eBPF object failed: {0}; is this a Linux >= 5.8 kernel with BPF ring buffers?")]
    Object(#[source] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object (build mismatch: rebuild with `cargo build`)")]
    MissingProgram(&'static str),
    #[error("the kernel rejected program {name}: {detail}{hint}")]
    Program {
        name: &'static str,
        /// The error with a long verifier log cut to its last lines.
        detail: String,
        hint: &'static str,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Expiry(#[from] super::expiry::ExpiryError),
    #[error("ring buffer {EVENTS_MAP}: {0}")]
    Ring(#[from] crate::ringbuf::RingError),
}

/// Loaded programs and the maps userspace reads. Dropping it detaches all.
pub struct Probes {
    pub events: crate::ringbuf::Ring,
    pub counters: PerCpuArray<MapData, u64>,
    /// "Socket or not" verdicts userspace writes for fds the kernel could
    /// not classify itself (see `capture::confirm`).
    pub verdicts: HashMap<MapData, u64, FdVerdict>,
    /// Userspace expiry of per-fd kernel state (see `capture::expiry`).
    pub expiry: super::expiry::Expiry,
    /// Owns the programs and their links; dropping it detaches everything.
    pub ebpf: Ebpf,
}

/// Options for loading.
pub struct LoadOptions {
    pub ringbuf_bytes: u32,
    pub wakeup_bytes: u64,
    /// Trace context goes into TCP options (the sock_ops program is attached).
    pub propagation: bool,
    /// (cgroup id, level) of the capture scope; id 0 traces everything.
    pub scope: (u64, u32),
}

pub fn load(opts: &LoadOptions) -> Result<Probes, LoadError> {
    let tps: Vec<(&str, &str)> = TRACEPOINTS.iter().map(|(_, c, n)| (*c, *n)).collect();
    preflight::check(&tps)?;
    let tgid = std::process::id();
    let offsets = kernel_offsets();
    crate::resident::release("kernel BTF read");
    let propagation = u32::from(opts.propagation);
    let mut loader = EbpfLoader::new();
    if !has_core_relocations(OBJECT) {
        // aya parsed the kernel's BTF for CO-RE relocations this object
        // has none of (kernel offsets come from `kernel_offsets` instead):
        // dropped before the object is parsed, not held through it.
        loader.btf(None);
        crate::resident::release("kernel BTF copy of aya dropped");
    }
    let mut ebpf = loader
        .override_global(AGENT_TGID_GLOBAL, &tgid, true)
        .override_global(KERNEL_OFFSETS_GLOBAL, &offsets, true)
        .override_global(WAKEUP_BYTES_GLOBAL, &opts.wakeup_bytes, true)
        .override_global(PROPAGATION_GLOBAL, &propagation, true)
        .override_global(SCOPE_CGROUP_GLOBAL, &opts.scope.0, true)
        .override_global(SCOPE_LEVEL_GLOBAL, &opts.scope.1, true)
        .map_max_entries(EVENTS_MAP, opts.ringbuf_bytes)
        .load(OBJECT)
        .map_err(LoadError::Object)?;
    crate::resident::release("eBPF object loaded");
    load_tail_calls(&mut ebpf)?;
    for (name, category, tracepoint) in TRACEPOINTS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(|source| program_error(name, source))?;
        let started = std::time::Instant::now();
        program.load().map_err(|source| program_error(name, source))?;
        tracing::debug!(program = name, ms = started.elapsed().as_millis() as u64, "verified");
        program
            .attach(category, tracepoint)
            .map_err(|source| program_error(name, source))?;
    }
    crate::resident::release("programs verified");
    let expiry = super::expiry::Expiry::open(&ebpf)?;
    let events = ebpf.take_map(EVENTS_MAP).ok_or(LoadError::MissingMap(EVENTS_MAP))?;
    let events = crate::ringbuf::Ring::new(events, opts.ringbuf_bytes)?;
    let counters = take_map(&mut ebpf, COUNTERS_MAP)?;
    let verdicts = take_map(&mut ebpf, VERDICTS_MAP)?;
    Ok(Probes {
        events,
        counters,
        verdicts,
        expiry,
        ebpf,
    })
}

/// Offsets for the kernel-side socket check, or `valid == 0` (the probes
/// then ask userspace to confirm sockets) when BTF is unavailable.
fn kernel_offsets() -> KernelOffsets {
    match Btf::from_sys_fs().and_then(|btf| btf.kernel_offsets()) {
        Ok(offsets) => {
            info!("kernel-side socket checks on (struct offsets from BTF)");
            offsets
        }
        Err(error) => {
            warn!(%error, "kernel-side socket checks off: non-socket fds are confirmed from /proc instead");
            KernelOffsets::default()
        }
    }
}

/// True when the object's `.BTF.ext` lists CO-RE relocations (aya then
/// needs the kernel's BTF to apply them); true too when it cannot tell.
fn has_core_relocations(object: &[u8]) -> bool {
    use object::{Object, ObjectSection};
    let Ok(elf) = object::File::parse(object) else {
        return true;
    };
    let Some(ext) = elf.section_by_name(".BTF.ext").and_then(|s| s.data().ok()) else {
        return false;
    };
    // btf_ext_header: magic u16, version u8, flags u8, hdr_len u32, then
    // (offset, length) u32 pairs of func_info, line_info, core_relo.
    let u32_at = |at: usize| {
        ext.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    match (ext.get(..2), u32_at(4)) {
        (Some([0x9f, 0xeb]), Some(hdr_len)) if hdr_len < 32 => false,
        (Some([0x9f, 0xeb]), Some(_)) => u32_at(28).is_none_or(|len| len != 0),
        _ => true,
    }
}

/// Tail-called programs: (program, program array, slot).
const TAIL_CALLS: &[(&str, &str, u32)] = &[
    ("meshless_server_ctx", "SERVER_CTX", meshless_common::TAIL_SERVER_CTX),
    ("meshless_h2_walk", "SERVER_CTX", meshless_common::TAIL_H2_WALK),
];

/// Loads the programs the tracepoints tail-call and puts them in their slots.
fn load_tail_calls(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    for (name, array, slot) in TAIL_CALLS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram(name))?
            .try_into()
            .map_err(|source| program_error(name, source))?;
        program.load().map_err(|source| program_error(name, source))?;
        let fd = program
            .fd()
            .map_err(|source| program_error(name, source))?
            .try_clone()
            .map_err(|e| LoadError::Program {
                name,
                detail: e.to_string(),
                hint: "",
            })?;
        let map = ebpf.map_mut(array).ok_or(LoadError::MissingMap(array))?;
        let mut programs = ProgramArray::try_from(map).map_err(|source| LoadError::Map { name: array, source })?;
        programs
            .set(*slot, &fd, 0)
            .map_err(|source| LoadError::Map { name: array, source })?;
    }
    Ok(())
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    M::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// Lines of the verifier log kept in the error (the reason is at the end).
const VERIFIER_TAIL: usize = 12;

fn program_error(name: &'static str, source: aya::programs::ProgramError) -> LoadError {
    let text = source.to_string();
    let lines: Vec<&str> = text.lines().collect();
    let detail = if lines.len() > VERIFIER_TAIL {
        format!(
            "{}\n  [... verifier log cut ...]\n{}",
            lines[0],
            lines[lines.len() - VERIFIER_TAIL..].join("\n")
        )
    } else {
        text.clone()
    };
    let hint =
        if text.contains("EPERM") || text.contains("PermissionDenied") || text.contains("Operation not permitted") {
            " (permission denied: run as root or grant CAP_BPF and CAP_PERFMON)"
        } else if text.contains("Verifier output") {
            "\n(the verifier's last lines above say why; please report it with your kernel version)"
        } else {
            ""
        };
    LoadError::Program { name, detail, hint }
}

/// Sums the per-CPU kernel counters.
pub fn read_counters(map: &PerCpuArray<MapData, u64>) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .map(|(c, name)| {
            let total = map.get(&(*c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
            (*name, total)
        })
        .collect()
}

/// The highest ring-buffer fill (bytes) any CPU saw since the last call,
/// which also resets it.
pub fn take_ringbuf_high_water(map: &mut PerCpuArray<MapData, u64>) -> u64 {
    let slot = Counter::RingbufHighWater as u32;
    let high = map
        .get(&slot, 0)
        .map(|v| v.iter().copied().max().unwrap_or(0))
        .unwrap_or(0);
    if let Ok(cpus) = aya::util::nr_cpus() {
        if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; cpus]) {
            let _ = map.set(slot, zeros, 0);
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_object_has_no_core_relocations_so_the_kernel_btf_copy_of_aya_is_not_kept() {
        assert!(!has_core_relocations(OBJECT));
    }

    #[test]
    fn an_object_that_cannot_be_read_is_taken_to_need_the_kernel_btf() {
        assert!(has_core_relocations(b"not an ELF file"));
    }
}
