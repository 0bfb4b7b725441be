//! Trace context decided in the kernel, where requests are seen.
//!
//! - A request read by a server gets its span ids at once: the parent comes
//!   from a `traceparent` header in the captured head, or from the caller's
//!   TCP option (written by meshless on the caller's node), else a new trace
//!   starts.
//! - The thread (or process, see `LinkPolicy`) that read it is now serving
//!   it. While exactly one inbound request is outstanding there, a request
//!   it writes is that request's child. With more than one outstanding the
//!   serving context is forgotten until the count falls back to zero: no
//!   link is better than a wrong link.
//! - Go processes link by goroutine instead (see `golang`).
//! - A request written by a client gets its span ids before its bytes can
//!   leave (at sys_enter), so the sock_ops program can put them into the
//!   first TCP segment that carries them.
use core::mem::MaybeUninit;

use aya_ebpf::helpers::{
    bpf_get_prandom_u32, bpf_ktime_get_ns,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_loop},
};
use meshless_common::{
    AF_INET, CTX_FROM_HEADER, CTX_FROM_OPTION, CTX_IN_PROCESS, CTX_PARENT, CTX_SAMPLED, CTX_SENT, CTX_VALID, ConnAddrs,
    Counter, FLAG_LOCAL_ADDR, FLAG_REMOTE_ADDR, LINK_POLICY_MASK, LINK_QUIET, LinkPolicy, MAX_CAPTURE, MAX_QUIET_LEVEL,
    TraceCtx,
};

use crate::{
    golang,
    maps::{
        IN_OPT, LINK_POLICY, OUT_OPT, OptCtx, QUIET_CGROUPS, QUIET_LEVELS, READERS, Reader, SCRATCH, SERVING, Serving,
        SockKey, conn_key, count, propagation,
    },
};

/// A serving context untouched for this long is not trusted any more.
const STALE_NS: u64 = 30 * 1_000_000_000;
/// How far into a captured request head `traceparent` is looked for.
const SCAN_LIMIT: usize = MAX_CAPTURE;
/// Bytes of `traceparent: ` value we parse: version-traceid-spanid-flags.
const TP_VALUE: usize = 55;
/// Mask that keeps indexes inside the scratch payload (2 * MAX_CAPTURE).
const DATA_MASK: usize = MAX_CAPTURE * 2 - 1;

#[inline(always)]
fn random_u64() -> u64 {
    // SAFETY: helper without arguments.
    let (a, b) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    ((a as u64) << 32) | b as u64
}

/// A new span id; its lowest bit carries the sampled flag across the wire
/// (the TCP option has no room for a flags byte).
#[inline(never)]
fn span_id(sampled: bool, out: &mut [u8; 8]) -> u32 {
    *out = random_u64().to_be_bytes();
    out[7] = (out[7] & !1) | u8::from(sampled);
    0
}

#[inline(never)]
fn trace_id(out: &mut [u8; 16]) -> u32 {
    out[..8].copy_from_slice(&random_u64().to_be_bytes());
    out[8..].copy_from_slice(&random_u64().to_be_bytes());
    0
}

#[inline(always)]
fn words(addr: &[u8; 16], family: u16) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    if family == AF_INET {
        return [w(0), 0, 0, 0];
    }
    canonical([w(0), w(4), w(8), w(12)])
}

/// IPv4-mapped IPv6 addresses are keyed as plain IPv4 on both sides.
#[inline(always)]
pub fn canonical(a: [u32; 4]) -> [u32; 4] {
    if a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        [a[3], 0, 0, 0]
    } else {
        a
    }
}

/// The socket key of a connection whose both ends are known.
#[inline(never)]
pub fn sock_key(addrs: &ConnAddrs, key: &mut SockKey) -> u32 {
    let both = FLAG_LOCAL_ADDR | FLAG_REMOTE_ADDR;
    if addrs.valid & both != both {
        return 0;
    }
    key.local = words(&addrs.local, addrs.family);
    key.remote = words(&addrs.remote, addrs.family);
    key.ports = (addrs.local_port as u32) << 16 | addrs.remote_port as u32;
    1
}

/// The serving state of a whole process (a tid is never 0).
#[inline(always)]
fn process_key(tgid: u32) -> u64 {
    (tgid as u64) << 32
}

