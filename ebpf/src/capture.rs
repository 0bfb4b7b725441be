//! Copying payload prefixes of followed connections into ring-buffer events.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_user, generated,
        generated::bpf_loop,
    },
};
use meshless_common::{
    ConnAddrs, Counter, Direction, EventKind, FLAG_ACCEPTED, FLAG_CONTINUATION, FLAG_HTTP2, FLAG_NEW_CONN, FLAG_TRUNCATED,
    HEADER_SIZE, MAX_CAPTURE, MAX_CONTINUATION, MAX_IOVECS, TAIL_H2_WALK, TAIL_SERVER_CTX,
};

use aya_ebpf::{EbpfContext, cty::c_void, maps::ProgramArray};

use crate::{
    context,
    detect::{Http, WINDOW, classify, read_head},
    maps::{
        ACTIVE, ADDRS, Aligned, Args, BUF_IOVEC, BUF_MSGHDR, BUF_PLAIN, CONNS, CONT, COUNTERS, ConnState, EVENTS, Held,
        SCRATCH, conn_key, count, count_n, wakeup_bytes,
    },
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IoVec {
    pub base: u64,
    pub len: u64,
}

/// Offset of `msg_iov` and `msg_iovlen` in `struct user_msghdr` (64-bit).
const MSG_IOV_OFFSET: u64 = 16;

/// Resolves a stashed buffer argument to (iovec array, iovec count), or a
/// plain buffer as a single pseudo-iovec.
pub fn iovecs(args: &Args) -> Option<(u64, u64, bool)> {
    match args.layout {
        BUF_PLAIN => Some((args.ptr, 1, true)),
        BUF_IOVEC => Some((args.ptr, args.count, false)),
        BUF_MSGHDR => {
            // SAFETY: user pointer read through the checked helper.
            let iov: IoVec = unsafe { bpf_probe_read_user((args.ptr + MSG_IOV_OFFSET) as *const IoVec) }.ok()?;
            Some((iov.base, iov.len, false))
        }
        _ => None,
    }
}

/// Reads up to `room` (<= WINDOW) bytes from the start of a syscall buffer
/// that moved (or asks to move) `avail` bytes into `dst` (WINDOW bytes of
/// room); returns how many (0: none).
#[inline(always)]
pub fn head(args: &Args, avail: u64, dst: *mut u8, room: usize) -> usize {
    let Some((ptr, cnt, plain)) = iovecs(args) else {
        return 0;
    };
    let (base, len) = if plain {
        (ptr, avail)
    } else {
        if cnt == 0 {
            return 0;
        }
        // SAFETY: user pointer read through the checked helper.
        let Ok(iov) = (unsafe { bpf_probe_read_user(ptr as *const IoVec) }) else {
            return 0;
        };
        (iov.base, if iov.len < avail { iov.len } else { avail })
    };
    read_head(dst, room, base, len)
}

/// Addresses of a socket that is not tracked yet, as accept/connect and
/// the ESTABLISHED transition recorded them.
pub fn known_addrs(key: u64) -> Option<&'static ConnAddrs> {
    // SAFETY: map values stay valid for the program's run.
    let known = unsafe { ADDRS.get(&key) }?;
    if known.sk != 0 {
        // SAFETY: as above.
        if let Some(full) = unsafe { ACTIVE.get(&known.sk) } {
            return Some(full);
        }
    }
    Some(&known.addrs)
}

