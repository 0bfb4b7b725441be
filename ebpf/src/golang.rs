//! Goroutine-exact linking for Go processes (`LinkPolicy::Goroutine`).
//!
//! Go runs goroutines on any thread, so a thread says nothing about which
//! request is being served. Go's register ABI (Go >= 1.17, amd64) keeps the
//! running goroutine's `g` in R14 in Go code, and `internal/runtime/syscall`
//! enters the kernel without touching it: the user registers saved at
//! syscall entry name the goroutine that made the syscall.
//! - The goroutine that reads a request head serves it (net/http HTTP/1
//!   runs the handler on the goroutine that read the request).
//! - net/http's keep-alive background read takes the next request's first
//!   byte on another goroutine: that byte fixes the request's context
//!   (`GO_PENDING`), the goroutine that reads the rest serves it.
//! - `http.Transport` writes requests on its write-loop goroutine; the
//!   uprobes in `probes::go` carry the caller goroutine's context there.
//! - Anything uncertain (no entry, stale entry) gives no link.
use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
};
use meshless_common::{CTX_VALID, GoCounter, LINK_POLICY_MASK, LinkPolicy, TraceCtx};

use crate::maps::{
    GO_COUNTERS, GO_PENDING, GO_SERVING, GO_WRITERS, GoCtx, GoKey, LINK_POLICY, READERS, Reader, conn_key,
};

/// A serving entry untouched for this long is not trusted any more.
pub const STALE_NS: u64 = 30 * 1_000_000_000;
/// Longest time from `persistConn.roundTrip` to the write loop's write of
/// the same request; an older hand-off belongs to a request never written.
pub const HANDOFF_NS: u64 = 5 * 1_000_000_000;

pub fn go_count(counter: GoCounter) {
    if let Some(slot) = GO_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// The goroutine (`g`) of the current thread's syscall: R14 of the user
/// registers saved at syscall entry. 0 when unknown.
#[inline(always)]
pub fn current_g() -> u64 {
    // SAFETY: BTF helpers; the verifier checks the pt_regs load (a
    // PTR_TO_BTF_ID access, no bpf_probe_read_kernel).
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const aya_ebpf::bindings::pt_regs;
        if regs.is_null() {
            return 0;
        }
        (*regs).r14
    }
}

/// True when `tgid` links by goroutine.
#[inline(always)]
pub fn goroutine_policy(tgid: u32) -> bool {
    // SAFETY: copied out at once.
    unsafe { LINK_POLICY.get(&tgid) }.is_some_and(|p| p & LINK_POLICY_MASK == LinkPolicy::Goroutine as u32)
}

#[inline(always)]
fn fresh(c: &GoCtx, now: u64) -> bool {
    c.ctx.flags & CTX_VALID != 0 && now.saturating_sub(c.ktime_ns) < STALE_NS
}

/// The context the current goroutine writes a request under: the parent
/// `Request.write` left for it (taken), else the request it serves.
#[inline(never)]
pub fn parent(tgid: u32, now: u64, out: &mut TraceCtx) -> u32 {
    let g = current_g();
    if g == 0 {
        return 0;
    }
    let key = GoKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out at once.
    if let Some(w) = unsafe { GO_WRITERS.get(&key) }.copied() {
        let _ = GO_WRITERS.remove(&key);
        if fresh(&w, now) && now.saturating_sub(w.ktime_ns) < HANDOFF_NS {
            *out = w.ctx;
            go_count(GoCounter::LinkedByTransport);
            return 1;
        }
        return 0;
    }
    // SAFETY: copied out at once.
    match unsafe { GO_SERVING.get(&key) }.copied() {
        Some(s) if fresh(&s, now) => {
            *out = s.ctx;
            go_count(GoCounter::LinkedByGoroutine);
            1
        }
        _ => 0,
    }
}

/// The request `g` serves, if any and fresh (for the uprobes).
#[inline(always)]
pub fn served_by(tgid: u32, g: u64, now: u64) -> Option<GoCtx> {
    let key = GoKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out at once.
    unsafe { GO_SERVING.get(&key) }.copied().filter(|s| fresh(s, now))
}

/// A server of a Go process read a request head on `fd` (`captured` bytes
/// of it). A lone first byte (the background read) leaves the context
/// pending for the goroutine that reads the rest; a whole head makes the
/// reading goroutine serve it.
#[inline(never)]
pub fn request_read(tgid: u32, fd: u32, ctx: &TraceCtx, captured: usize) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let c = GoCtx {
        ctx: *ctx,
        fd,
        _pad: 0,
        ktime_ns: now,
        req: 0,
    };
    if captured == 1 {
        go_count(GoCounter::SplitHeads);
        let _ = GO_PENDING.insert(&conn_key(tgid, fd), &c, 0);
        return 0;
    }
    serve(tgid, fd, &c)
}

/// The current goroutine serves `c` (read on `fd`).
#[inline(always)]
fn serve(tgid: u32, fd: u32, c: &GoCtx) -> u32 {
    let g = current_g();
    if g == 0 {
        return 0;
    }
    let ckey = conn_key(tgid, fd);
    if let Some(r) = READERS.get_ptr_mut(&ckey) {
        // SAFETY: entry of this map, updated in place.
        unsafe {
            if (*r).goroutine == 0 && (*r).outstanding > 0 {
                // Read under the thread/process policy before this
                // process was classified: those counts end here.
                crate::context::release_reader((*r).serving_key, tgid, (*r).outstanding);
            }
        }
    }
    let r = Reader {
        serving_key: g,
        outstanding: 1,
        goroutine: 1,
    };
    let _ = READERS.insert(&ckey, &r, 0);
    let _ = GO_SERVING.insert(&GoKey { tgid, _pad: 0, ptr: g }, c, 0);
    0
}

/// True when a lone uppercase byte read on `fd` is net/http's background
/// read of the next request on a Go server connection that already served
/// one.
#[inline(never)]
pub fn background_byte(tgid: u32, fd: u32) -> bool {
    // SAFETY: presence check only.
    goroutine_policy(tgid) && unsafe { READERS.get(&conn_key(tgid, fd)) }.is_some_and(|r| r.goroutine != 0)
}

/// A read on `fd` that continues a request whose first byte the background
/// read took: the current goroutine serves it.
#[inline(never)]
pub fn continued(tgid: u32, fd: u32) -> u32 {
    let ckey = conn_key(tgid, fd);
    // SAFETY: copied out before removal.
    let Some(c) = (unsafe { GO_PENDING.get(&ckey) }).copied() else {
        return 0;
    };
    let _ = GO_PENDING.remove(&ckey);
    let now = unsafe { bpf_ktime_get_ns() };
    if !fresh(&c, now) {
        return 0;
    }
    serve(tgid, fd, &c)
}

/// The goroutine `g` answered (or lost) its request on `fd`.
#[inline(always)]
pub fn release(tgid: u32, fd: u32, g: u64) {
    let key = GoKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out at once.
    if unsafe { GO_SERVING.get(&key) }.is_some_and(|s| s.fd == fd) {
        let _ = GO_SERVING.remove(&key);
    }
}

/// Server connection `fd` closed: nothing of it stays pending.
#[inline(always)]
pub fn closed(tgid: u32, fd: u32, g: u64) {
    release(tgid, fd, g);
    let _ = GO_PENDING.remove(&conn_key(tgid, fd));
}