/// The one inbound request `key` is serving, if exactly one is outstanding.
#[inline(always)]
fn sole(key: u64, now: u64) -> Option<&'static Serving> {
    // SAFETY: map values stay valid for the program's run.
    let s = unsafe { SERVING.get(&key) }?;
    (s.outstanding == 1 && s.ctx.flags & CTX_VALID != 0 && now.saturating_sub(s.ktime_ns) < STALE_NS).then_some(s)
}

/// The inbound request the current thread is serving under its process's
/// policy (see `LinkPolicy`).
#[inline(always)]
fn serving(id: u64, tgid: u32, policy: u32, now: u64) -> Option<&'static Serving> {
    match policy & LINK_POLICY_MASK {
        p if p == LinkPolicy::Thread as u32 => sole(id, now),
        p if p == LinkPolicy::Process as u32 => sole(process_key(tgid), now),
        p if p == LinkPolicy::Off as u32 => None,
        _ => {
            let t = sole(id, now)?;
            let p = sole(process_key(tgid), now)?;
            (t.ctx.span_id == p.ctx.span_id).then_some(t)
        }
    }
}

/// True when bytes start like an HTTP/1.x request line (a token and a space).
#[inline(always)]
pub fn starts_request(b: &[u8; 8]) -> bool {
    let mut i = 0;
    while i < 8 {
        let c = b[i];
        if c == b' ' {
            return i >= 3;
        }
        if !(c.is_ascii_uppercase() || c == b'-' || c == b'_') {
            return false;
        }
        i += 1;
    }
    false
}

/// True when the current task runs in a quiet pod's cgroup (the pod opted
/// out of tracing): its requests carry no trace option even before
/// userspace has classified the process. One array lookup when no pod is
/// quiet; else one ancestor lookup per level that holds a quiet cgroup.
#[inline(always)]
fn in_quiet_cgroup() -> bool {
    let Some(&levels) = QUIET_LEVELS.get(0) else {
        return false;
    };
    if levels == 0 {
        return false;
    }
    let mut level = 1;
    while level <= MAX_QUIET_LEVEL {
        if levels & (1 << level) != 0 {
            // SAFETY: a helper without pointer arguments.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            // SAFETY: only compared with the level; not kept.
            if unsafe { QUIET_CGROUPS.get(&id) }.is_some_and(|&l| l == level) {
                return true;
            }
        }
        level += 1;
    }
    false
}

/// Decides the context of a request this thread is about to write (client
/// side) into `ctx`.
#[inline(never)]
pub fn client_request(id: u64, addrs: Option<&ConnAddrs>, ctx: &mut TraceCtx) -> u32 {
    let tgid = (id >> 32) as u32;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: copied out at once.
    let policy = unsafe { LINK_POLICY.get(&tgid) }.copied().unwrap_or(0);
    ctx.flags = CTX_VALID | CTX_SAMPLED;
    let mut parent = MaybeUninit::<TraceCtx>::uninit();
    let parent = crate::mem::zeroed_in(&mut parent);
    let found = if policy & LINK_POLICY_MASK == LinkPolicy::Goroutine as u32 {
        golang::parent(tgid, now, parent) != 0
    } else if let Some(s) = serving(id, tgid, policy, now) {
        crate::mem::copy(parent, &s.ctx);
        true
    } else {
        false
    };
    if found {
        ctx.trace_id = parent.trace_id;
        ctx.parent_id = parent.span_id;
        ctx.flags = CTX_VALID | CTX_PARENT | CTX_IN_PROCESS | (parent.flags & CTX_SAMPLED);
        count(Counter::CtxInProcess);
    } else {
        trace_id(&mut ctx.trace_id);
    }
    span_id(ctx.flags & CTX_SAMPLED != 0, &mut ctx.span_id);
    let mut key = MaybeUninit::<SockKey>::uninit();
    let key = crate::mem::zeroed_in(&mut key);
    if propagation()
        && policy & LINK_QUIET == 0
        && !in_quiet_cgroup()
        && addrs.is_some_and(|a| sock_key(a, key) != 0)
    {
        let opt = OptCtx {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            used: 0,
            _pad: 0,
        };
        if OUT_OPT.insert(key, &opt, 0).is_ok() {
            ctx.flags |= CTX_SENT;
        }
    }
    0
}