/// The addresses under which a request written on connection `key` (its
/// `CONNS` entry `state`, if any) hands its context to the TCP-option
/// program: none on an accepted socket, whose segments carry no option
/// (`probes::sockops` asks the kernel to call it only for connecting ones).
#[inline(always)]
pub fn request_addrs(state: Option<&'static ConnState>, key: u64) -> Option<&'static ConnAddrs> {
    match state {
        Some(s) if s.flags & FLAG_ACCEPTED != 0 => None,
        Some(s) => Some(&s.addrs),
        None => known_addrs(key),
    }
}

/// Copies up to MAX_CAPTURE bytes of what the syscall moved into the
/// scratch event; returns the number of bytes copied.
fn copy_payload(buf: *mut u8, args: &Args, total: usize) -> usize {
    let Some((ptr, cnt, plain)) = iovecs(args) else {
        return 0;
    };
    let want = if total > MAX_CAPTURE { MAX_CAPTURE } else { total };
    if plain {
        if read_user(buf, ptr, want).is_err() {
            count(Counter::ReadUserFailed);
            return 0;
        }
        return want;
    }
    copy_iovecs_from(ptr, cnt, 0, want)
}

/// State of an iovec walk, shared with the bpf_loop callback (lives on
/// the caller's stack).
#[repr(C)]
struct IovWalk {
    /// The user's iovec array and its length.
    ptr: u64,
    cnt: u64,
    /// Data bytes still to pass over before copying starts.
    skip: u64,
    /// Bytes copied so far (offset into the scratch event's data).
    off: u64,
    /// Bytes wanted in all (<= MAX_CAPTURE).
    want: u64,
}

/// Copies into the scratch event up to `want` (<= MAX_CAPTURE) bytes that
/// start `skip` bytes into the data of the iovecs at `ptr`; returns the
/// number of bytes copied. The walk runs in a bpf_loop callback, so the
/// verifier checks one iovec's copy once whatever MAX_IOVECS is: gRPC
/// C-core writes a HEADERS frame as dozens of tiny iovecs.
#[inline(never)]
fn copy_iovecs_from(ptr: u64, cnt: u64, skip: usize, want: usize) -> usize {
    let want = if want > MAX_CAPTURE { MAX_CAPTURE } else { want };
    let mut walk = IovWalk {
        ptr,
        cnt,
        skip: skip as u64,
        off: 0,
        want: want as u64,
    };
    let iters = if cnt < MAX_IOVECS as u64 { cnt as u32 } else { MAX_IOVECS as u32 };
    // SAFETY: the callback is a static BPF function; the context is this
    // stack slot, valid for the whole call.
    unsafe {
        bpf_loop(iters, copy_iovec as *mut c_void, (&mut walk as *mut IovWalk).cast(), 0);
    }
    (walk.off as usize) & (MAX_CAPTURE * 2 - 1)
}

/// One iovec of a walk (index `i`); returns 1 to stop.
#[inline(never)]
extern "C" fn copy_iovec(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `IovWalk` given to it.
    let walk = unsafe { &mut *(ctx as *mut IovWalk) };
    if i >= walk.cnt || walk.off >= walk.want {
        return 1;
    }
    // SAFETY: user pointer read through the checked helper.
    let Ok(iov) = (unsafe { bpf_probe_read_user((walk.ptr as *const IoVec).wrapping_add(i as usize)) }) else {
        return 1;
    };
    if walk.skip >= iov.len {
        walk.skip -= iov.len;
        return 0;
    }
    let avail = iov.len - walk.skip;
    let room = walk.want - walk.off;
    let n = if avail > room { room } else { avail };
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // `off < MAX_CAPTURE` and `n <= MAX_CAPTURE`: in bounds of the 2x buffer.
    // SAFETY: per-CPU scratch of this program.
    let dst = unsafe { (*ev).data.as_mut_ptr() }.wrapping_add(walk.off as usize & (MAX_CAPTURE - 1));
    if read_user(dst, iov.base + walk.skip, n as usize).is_err() {
        count(Counter::ReadUserFailed);
        return 1;
    }
    walk.skip = 0;
    walk.off += n;
    0
}

pub fn read_user(dst: *mut u8, src: u64, len: usize) -> Result<(), i64> {
    let len = (len & (MAX_CAPTURE * 2 - 1)) as u32;
    if len > MAX_CAPTURE as u32 {
        return Err(-1);
    }
    // SAFETY: dst points into the per-CPU scratch buffer with room for len.
    let ret = unsafe { generated::bpf_probe_read_user(dst.cast(), len, src as *const _) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}

/// Emits the Data event(s) for a finished syscall on a followed connection.
/// An HTTP/2 connection's syscall leaves through a tail call to slot
/// `TAIL_H2_WALK` of `tails` (a program of `ctx`'s type, see
/// `h2::walk`), which does what follows itself; if that fails, the syscall
/// is captured like any other (see `emit_plain`).
#[inline(always)]
pub fn emit_data<C: EbpfContext>(
    tp: &C,
    tails: &ProgramArray,
    id: u64,
    args: &Args,
    ret: usize,
    state: &ConnState,
    flags: u32,
) {
    if state.flags & FLAG_HTTP2 != 0 && crate::h2::prepare(id, args, ret as u64, state, flags) {
        // Does not return when it works.
        // SAFETY: the slot holds a program of this program's type.
        unsafe { tails.tail_call(tp, TAIL_H2_WALK) };
        // The walk did not run: the framing of this direction is lost.
        crate::h2::unsync(id, args, state);
        count(Counter::H2WalkMissed);
    }
    emit_plain(tp, tails, id, args, ret, state, flags);
}

/// Emits a syscall's Data event(s) without an HTTP/2 frame walk: the
/// first MAX_CAPTURE bytes, and for a plain-buffer request head (or an
/// HTTP/2 syscall) longer than that, up to MAX_CONTINUATION more bytes as
/// contiguous events (so a `traceparent` after a big cookie is seen). The
/// events' `len`s add up to `ret`, so userspace sees one stream. A request
/// a server read leaves through a tail call to slot `TAIL_SERVER_CTX` of
/// `tails` (a program of `ctx`'s type).
#[inline(always)]
pub fn emit_plain<C: EbpfContext>(
    tp: &C,
    tails: &ProgramArray,
    id: u64,
    args: &Args,
    ret: usize,
    state: &ConnState,
    flags: u32,
) {
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let ev = unsafe { &mut *ev };
    // HTTP/2 batches many frames per syscall: header blocks past the
    // first MAX_CAPTURE bytes are needed as much as a long request head.
    let h2 = state.flags & FLAG_HTTP2 != 0;
    let more = ret > MAX_CAPTURE && (h2 || (args.layout == BUF_PLAIN && starts_request(args)));
    let captured = if ret > 0 {
        copy_payload(ev.data.as_mut_ptr(), args, ret)
    } else {
        0
    };
    let len = if more && captured == MAX_CAPTURE {
        MAX_CAPTURE
    } else {
        ret
    };
    let mut flags = flags | state.flags;
    if captured < len {
        flags |= FLAG_TRUNCATED;
        count(Counter::Truncated);
    }
    fill_header(ev, tgid, tid, args.fd, EventKind::Data, state);
    ev.header.direction = args.direction;
    ev.header.syscall = args.syscall;
    ev.header.len = len as u32;
    ev.header.captured = captured as u32;
    ev.header.flags = flags;
    crate::mem::copy(&mut ev.header.ctx, &args.ctx);
    ev.header.sent_ns = args.sent_ns;
    // The rest of a long request head follows the first event, also when
    // the first event leaves through the server-context tail call.
    if let Some(cont) = CONT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, used by one program at a time on this CPU.
        let cont = unsafe { &mut *cont };
        let (ptr, count, plain) = iovecs(args).unwrap_or((0, 0, true));
        cont.ptr = ptr;
        cont.count = count;
        cont.plain = u32::from(plain);
        cont.ret = if len == ret { 0 } else { ret as u64 };
    }
    if args.ctx.flags == 0 && captured >= 8 {
        let first = [
            ev.data[0], ev.data[1], ev.data[2], ev.data[3], ev.data[4], ev.data[5], ev.data[6], ev.data[7],
        ];
        if args.direction == Direction::Ingress as u32 && context::starts_request(&first) {
            // Does not return when it works; on failure the event goes out
            // without a context below.
            // SAFETY: the slot holds a tracepoint program like this one.
            unsafe { tails.tail_call(tp, TAIL_SERVER_CTX) };
        } else if args.direction == Direction::Ingress as u32
            && context::starts_request(&[
                b'A', first[0], first[1], first[2], first[3], first[4], first[5], first[6],
            ])
        {
            // The rest of a request line whose first byte (an uppercase
            // letter) was read alone: Go's keep-alive background read.
            crate::golang::continued(tgid, args.fd);
        } else if args.direction == Direction::Egress as u32 && &first[..5] == b"HTTP/" {
            context::response_written(tgid, args.fd);
        }
    } else if args.ctx.flags == 0
        && !h2
        && captured == 1
        && ret == 1
        && args.direction == Direction::Ingress as u32
        && ev.data[0].is_ascii_uppercase()
        && crate::golang::background_byte(tgid, args.fd)
    {
        // net/http's background read took the next request's first byte:
        // its context is decided now (this event starts the request).
        // SAFETY: as above.
        unsafe { tails.tail_call(tp, TAIL_SERVER_CTX) };
    }
    // Reaching here, bytes a server read did not start a request the
    // kernel could see (requests are tail-called above).
    if captured > 0
        && args.ctx.flags == 0
        && args.direction == Direction::Ingress as u32
        && state.flags & FLAG_ACCEPTED != 0
    {
        context::unknown_read(id, args.fd);
    }
    submit(ev, captured);
    emit_continuation(ev);
}

/// The tail of `emit_data` for a request read by a server: decides its
/// context (see `context::server_request`) and submits the event.
pub fn finish_server_request() {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, filled by the program that tail-called us.
    let ev = unsafe { &mut *ev };
    let h = &ev.header;
    let id = (h.tgid as u64) << 32 | h.tid as u64;
    let (fd, addrs) = (h.fd, h.addrs);
    let captured = (h.captured as usize) & (MAX_CAPTURE * 2 - 1);
    context::server_request(id, fd, &addrs, captured, &mut ev.header.ctx);
    submit(ev, captured);
    emit_continuation(ev);
}

/// Sends the bytes after the first MAX_CAPTURE of a long request head (as
/// planned in `CONT` by emit_data) as contiguous events that reuse the
/// first event's header: their `len`s add up to what the syscall moved.
#[inline(always)]
fn emit_continuation(ev: &mut crate::maps::EventBuf) {
    let Some(cont) = CONT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, used by one program at a time on this CPU.
    let cont = unsafe { &mut *cont };
    let (ptr, ret, iov_count, plain) = (cont.ptr, cont.ret as usize, cont.count, cont.plain != 0);
    cont.ret = 0;
    if ret <= MAX_CAPTURE {
        return;
    }
    let flags = (ev.header.flags & !FLAG_TRUNCATED & !FLAG_NEW_CONN) | FLAG_CONTINUATION;
    crate::mem::zero(&mut ev.header.ctx);
    let mut off = MAX_CAPTURE;
    for _ in 0..MAX_CONTINUATION / MAX_CAPTURE {
        if off >= ret {
            break;
        }
        let rest = ret - off;
        let want = if rest > MAX_CAPTURE { MAX_CAPTURE } else { rest };
        let last = off + MAX_CAPTURE >= MAX_CAPTURE + MAX_CONTINUATION || rest <= MAX_CAPTURE;
        let got = if !plain {
            copy_iovecs_from(ptr, iov_count, off, want)
        } else if read_user(ev.data.as_mut_ptr(), ptr + off as u64, want).is_ok() {
            want
        } else {
            count(Counter::ReadUserFailed);
            0
        };
        let len = if last { rest } else { want };
        ev.header.len = len as u32;
        ev.header.captured = got as u32;
        ev.header.flags = if got < len { flags | FLAG_TRUNCATED } else { flags };
        submit(ev, got);
        count(Counter::ContinuationEvents);
        if last || got == 0 {
            break;
        }
        off += MAX_CAPTURE;
    }
}

/// True when a plain buffer starts like a request line (worth capturing
/// its head past MAX_CAPTURE; bodies and responses are not).
#[inline(always)]
fn starts_request(args: &Args) -> bool {
    let mut b = MaybeUninit::<Aligned<[u8; WINDOW]>>::uninit();
    let b = &mut crate::mem::zeroed_in(&mut b).0;
    let n = read_head(b.as_mut_ptr(), WINDOW, args.ptr, WINDOW as u64);
    classify(b, n) == Http::Request
}

/// Emits the look-ahead bytes held for an fd before it was followed, as
/// the Data event that precedes the current syscall's.
#[inline(always)]
pub fn emit_held(tgid: u32, tid: u32, args: &Args, held: &Held, state: &ConnState, flags: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in emit_data.
    let ev = unsafe { &mut *ev };
    let n = (held.len as usize) & (WINDOW * 2 - 1);
    let n = if n > WINDOW { WINDOW } else { n };
    ev.data[..WINDOW].copy_from_slice(&held.bytes);
    fill_header(ev, tgid, tid, args.fd, EventKind::Data, state);
    ev.header.direction = args.direction;
    ev.header.syscall = args.syscall;
    ev.header.len = n as u32;
    ev.header.captured = n as u32;
    ev.header.flags = flags | state.flags;
    crate::mem::zero(&mut ev.header.ctx);
    submit(ev, n);
}

/// Emits a header-only Exec event for the current process.
pub fn emit_exec(tgid: u32, tid: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in emit_data.
    let ev = unsafe { &mut *ev };
    let none = ConnState::default();
    fill_header(ev, tgid, tid, 0, EventKind::Exec, &none);
    ev.header.direction = 0;
    ev.header.syscall = 0;
    ev.header.len = 0;
    ev.header.captured = 0;
    ev.header.flags = 0;
    crate::mem::zero(&mut ev.header.ctx);
    submit(ev, 0);
}

/// Emits a header-only event (Close).
pub fn emit_close(tgid: u32, tid: u32, fd: u32, syscall: u32, state: &ConnState) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in emit_data.
    let ev = unsafe { &mut *ev };
    fill_header(ev, tgid, tid, fd, EventKind::Close, state);
    ev.header.direction = 0;
    ev.header.syscall = syscall;
    ev.header.len = 0;
    ev.header.captured = 0;
    ev.header.flags = state.flags;
    crate::mem::zero(&mut ev.header.ctx);
    submit(ev, 0);
}

