//! HTTP/2 framing followed in the kernel, per connection direction.
//!
//! A syscall on an HTTP/2 connection is walked frame by frame over all the
//! bytes it moved (plain buffers and iovecs, read straight from user
//! memory), not only its first MAX_CAPTURE: frame headers and the payloads
//! userspace reads (HEADERS, CONTINUATION, RST_STREAM, ...) are copied,
//! large DATA payloads are not. The syscall becomes one or more records
//! whose `len`s add up to the bytes moved; a record's bytes are a prefix
//! of its range and the rest lies inside skipped DATA payloads, which the
//! userspace frame parser skips anyway. So a header block deep inside a
//! 16 KiB `writev` is seen (its HPACK table updates with it), and a
//! download costs a frame header per DATA frame. A syscall of SETTINGS /
//! PING / WINDOW_UPDATE / PRIORITY frames only gives no record.
//!
//! The walk is a program of its own, tail-called by the probes that
//! capture data (`emit_data` stores the syscall in `H2_CALL` first), so the
//! verifier checks it once per program type rather than in every probe;
//! it runs in a `bpf_loop` callback whose state lives in a per-CPU map
//! value (`H2WALK`), so the verifier checks one step once. Where the
//! framing is not known (a connection followed mid-way, a walk cut short),
//! the direction is unsynced: a syscall is captured as before, and the walk
//! starts again at a syscall that begins with a plausible frame header.
//! Bytes the walk could not place are sent as not captured: userspace
//! then loses framing and marks its HPACK state unknown, never a wrong field.
use aya_ebpf::{
    EbpfContext,
    cty::c_void,
    helpers::{bpf_probe_read_user, generated},
    macros::map,
    maps::{PerCpuArray, ProgramArray},
};
use meshless_common::{
    Counter, Direction, FLAG_ACCEPTED, FLAG_CONTINUATION, FLAG_NEW_CONN, FLAG_TRUNCATED, FLAG_UNCONFIRMED, MAX_CAPTURE,
    MAX_IOVECS,
};

use crate::{
    capture::{IoVec, emit_plain, fill_header_of, iovecs, read_user, submit},
    context,
    maps::{Args, CONNS, ConnState, EventBuf, H2Way, SCRATCH, conn_key, count},
};

/// `H2Way::bits`: the direction's framing is known.
pub const SYNCED: u32 = 1;
/// `H2Way::bits`: the open payload (`left`) is a skipped DATA payload.
const SKIP: u32 = 2;
/// `H2Way::bits`: bytes of a frame header already seen, shifted.
const GOT_SHIFT: u32 = 8;

/// Steps (frame header, payload piece, iovec) walked per syscall; a
/// syscall with more is cut there (the rest is sent as not captured).
const MAX_STEPS: u32 = 2048;
/// DATA payloads up to this size are copied like the frames around them:
/// a skipped payload ends the record, and a record costs more than this.
const SKIP_MIN: u64 = 256;

const FRAME_HEADER: u64 = 9;
const KIND_DATA: u8 = 0;
const KIND_CONTINUATION: u8 = 9;
/// The client preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") is not a frame.
const PREFACE_LEN: u64 = 24;
/// Largest frame accepted as a resync point (as userspace's parser).
const MAX_PLAUSIBLE_FRAME: u64 = 1 << 20;

/// State of one syscall's walk (per CPU; too much for a callback's stack,
/// and in a map value the verifier sees unknown scalars, so the callback's
/// states converge at once).
#[repr(C)]
pub struct H2Walk {
    /// The iovec array (0 for a plain buffer), its length, the next to load.
    ptr: u64,
    cnt: u64,
    next: u64,
    /// The piece of user memory being walked and the offset in it.
    base: u64,
    len: u64,
    in_off: u64,
    /// Offset in the syscall's bytes and the bytes it moved.
    pos: u64,
    ret: u64,
    /// Where the record being built starts, bytes copied into it, and
    /// whether skipped bytes follow them (then the next copy needs a new one).
    seg_start: u64,
    copied: u64,
    gap: u64,
    /// Payload bytes left of the open frame; 1 when they are skipped.
    left: u64,
    skip: u64,
    /// Bytes of the current frame header read so far (into `hdr`).
    got: u64,
    /// 1 until the first frame header proved plausible (unsynced start).
    resync: u64,
    /// 1 while every frame seen is a connection-management frame.
    control: u64,
    records: u64,
    failed: u64,
    flags: u64,
    hdr: [u8; 32],
}