/// Bytes read on server connection `fd` that do not start a request line
/// (a head read byte by byte or after a background read took its first
/// byte, TLS records, HTTP/2 frames). Read where no request of the
/// connection is outstanding, they begin one whose context is unknown: the
/// thread and process then serve more than one request and link none,
/// until it is answered (an `HTTP/` write), the connection closes, or it
/// goes stale. Never a link to the wrong request; goroutine-linked
/// processes track their serving goroutines instead.
#[inline(never)]
pub fn unknown_read(id: u64, fd: u32) -> u32 {
    let tgid = (id >> 32) as u32;
    // SAFETY: copied out at once.
    if unsafe { READERS.get(&conn_key(tgid, fd)) }.is_some_and(|r| r.outstanding != 0) || golang::goroutine_policy(tgid)
    {
        return 0;
    }
    count(Counter::CtxUnknownRequest);
    request_read(id, fd, &TraceCtx::default())
}

/// Decides the context of a request just read into the scratch event
/// (server side; `captured` bytes of it are there) into `ctx`.
#[inline(never)]
pub fn server_request(id: u64, fd: u32, addrs: &ConnAddrs, captured: usize, ctx: &mut TraceCtx) -> u32 {
    ctx.flags = CTX_VALID | CTX_SAMPLED;
    let mut header = MaybeUninit::<Found>::uninit();
    let header = crate::mem::zeroed_in(&mut header);
    traceparent(captured, header);
    let mut key = MaybeUninit::<SockKey>::uninit();
    let key = crate::mem::zeroed_in(&mut key);
    let have_key = sock_key(addrs, key) != 0;
    let option = have_key.then_some(()).and_then(|()| {
        let slot = IN_OPT.get_ptr_mut(key)?;
        // SAFETY: an entry of this map; racing writers only store whole values.
        let opt = unsafe { &mut *slot };
        if opt.used != 0 {
            return None;
        }
        opt.used = 1;
        Some(opt)
    });
    let has_header = header.ok != 0;
    match option {
        // A proxy forwarding the caller's header: the option names the
        // nearer parent (the proxy's own client span) in the same trace.
        Some(o) if !has_header || header.trace == o.trace_id => {
            set_parent(ctx, &o.trace_id, &o.span_id, o.span_id[7] & 1 != 0, CTX_FROM_OPTION)
        }
        _ if has_header => set_parent(ctx, &header.trace, &header.parent, header.sampled != 0, CTX_FROM_HEADER),
        _ => {
            trace_id(&mut ctx.trace_id);
        }
    }
    span_id(ctx.flags & CTX_SAMPLED != 0, &mut ctx.span_id);
    let tgid = (id >> 32) as u32;
    if golang::goroutine_policy(tgid) {
        return golang::request_read(tgid, fd, ctx, captured);
    }
    request_read(id, fd, ctx)
}

#[inline(always)]
fn set_parent(ctx: &mut TraceCtx, trace: &[u8; 16], parent: &[u8; 8], sampled: bool, from: u32) {
    ctx.trace_id = *trace;
    ctx.parent_id = *parent;
    ctx.flags = CTX_VALID | CTX_PARENT | from | if sampled { CTX_SAMPLED } else { 0 };
    count(if from == CTX_FROM_OPTION {
        Counter::CtxFromOption
    } else {
        Counter::CtxFromHeader
    });
}

/// The current thread read a request on `fd`: it, and its process, serve one more.
#[inline(never)]
fn request_read(id: u64, fd: u32, ctx: &TraceCtx) -> u32 {
    let tgid = (id >> 32) as u32;
    let ckey = conn_key(tgid, fd);
    match READERS.get_ptr_mut(&ckey) {
        // SAFETY: entry of this map, updated in place.
        Some(r) => unsafe {
            if (*r).goroutine != 0 {
                // Read by a goroutine before: a thread now serves it.
                golang::release(tgid, fd, (*r).serving_key);
                (*r).goroutine = 0;
                (*r).outstanding = 0;
                (*r).serving_key = id;
            } else if (*r).serving_key != id {
                // Another thread took the connection over (Go moves
                // goroutines): the old thread's share moves, the
                // process's count stays exact.
                release((*r).serving_key, (*r).outstanding);
                (*r).serving_key = id;
            }
            (*r).outstanding += 1;
        },
        None => {
            let r = Reader {
                serving_key: id,
                outstanding: 1,
                goroutine: 0,
            };
            let _ = READERS.insert(&ckey, &r, 0);
        }
    }
    serve(id, ctx);
    serve(process_key(tgid), ctx)
}

