//! Uprobes by file offset, shared by the Go linking probes and the TLS
//! probes: loading the programs, the uprobe PMU, `perf_event_open`, and
//! which x86-64 instructions the kernel emulates at a probe.
//!
//! Why the instruction matters: a uprobe replaces an instruction with a
//! breakpoint; unless the kernel emulates the instruction it executes a
//! copy out of line with a single step, and on VMs the debug trap of that
//! step exits to the hypervisor (~28 µs per hit here, docs/tls.md). The
//! kernel (arch/x86/kernel/uprobes.c) emulates relative jumps and calls,
//! conditional jumps, `push reg` and NOPs: probes belong on those.
use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::{
    programs::{ProgramFd, UProbe},
    Ebpf,
};
use object::{Object, ObjectSection};

/// Why uprobe programs cannot be loaded or attached at all.
#[derive(Debug, thiserror::Error)]
pub enum UprobeError {
    #[error("program {0} is missing from the eBPF object (rebuild)")]
    MissingProgram(&'static str),
    #[error("loading uprobe program {name}: {detail}")]
    Load { name: &'static str, detail: String },
    #[error("reading {path}: {detail}; is CONFIG_UPROBE_EVENTS on?")]
    Pmu { path: &'static str, detail: String },
}

const UPROBE_TYPE: &str = "/sys/bus/event_source/devices/uprobe/type";
const UPROBE_RETPROBE: &str = "/sys/bus/event_source/devices/uprobe/format/retprobe";

/// Loads (verifies) a uprobe program and returns its fd (attached later
/// by fd, see [`Pmu::attach`]).
pub fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<ProgramFd, UprobeError> {
    let fail = |detail: String| UprobeError::Load { name, detail };
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .ok_or(UprobeError::MissingProgram(name))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| fail(e.to_string()))?;
    program.load().map_err(|e| fail(e.to_string()))?;
    program
        .fd()
        .map_err(|e| fail(e.to_string()))?
        .try_clone()
        .map_err(|e| fail(e.to_string()))
}

/// The kernel's uprobe PMU (perf event type and the return-probe bit).
#[derive(Debug, Clone, Copy)]
pub struct Pmu {
    kind: u32,
    /// `config` bit that makes a uprobe a return probe.
    retprobe: u64,
}

impl Pmu {
    pub fn read() -> Result<Pmu, UprobeError> {
        let kind = read_sysfs(UPROBE_TYPE)?.parse::<u32>().map_err(|e| UprobeError::Pmu {
            path: UPROBE_TYPE,
            detail: e.to_string(),
        })?;
        let bit = read_sysfs(UPROBE_RETPROBE)?;
        let retprobe = bit
            .strip_prefix("config:")
            .and_then(|b| b.parse::<u32>().ok())
            .filter(|b| *b < 64)
            .map(|b| 1u64 << b)
            .ok_or(UprobeError::Pmu {
                path: UPROBE_RETPROBE,
                detail: format!("unexpected format `{bit}`"),
            })?;
        Ok(Pmu { kind, retprobe })
    }

    /// A uprobe (or return probe) at `offset` of the file `path` for
    /// every process, running `program`. aya's `UProbe::attach` needs the
    /// program mutably inside the `Ebpf`, which the wiring keeps; this
    /// attaches by fd instead. The probe lives as long as the returned fd.
    pub fn attach(
        &self,
        path: &CString,
        offset: u64,
        is_return: bool,
        program: &ProgramFd,
    ) -> std::io::Result<OwnedFd> {
        let attr = PerfEventAttr {
            kind: self.kind,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: if is_return { self.retprobe } else { 0 },
            config1: path.as_ptr() as u64,
            config2: offset,
            ..Default::default()
        };
        // SAFETY: a valid attr and path that outlive the call; pid -1 with
        // cpu 0 means every process (the BPF program runs on any CPU).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1 as libc::pid_t,
                0 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd this function owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let prog = program.as_fd().as_raw_fd();
        // SAFETY: ioctls on the perf event fd with the documented arguments.
        unsafe {
            if libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog) != 0
                || libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(event)
    }
}

fn read_sysfs(path: &'static str) -> Result<String, UprobeError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| UprobeError::Pmu {
            path,
            detail: e.to_string(),
        })
}