#[map(name = "H2WALK")]
static H2WALK: PerCpuArray<H2Walk> = PerCpuArray::with_max_entries(1, 0);

/// The syscall handed to the walk program (what `emit_data` was called with).
#[repr(C)]
pub struct H2Call {
    id: u64,
    ret: u64,
    flags: u32,
    _pad: u32,
    args: Args,
    state: ConnState,
}

#[map(name = "H2_CALL")]
static H2_CALL: PerCpuArray<H2Call> = PerCpuArray::with_max_entries(1, 0);

/// Stores a syscall of an HTTP/2 connection for the walk program; false
/// when there is no room (the caller then captures it as plain).
#[inline(always)]
pub fn prepare(id: u64, args: &Args, ret: u64, state: &ConnState, flags: u32) -> bool {
    let Some(call) = H2_CALL.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, used by one program at a time on this CPU.
    let call = unsafe { &mut *call };
    (call.id, call.ret, call.flags) = (id, ret, flags);
    call.args = *args;
    call.state = *state;
    true
}

/// Forgets the framing of the syscall's direction (its bytes were not
/// walked): the next syscall there resyncs.
#[inline(always)]
pub fn unsync(id: u64, args: &Args, state: &ConnState) {
    let Some(live) = CONNS.get_ptr_mut(&conn_key((id >> 32) as u32, args.fd)) else {
        return;
    };
    // SAFETY: map values stay valid for the program's run.
    let live = unsafe { &mut *live };
    if live.conn_id == state.conn_id {
        live.h2[usize::from(args.direction == Direction::Egress as u32) & 1] = H2Way::default();
    }
}

/// The walk program's body (tail-called through slot `TAIL_H2_WALK` of
/// `tails`, a program array of `ctx`'s type): walks the syscall `prepare`
/// stored, or captures it as plain where its framing is not known. It
/// finishes the syscall as `emit_data` would have: the caller does not
/// continue after the tail call.
#[inline(always)]
pub fn walk<C: EbpfContext>(ctx: &C, tails: &ProgramArray) {
    let Some(call) = H2_CALL.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU value, filled by the program that tail-called us.
    let call = unsafe { &*call };
    let (id, ret, flags, args, state) = (call.id, call.ret, call.flags, &call.args, &call.state);
    if follow(id, args, ret, state, flags) {
        // Bytes a server read whose request start the kernel cannot see.
        if args.ctx.flags == 0 && args.direction == Direction::Ingress as u32 && state.flags & FLAG_ACCEPTED != 0 {
            context::unknown_read(id, args.fd);
        }
        return;
    }
    emit_plain(ctx, tails, id, args, ret as usize, state, flags);
}

/// Sends the syscall's bytes of an HTTP/2 connection as framed records;
/// false when the framing is unknown here (the caller then captures as for
/// any other connection). `flags` are the first record's.
#[inline(never)]
pub fn follow(id: u64, args: &Args, ret: u64, state: &ConnState, flags: u32) -> bool {
    let tgid = (id >> 32) as u32;
    let Some(live) = CONNS.get_ptr_mut(&conn_key(tgid, args.fd)) else {
        return false;
    };
    // SAFETY: map values stay valid for the program's run.
    let live = unsafe { &mut *live };
    if live.conn_id != state.conn_id || ret == 0 {
        return false;
    }
    let dir = usize::from(args.direction == Direction::Egress as u32) & 1;
    let way = live.h2[dir];
    let (Some(w), Some(ev)) = (H2WALK.get_ptr_mut(0), SCRATCH.get_ptr_mut(0)) else {
        return false;
    };
    let Some((ptr, cnt, plain)) = iovecs(args) else {
        return false;
    };
    // SAFETY: per-CPU values, used by one program at a time on this CPU.
    let (w, ev) = unsafe { (&mut *w, &mut *ev) };
    start(w, way, ptr, cnt, plain, ret);
    w.flags = u64::from(flags | state.flags);
    fill_header_of(ev, id, args, state);
    // SAFETY: the callback is a static BPF function that finds its state
    // in the per-CPU maps itself.
    unsafe {
        generated::bpf_loop(MAX_STEPS, step as *mut c_void, core::ptr::null_mut(), 0);
    }
    let done = w.pos >= w.ret && w.resync == 0;
    if w.failed != 0 || (w.resync != 0 && w.records == 0) {
        // No plausible frame header at the start: capture as before.
        live.h2[dir] = H2Way::default();
        return false;
    }
    let at_boundary = w.left == 0 && w.got == 0;
    if done && at_boundary && w.control != 0 && w.records == 0 && flags & (FLAG_NEW_CONN | FLAG_UNCONFIRMED) == 0 {
        // Nothing userspace reads, and framing goes on after it: no record
        // (and no sequence number, so none is missed).
        live.h2[dir] = saved(w);
        return true;
    }
    let cut = if done {
        0
    } else {
        count(Counter::Truncated);
        FLAG_TRUNCATED
    };
    flush(w, ev, w.ret, cut);
    live.h2[dir] = if done { saved(w) } else { H2Way::default() };
    true
}