/// One more inbound request outstanding at `key`; its context is kept
/// only while it is the only one.
#[inline(never)]
fn serve(key: u64, ctx: &TraceCtx) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(s) = SERVING.get_ptr_mut(&key) {
        // SAFETY: entry of this map, updated in place.
        unsafe {
            if (*s).outstanding > 0 && now.saturating_sub((*s).ktime_ns) < STALE_NS {
                (*s).outstanding += 1;
                (*s).ctx.flags = 0;
                (*s).ktime_ns = now;
                return 0;
            }
        }
    }
    let s = Serving {
        ctx: *ctx,
        outstanding: 1,
        _pad: 0,
        ktime_ns: now,
    };
    let _ = SERVING.insert(&key, &s, 0);
    0
}

#[inline(never)]
fn release(skey: u64, n: u32) -> u32 {
    if let Some(s) = SERVING.get_ptr_mut(&skey) {
        // SAFETY: entry of this map.
        let left = unsafe { (*s).outstanding }.saturating_sub(n);
        if left == 0 {
            let _ = SERVING.remove(&skey);
        } else {
            unsafe { (*s).outstanding = left };
        }
    }
    0
}

/// A response started on server connection `fd`: one request less outstanding.
#[inline(never)]
pub fn response_written(tgid: u32, fd: u32) -> u32 {
    let ckey = conn_key(tgid, fd);
    let Some(r) = READERS.get_ptr_mut(&ckey) else {
        return 0;
    };
    // SAFETY: entry of this map.
    let (skey, outstanding, goroutine) = unsafe { ((*r).serving_key, (*r).outstanding, (*r).goroutine) };
    if outstanding == 0 {
        return 0;
    }
    unsafe { (*r).outstanding = outstanding - 1 };
    if goroutine != 0 {
        golang::release(tgid, fd, skey);
        return 0;
    }
    release(skey, 1);
    release(process_key(tgid), 1)
}

/// Ends `n` requests a thread (`skey`) and its process were serving.
#[inline(never)]
pub fn release_reader(skey: u64, tgid: u32, n: u32) -> u32 {
    release(skey, n);
    release(process_key(tgid), n)
}

/// Server connection `fd` closed: its unanswered requests are not served any more.
#[inline(never)]
pub fn conn_closed(tgid: u32, fd: u32) -> u32 {
    let ckey = conn_key(tgid, fd);
    // SAFETY: copied out at once.
    if let Some(r) = unsafe { READERS.get(&ckey) }.copied() {
        if r.goroutine != 0 {
            golang::closed(tgid, fd, r.serving_key);
        } else {
            release(r.serving_key, r.outstanding);
            release(process_key(tgid), r.outstanding);
        }
        let _ = READERS.remove(&ckey);
    }
    0
}

/// Reads one payload byte of the scratch event (index masked in bounds).
#[inline(always)]
fn byte(data: *const u8, i: usize) -> u8 {
    // SAFETY: the mask keeps the read inside the 2 * MAX_CAPTURE payload.
    unsafe { core::ptr::read_volatile(data.add(i & DATA_MASK)) }
}

/// A `traceparent` found in a request head.
#[derive(Clone, Copy, Default)]
pub struct Found {
    pub trace: [u8; 16],
    pub parent: [u8; 8],
    pub sampled: u32,
    pub ok: u32,
}

/// State shared with the bpf_loop callback (lives on the caller's stack).
#[repr(C)]
struct Scan {
    end: u64,
    found: u64,
}

