//! One file per hook family.
pub mod conn;
pub mod data;
pub mod go;
pub mod lifecycle;
pub mod sockops;
pub mod tls;
pub mod tls_go;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_ancestor_cgroup_id},
};

use crate::maps::{agent_tgid, scope};

/// Syscall argument `n` of a `sys_enter_*` tracepoint, read by dereferencing
/// the context (arguments start at byte 16, 8 bytes each).
#[inline(always)]
pub fn arg<C: EbpfContext>(ctx: &C, n: usize) -> u64 {
    // SAFETY: the verifier bounds-checks context accesses; offsets come from
    // /sys/kernel/tracing/events/syscalls/sys_enter_*/format.
    unsafe { *(ctx.as_ptr() as *const u64).add(2 + n) }
}

/// Return value of a `sys_exit_*` tracepoint.
#[inline(always)]
pub fn ret<C: EbpfContext>(ctx: &C) -> i64 {
    // SAFETY: `ret` is at byte 16 of every sys_exit_* record.
    unsafe { *(ctx.as_ptr() as *const i64).add(2) }
}

/// (pid_tgid, tgid, tid) of the current task, or None for the agent itself.
#[inline(always)]
pub fn current() -> Option<(u64, u32, u32)> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    if tgid == agent_tgid() {
        return None;
    }
    let (scope_id, level) = scope();
    // SAFETY: helper with a plain integer argument.
    if scope_id != 0 && unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) } != scope_id {
        return None;
    }
    Some((id, tgid, id as u32))
}