/// Sets the walk up for a syscall of `ret` bytes from where the
/// direction's previous one left off.
#[inline(always)]
fn start(w: &mut H2Walk, way: H2Way, ptr: u64, cnt: u64, plain: bool, ret: u64) {
    if plain {
        (w.ptr, w.cnt, w.base, w.len) = (0, 0, ptr, ret);
    } else {
        let max = MAX_IOVECS as u64;
        (w.ptr, w.cnt, w.base, w.len) = (ptr, if cnt < max { cnt } else { max }, 0, 0);
    }
    (w.next, w.in_off, w.pos, w.ret) = (0, 0, 0, ret);
    (w.seg_start, w.copied, w.gap, w.records, w.failed) = (0, 0, 0, 0, 0);
    if way.bits & SYNCED != 0 {
        w.left = u64::from(way.left);
        w.skip = u64::from(way.bits & SKIP != 0);
        w.got = u64::from((way.bits >> GOT_SHIFT) & 15);
        w.hdr[..4].copy_from_slice(&way.hdr);
        w.resync = 0;
    } else {
        (w.left, w.skip, w.got, w.resync) = (0, 0, 0, 1);
    }
    w.control = u64::from(w.resync == 0 && w.left == 0 && w.got == 0);
}

/// Where the next syscall of this direction starts.
#[inline(always)]
fn saved(w: &H2Walk) -> H2Way {
    let skip = if w.skip != 0 { SKIP } else { 0 };
    H2Way {
        left: w.left as u32,
        bits: SYNCED | skip | ((w.got as u32 & 15) << GOT_SHIFT),
        hdr: [w.hdr[0], w.hdr[1], w.hdr[2], w.hdr[3]],
    }
}

/// Sends the record built so far, ending at `end`, and starts the next.
#[inline(never)]
fn flush(w: &mut H2Walk, ev: &mut EventBuf, end: u64, extra: u32) {
    if end <= w.seg_start {
        return;
    }
    let flags = w.flags as u32;
    ev.header.len = (end - w.seg_start) as u32;
    ev.header.captured = w.copied as u32;
    ev.header.flags = extra
        | if w.records == 0 {
            flags
        } else {
            (flags & !FLAG_TRUNCATED & !FLAG_NEW_CONN) | FLAG_CONTINUATION
        };
    if w.records != 0 {
        crate::mem::zero(&mut ev.header.ctx);
    }
    submit(ev, (w.copied as usize) & (MAX_CAPTURE * 2 - 1));
    w.records += 1;
    w.seg_start = end;
    w.copied = 0;
    w.gap = 0;
}

