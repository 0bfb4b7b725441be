//! Uprobes on Go binaries (amd64 register ABI: receiver/first argument in
//! RAX, second in RBX, the running goroutine `g` in R14). Entry probes
//! only: a return probe rewrites the return address on a goroutine stack
//! that the Go runtime may move, which crashes the program. Each sits on
//! the jump of the function's stack check (agent/src/golang.rs), which a
//! stack growth runs twice: every program here is safe to run twice.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::uprobe,
    programs::ProbeContext,
};
use meshless_common::GoCounter;

use super::current;
use crate::{
    golang::{HANDOFF_NS, go_count, served_by},
    maps::{GO_REQUESTS, GO_SERVING, GO_WRITERS, GoKey},
};

/// (RAX, RBX, R14) at the probed function's entry.
#[inline(always)]
fn regs(ctx: &ProbeContext) -> (u64, u64, u64) {
    // SAFETY: the context of a uprobe is the user pt_regs.
    unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).r14) }
}

/// `runtime.goexit1`: the goroutine ends and its `g` will be reused, so
/// nothing may stay keyed by it.
#[uprobe]
pub fn meshless_go_goexit(ctx: ProbeContext) -> u32 {
    let Some((_, tgid, _)) = current() else {
        return 0;
    };
    let (_, _, g) = regs(&ctx);
    let key = GoKey { tgid, _pad: 0, ptr: g };
    let _ = GO_SERVING.remove(&key);
    let _ = GO_WRITERS.remove(&key);
    go_count(GoCounter::Goexits);
    0
}

/// `net/http.(*persistConn).roundTrip(req *transportRequest)`, on the
/// goroutine that makes the call: its request (`*Request`, the first
/// field of `transportRequest`) gets that goroutine's serving context as
/// parent, or none.
#[uprobe]
pub fn meshless_go_round_trip(ctx: ProbeContext) -> u32 {
    let Some((_, tgid, _)) = current() else {
        return 0;
    };
    go_count(GoCounter::RoundTrips);
    let (_, treq, g) = regs(&ctx);
    // SAFETY: reads user memory of the traced process; failure is handled.
    let Ok(req) = (unsafe { bpf_probe_read_user(treq as *const u64) }) else {
        return 0;
    };
    let key = GoKey {
        tgid,
        _pad: 0,
        ptr: req,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match served_by(tgid, g, now) {
        Some(mut s) => {
            s.ktime_ns = now;
            s.req = req;
            let _ = GO_REQUESTS.insert(&key, &s, 0);
        }
        None => {
            let _ = GO_REQUESTS.remove(&key);
        }
    }
    0
}

/// `net/http.(*Request).write(...)`, receiver in RAX, on the goroutine
/// that writes the request (the Transport's write loop): the request's
/// parent, if it has one, goes with that goroutine's next request write.
#[uprobe]
pub fn meshless_go_request_write(ctx: ProbeContext) -> u32 {
    let Some((_, tgid, _)) = current() else {
        return 0;
    };
    go_count(GoCounter::RequestWrites);
    let (req, _, g) = regs(&ctx);
    let rkey = GoKey {
        tgid,
        _pad: 0,
        ptr: req,
    };
    let wkey = GoKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out before removal.
    let now = unsafe { bpf_ktime_get_ns() };
    match unsafe { GO_REQUESTS.get(&rkey) }.copied() {
        Some(p) => {
            let _ = GO_REQUESTS.remove(&rkey);
            // The write loop takes a request as soon as roundTrip hands it
            // over; an older entry belongs to a request that was never
            // written (its memory reused since).
            if now.saturating_sub(p.ktime_ns) < HANDOFF_NS {
                let _ = GO_WRITERS.insert(&wkey, &p, 0);
            } else {
                let _ = GO_WRITERS.remove(&wkey);
            }
        }
        // A second run of the same call (after a stack growth) keeps what
        // the first one handed over.
        // SAFETY: copied out at once.
        None if unsafe { GO_WRITERS.get(&wkey) }.is_some_and(|w| w.req == req) => {}
        None => {
            let _ = GO_WRITERS.remove(&wkey);
        }
    }
    0
}