/// Fills the scratch event's header for a Data record of this syscall
/// (all but length, captured bytes, flags and sequence number).
#[inline(always)]
pub fn fill_header_of(ev: &mut crate::maps::EventBuf, id: u64, args: &Args, state: &ConnState) {
    fill_header(ev, (id >> 32) as u32, id as u32, args.fd, EventKind::Data, state);
    ev.header.direction = args.direction;
    ev.header.syscall = args.syscall;
    crate::mem::copy(&mut ev.header.ctx, &args.ctx);
    ev.header.sent_ns = args.sent_ns;
}

#[inline(always)]
fn fill_header(ev: &mut crate::maps::EventBuf, tgid: u32, tid: u32, fd: u32, kind: EventKind, state: &ConnState) {
    let h = &mut ev.header;
    h.ktime_ns = unsafe { bpf_ktime_get_ns() };
    h.conn_id = state.conn_id;
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.tgid = tgid;
    h.tid = tid;
    h.fd = fd;
    h.kind = kind as u32;
    crate::mem::copy(&mut h.addrs, &state.addrs);
    h.sock_ino = state.sock_ino;
    h.sent_ns = 0;
    // Straight into the header (the helper zeroes it on failure).
    // SAFETY: a buffer of the given size.
    unsafe { generated::bpf_get_current_comm(h.comm.as_mut_ptr().cast(), h.comm.len() as u32) };
}