/// Finds `traceparent: 00-<32 hex>-<16 hex>-<2 hex>` in the captured head.
/// The search runs in a bpf_loop callback, 8 bytes per call, so the
/// verifier checks it once instead of once per position.
#[inline(never)]
fn traceparent(captured: usize, out: &mut Found) -> u32 {
    let end = if captured > SCAN_LIMIT { SCAN_LIMIT } else { captured };
    if end < 14 + TP_VALUE {
        return 0;
    }
    let mut scan = Scan {
        end: end as u64,
        found: 0,
    };
    let words = (end / 8 + 1) as u32;
    // SAFETY: the callback is a static BPF function; the context is this
    // stack slot, valid for the whole call.
    unsafe {
        bpf_loop(
            words,
            scan_word as *mut core::ffi::c_void,
            (&mut scan as *mut Scan).cast(),
            0,
        );
    }
    if scan.found == 0 {
        return 0;
    }
    let Some(ev) = SCRATCH.get_ptr(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch of this program.
    let data = unsafe { (*ev).data.as_ptr() };
    parse_value(data, scan.found as usize, out);
    out.ok
}

/// One step of the search: bytes [8 * index, 8 * index + 8). Returns 1 to stop.
#[inline(never)]
extern "C" fn scan_word(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Scan` given to it.
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    let Some(ev) = SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch of this program.
    let data = unsafe { (*ev).data.as_ptr() };
    let base = (index as usize & (MAX_CAPTURE / 8 - 1)) * 8;
    if base + 14 + TP_VALUE > scan.end as usize {
        return 1;
    }
    let mut j = 0;
    while j < 8 {
        let i = base + j;
        if byte(data, i) == b'\n' {
            let c = byte(data, i + 1);
            if c == b'\r' || c == b'\n' {
                return 1;
            }
            if c | 0x20 == b't' && name_matches(data, i + 2) {
                scan.found = (i + 13) as u64;
                return 1;
            }
        }
        j += 1;
    }
    0
}

/// "raceparent:" case-insensitively at `at`.
#[inline(always)]
fn name_matches(data: *const u8, at: usize) -> bool {
    const REST: &[u8; 11] = b"raceparent:";
    let mut k = 0;
    while k < REST.len() {
        let c = byte(data, at + k);
        let want = REST[k];
        let ok = if want == b':' { c == b':' } else { c | 0x20 == want };
        if !ok {
            return false;
        }
        k += 1;
    }
    true
}

/// Hex digit values; 0x10 marks a byte that is not a lower-case hex digit.
/// A table keeps the parse free of per-digit branches, which the verifier
/// would otherwise explore in every combination.
static HEX: [u8; 256] = {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Value of the two hex digits at `at`; bit 0x100 set when either is not one.
#[inline(always)]
fn hex_pair(data: *const u8, at: usize) -> u32 {
    // SAFETY: a u8 indexes the 256-entry table.
    let (hi, lo) = unsafe {
        (
            core::ptr::read_volatile(&HEX[byte(data, at) as usize]) as u32,
            core::ptr::read_volatile(&HEX[byte(data, at + 1) as usize]) as u32,
        )
    };
    ((hi | lo) & 0x10) << 4 | (hi & 0xf) << 4 | (lo & 0xf)
}

#[inline(always)]
fn parse_value(data: *const u8, pos: usize, out: &mut Found) {
    let mut p = pos & (MAX_CAPTURE - 1);
    if byte(data, p) == b' ' {
        p += 1;
    }
    // version "00" only: other versions may change the layout.
    let dashes = (byte(data, p + 2) ^ b'-') | (byte(data, p + 35) ^ b'-') | (byte(data, p + 52) ^ b'-');
    if byte(data, p) != b'0' || byte(data, p + 1) != b'0' || dashes != 0 {
        return;
    }
    let mut bad = 0u32;
    let mut k = 0;
    while k < 16 {
        let v = hex_pair(data, p + 3 + 2 * k);
        bad |= v;
        out.trace[k] = v as u8;
        k += 1;
    }
    k = 0;
    while k < 8 {
        let v = hex_pair(data, p + 36 + 2 * k);
        bad |= v;
        out.parent[k] = v as u8;
        k += 1;
    }
    let flags = hex_pair(data, p + 53);
    if (bad | flags) & 0x100 != 0 || out.trace == [0; 16] || out.parent == [0; 8] {
        return;
    }
    out.sampled = flags & 1;
    out.ok = 1;
}
