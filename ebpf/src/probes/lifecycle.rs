//! fds that end without a close(): dup2/dup3 onto an fd, close_range, and
//! process exit. Each cleans the maps keyed by (tgid, fd) and sends a Close
//! for every followed fd, so neither side keeps a dead connection that a
//! reused fd would inherit.
use aya_ebpf::{
    EbpfContext, cty::c_void, helpers::generated::bpf_loop, macros::tracepoint, programs::TracePointContext,
};
use meshless_common::Counter;

use super::{arg, conn::forget, current};
use crate::maps::{ARGS, TGIDS, count};

/// Most fds a close_range or an exit sweeps; userspace expires entries of
/// higher fds (`capture::expiry`).
const MAX_SWEEP: u32 = meshless_common::KERNEL_SWEPT_FDS;
/// close_range flag: only set close-on-exec, close nothing.
const CLOSE_RANGE_CLOEXEC: u64 = 1 << 2;

/// True when the process has per-fd state at all (most processes do not).
#[inline(always)]
fn has_state(tgid: u32) -> bool {
    // SAFETY: presence check only.
    unsafe { TGIDS.get(&tgid) }.is_some()
}

#[inline(always)]
fn forget_counted(tgid: u32, tid: u32, fd: u32) {
    if forget(tgid, tid, fd) {
        count(Counter::ImplicitCloses);
    }
}

/// dup2/dup3(oldfd, newfd) closes whatever newfd was.
#[inline(always)]
fn dup_onto(ctx: &TracePointContext) -> u32 {
    let Some((_, tgid, tid)) = current() else {
        return 0;
    };
    if !has_state(tgid) {
        return 0;
    }
    let (old, new) = (arg(ctx, 0) as u32, arg(ctx, 1) as u32);
    if old != new {
        forget_counted(tgid, tid, new);
    }
    0
}

#[tracepoint]
pub fn sys_enter_dup2(ctx: TracePointContext) -> u32 {
    dup_onto(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup3(ctx: TracePointContext) -> u32 {
    dup_onto(&ctx)
}

#[tracepoint]
pub fn sys_enter_close_range(ctx: TracePointContext) -> u32 {
    let Some((_, tgid, tid)) = current() else {
        return 0;
    };
    if !has_state(tgid) || arg(&ctx, 2) & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    let (first, last) = (arg(&ctx, 0) as u32, arg(&ctx, 1) as u32);
    sweep(tgid, tid, first, last);
    0
}

/// What a sweep's bpf_loop callback needs.
#[repr(C)]
struct Sweep {
    tgid: u32,
    tid: u32,
    first: u32,
    last: u32,
}

/// One fd of a sweep; non-zero stops the loop.
extern "C" fn sweep_one(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: ctx is the Sweep on sweep()'s stack, alive for the loop.
    let s = unsafe { &*(ctx as *const Sweep) };
    let fd = s.first as u64 + index;
    if fd > s.last as u64 {
        return 1;
    }
    forget_counted(s.tgid, s.tid, fd as u32);
    0
}

/// Forgets fds first..=last (at most MAX_SWEEP of them). bpf_loop keeps
/// the verifier's work to one pass over the body, whatever the count.
#[inline(always)]
fn sweep(tgid: u32, tid: u32, first: u32, last: u32) {
    let mut ctx = Sweep { tgid, tid, first, last };
    // SAFETY: the callback only reads ctx, which outlives the call.
    unsafe {
        bpf_loop(MAX_SWEEP, sweep_one as *mut c_void, (&mut ctx as *mut Sweep).cast(), 0);
    }
}

/// Offset of `group_dead` in sched:sched_process_exit's record
/// (/sys/kernel/tracing/events/sched/sched_process_exit/format).
const GROUP_DEAD: usize = 32;

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Some((id, tgid, tid)) = current() else {
        return 0;
    };
    // Every exiting thread: its syscall-arguments slot goes with it.
    let _ = ARGS.remove(&id);
    if !has_state(tgid) {
        return 0;
    }
    // SAFETY: a fixed offset inside the tracepoint record.
    let group_dead: u8 = unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(GROUP_DEAD)) };
    if group_dead == 0 {
        return 0;
    }
    sweep(tgid, tid, 0, MAX_SWEEP - 1);
    let _ = TGIDS.remove(&tgid);
    0
}