/// Records the ring-buffer fill level if it is the highest seen on this CPU.
#[inline(always)]
fn high_water(used: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(Counter::RingbufHighWater as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if used > *slot {
                *slot = used;
            }
        }
    }
}

/// Takes the next number in the event's connection (see
/// `EventHeader::seq`); 0 when the connection has no `CONNS` entry.
#[inline(always)]
fn next_seq(h: &meshless_common::EventHeader) -> u32 {
    if h.kind != EventKind::Data as u32 {
        return 0;
    }
    let Some(state) = CONNS.get_ptr_mut(&conn_key(h.tgid, h.fd)) else {
        return 0;
    };
    // SAFETY: map values stay valid for the program's run. Not atomic (the
    // BPF v1 instruction set has no fetching add): two threads on one
    // socket at the same instant may take the same number, which userspace
    // treats like a loss (pairing restarts).
    let state = unsafe { &mut *state };
    if state.conn_id != h.conn_id {
        return 0;
    }
    state.seq = state.seq.wrapping_add(1);
    state.seq
}

/// Numbers the event (before reserving: a full ring buffer still uses up
/// the number, which is how userspace learns of the loss) and sends it.
pub fn submit(ev: &mut crate::maps::EventBuf, captured: usize) {
    ev.header.seq = next_seq(&ev.header);
    let size = HEADER_SIZE + (captured & (MAX_CAPTURE * 2 - 1));
    let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    high_water(used);
    // Wake the reader when the fill crosses a multiple of the threshold,
    // not on every event above it: a reader that is behind (or starved of
    // CPU by the applications) would otherwise cost every traced syscall a
    // wakeup (an IPI, a VM exit on VMs) for as long as it stays behind.
    let every = wakeup_bytes();
    let flags = if every == 0 || used / every != (used + size as u64) / every {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    // SAFETY: size <= size_of::<EventBuf>() by construction.
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const crate::maps::EventBuf).cast::<u8>(), size) };
    if EVENTS.output::<[u8]>(bytes, flags as u64).is_ok() {
        count(Counter::EventsSent);
        count_n(Counter::EventBytes, size as u64);
    } else {
        count(Counter::RingbufFull);
    }
}