/// One step of a walk: load an iovec, read (part of) a frame header, or
/// copy or skip (part of) a payload. Returns 1 to stop.
#[inline(never)]
extern "C" fn step(_i: u64, _ctx: *mut c_void) -> i64 {
    let (Some(w), Some(ev)) = (H2WALK.get_ptr_mut(0), SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: per-CPU values of the program running the loop.
    let (w, ev) = unsafe { (&mut *w, &mut *ev) };
    if w.pos >= w.ret {
        return 1;
    }
    if w.in_off >= w.len {
        if w.next >= w.cnt {
            return 1;
        }
        // SAFETY: user pointer read through the checked helper.
        let Ok(iov) = (unsafe { bpf_probe_read_user((w.ptr as *const IoVec).wrapping_add(w.next as usize)) }) else {
            count(Counter::ReadUserFailed);
            return 1;
        };
        (w.next, w.base, w.len, w.in_off) = (w.next + 1, iov.base, iov.len, 0);
        return 0;
    }
    let piece = w.len - w.in_off;
    let rest = w.ret - w.pos;
    let avail = if piece < rest { piece } else { rest };
    if w.left == 0 {
        frame_header(w, ev, avail)
    } else {
        payload(w, ev, avail)
    }
}

/// Reads up to `avail` bytes of the current frame header (into the record
/// and into `hdr`); decides the frame's payload once the header is whole.
#[inline(always)]
fn frame_header(w: &mut H2Walk, ev: &mut EventBuf, avail: u64) -> i64 {
    let got = w.got;
    if got >= FRAME_HEADER {
        return 1;
    }
    let want = FRAME_HEADER - got;
    let n = if want < avail { want } else { avail };
    if w.gap != 0 || w.copied + n > MAX_CAPTURE as u64 {
        flush(w, ev, w.pos, 0);
    }
    let src = w.base + w.in_off;
    // `got < 9` and `n <= 9`: inside the 32-byte `hdr`.
    let dst = w.hdr.as_mut_ptr().wrapping_add((got & 15) as usize);
    // SAFETY: dst has room for n bytes, see above.
    let read = unsafe { generated::bpf_probe_read_user(dst.cast(), (n & 15) as u32, src as *const _) };
    let copy = ev.data.as_mut_ptr().wrapping_add((w.copied as usize) & (MAX_CAPTURE - 1));
    if read != 0 || read_user(copy, src, n as usize).is_err() {
        count(Counter::ReadUserFailed);
        return 1;
    }
    advance(w, n);
    w.copied += n;
    w.got = got + n;
    if w.got < FRAME_HEADER {
        return 0;
    }
    w.got = 0;
    frame(w)
}

/// A whole frame header is in `hdr`: what to do with its payload.
#[inline(always)]
fn frame(w: &mut H2Walk) -> i64 {
    let h = &w.hdr;
    if h[0] == b'P' && h[1] == b'R' && h[2] == b'I' && h[3] == b' ' {
        // The preface: its remaining bytes are copied like a payload.
        (w.left, w.skip, w.control, w.resync) = (PREFACE_LEN - FRAME_HEADER, 0, 0, 0);
        return 0;
    }
    let len = (h[0] as u64) << 16 | (h[1] as u64) << 8 | h[2] as u64;
    let kind = h[3];
    if w.resync != 0 && !plausible(kind, len, h[5] & 0x7f | h[6] | h[7] | h[8]) {
        w.failed = 1;
        return 1;
    }
    w.resync = 0;
    if !matches!(kind, 2 | 4 | 6 | 8) {
        w.control = 0;
    }
    w.left = len;
    w.skip = u64::from(kind == KIND_DATA && len > SKIP_MIN);
    0
}

/// Could a frame start here (the walk restarting at a syscall's start)?
/// `stream` is nonzero when the frame's stream id is.
#[inline(always)]
fn plausible(kind: u8, len: u64, stream: u8) -> bool {
    let needs_stream = matches!(kind, 0..=3);
    let connection_only = matches!(kind, 4 | 6 | 7);
    kind < KIND_CONTINUATION
        && len <= MAX_PLAUSIBLE_FRAME
        && (!needs_stream || stream != 0)
        && (!connection_only || stream == 0)
}

/// Copies or skips up to `avail` bytes of the open frame's payload.
#[inline(always)]
fn payload(w: &mut H2Walk, ev: &mut EventBuf, avail: u64) -> i64 {
    let n = if w.left < avail { w.left } else { avail };
    if w.skip != 0 {
        advance(w, n);
        w.left -= n;
        w.gap = 1;
        return 0;
    }
    if w.gap != 0 || w.copied >= MAX_CAPTURE as u64 {
        flush(w, ev, w.pos, 0);
    }
    let room = MAX_CAPTURE as u64 - w.copied;
    let n = if n < room { n } else { room };
    let dst = ev.data.as_mut_ptr().wrapping_add((w.copied as usize) & (MAX_CAPTURE - 1));
    if read_user(dst, w.base + w.in_off, n as usize).is_err() {
        count(Counter::ReadUserFailed);
        return 1;
    }
    advance(w, n);
    w.copied += n;
    w.left -= n;
    0
}

#[inline(always)]
fn advance(w: &mut H2Walk, n: u64) {
    w.pos += n;
    w.in_off += n;
}