/// perf_event_attr up to PERF_ATTR_SIZE_VER5 (what a uprobe needs).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// uprobe_path
    config1: u64,
    /// probe_offset
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// _IOW('$', 8, u32) and _IO('$', 0).
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// The file offset of a virtual address (uprobes are placed by offset).
pub fn file_offset(elf: &object::File, addr: u64) -> Option<u64> {
    elf.sections().find_map(|s| {
        let (start, size) = (s.address(), s.size());
        let (offset, _) = s.file_range()?;
        (addr >= start && addr < start + size).then(|| addr - start + offset)
    })
}

/// `endbr64`, which CET-enabled builds put first in every function.
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Length of the instruction at the start of `code` when the kernel
/// emulates it for a uprobe (no single step), else None. Only the kinds
/// found at the places this agent probes are recognised: `push reg`,
/// relative `call`/`jmp`, conditional jumps and NOPs.
pub fn emulated(code: &[u8]) -> Option<usize> {
    match code {
        [0x50..=0x57, ..] => Some(1),
        [0x41, 0x50..=0x57, ..] => Some(2),
        [0x90, ..] => Some(1),
        [0xe8 | 0xe9, _, _, _, _, ..] => Some(5),
        [0xeb | 0x70..=0x7f, _, ..] => Some(2),
        [0x0f, 0x80..=0x8f, _, _, _, _, ..] => Some(6),
        _ => None,
    }
}

/// Skips a leading `endbr64` (not itself emulated, and never needed at
/// the probe: it only marks an indirect-branch target).
pub fn past_endbr(code: &[u8]) -> usize {
    if code.starts_with(&ENDBR64) {
        ENDBR64.len()
    } else {
        0
    }
}

/// Where `call rel32` at file offset `at` (5 bytes in `code`) goes, as a
/// file offset (same section: relative calls do not leave `.text`).
pub fn call_target(code: &[u8], at: usize) -> Option<usize> {
    let [0xe8, a, b, c, d] = *code.get(at..at.checked_add(5)?)? else {
        return None;
    };
    let rel = i32::from_le_bytes([a, b, c, d]) as i64;
    let target = (at as i64).checked_add(5)?.checked_add(rel)?;
    usize::try_from(target).ok().filter(|t| *t < code.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_relative_branches_and_nops_count_as_emulated_and_stack_arithmetic_does_not() {
        assert_eq!(emulated(&[0x53]), Some(1));
        assert_eq!(emulated(&[0x41, 0x55, 0x41]), Some(2));
        assert_eq!(emulated(&[0xe8, 1, 2, 3, 4]), Some(5));
        assert_eq!(emulated(&[0x7e, 0x03]), Some(2));
        assert_eq!(emulated(&[0x0f, 0x86, 0, 0, 0, 0]), Some(6));
        assert_eq!(emulated(&[0x48, 0x83, 0xec, 0x18]), None, "sub $0x18,%rsp");
        assert_eq!(emulated(&[0xc3]), None, "ret");
        assert_eq!(emulated(&[0xe8, 1, 2]), None, "truncated call");
    }

    #[test]
    fn a_relative_call_resolves_to_a_file_offset_inside_the_code() {
        let mut code = vec![0x90; 32];
        // call at 16 to 4: rel = 4 - 21 = -17
        code[16..21].copy_from_slice(&[0xe8, 0xef, 0xff, 0xff, 0xff]);
        assert_eq!(call_target(&code, 16), Some(4));
        assert_eq!(call_target(&code, 15), None, "not a call");
        code[16..21].copy_from_slice(&[0xe8, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(call_target(&code, 16), None, "outside the file");
        assert_eq!(past_endbr(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55]), 4);
        assert_eq!(past_endbr(&[0x55]), 0);
    }
}
