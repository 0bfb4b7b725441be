//! HTTP/2 framing followed in the kernel, per connection direction, so
//! that DATA payloads are not copied: userspace reads frame headers and
//! header blocks but skips DATA payloads, also when they were not
//! captured. A syscall entirely inside a DATA payload gives a header-only
//! event; one whose last frame is DATA is captured up to that frame's
//! header. The event's `len` stays the bytes moved, so userspace needs no
//! change. Syscalls of connection-management frames only give no event.
//!
//! The walk sees only a syscall's first MAX_CAPTURE bytes (already in the
//! scratch event): where a frame header lies past them, or a syscall ends
//! inside one, the direction is unsynced and captured whole as before,
//! until a syscall starts with an unmistakable HEADERS frame.
use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop};
use meshless_common::MAX_CAPTURE;

use crate::{
    detect::{WINDOW, is_h2_headers},
    maps::{ConnState, SCRATCH},
};

/// Framing unknown: capture as before.
pub const UNSYNCED: u32 = 0;
/// The next syscall starts `h2_left` bytes before a frame header; those
/// bytes end a frame userspace reads (HEADERS, RST_STREAM, ...).
pub const NEEDED: u32 = 1;
/// As NEEDED, but the `h2_left` bytes end a DATA payload (not read).
pub const DATA: u32 = 2;

/// Most frames walked per syscall (a burst of small HEADERS frames has
/// more; the direction is then unsynced).
const MAX_FRAMES: u32 = 64;

const FRAME_HEADER: usize = 9;
const KIND_DATA: u8 = 0;

/// The client preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") is not a frame.
const PREFACE_LEN: usize = 24;

/// Index of a direction in the per-direction fields.
#[inline(always)]
pub fn way(egress: bool) -> usize {
    usize::from(egress)
}

/// True when a syscall of `ret` bytes lies entirely inside the DATA
/// payload the previous one left open; takes its bytes off that payload.
#[inline(always)]
pub fn take_inside_data(live: &mut ConnState, dir: usize, ret: usize) -> bool {
    let dir = dir & 1;
    if live.h2_mode[dir] != DATA || ret as u64 > live.h2_left[dir] as u64 {
        return false;
    }
    live.h2_left[dir] -= ret as u32;
    true
}

/// What [`walk`] returns for a syscall of whole SETTINGS / PING /
/// WINDOW_UPDATE / PRIORITY frames only, from a frame boundary: nothing
/// userspace reads. (Otherwise it returns the bytes worth keeping.)
pub const CONTROL_ONLY: u64 = u64::MAX;

/// Walks the frames of a syscall of `ret` bytes whose first `captured`
/// are in `data`, from where the previous syscall left off; records where
/// the next syscall starts and returns the bytes worth keeping (up to the
/// last frame's header when that frame is DATA, else `captured`) or
/// [`CONTROL_ONLY`]. (Not inlined: verified apart from each probe's paths.)
#[inline(never)]
pub fn walk(live: &mut ConnState, dir: usize, data: &[u8; MAX_CAPTURE * 2], ret: usize, captured: usize) -> u64 {
    let keep_all = (captured & (MAX_CAPTURE * 2 - 1)) as u64;
    let dir = dir & 1;
    let mode = live.h2_mode[dir];
    let mut off = live.h2_left[dir] as usize;
    live.h2_mode[dir] = UNSYNCED;
    live.h2_left[dir] = 0;
    if mode == UNSYNCED {
        let mut window = [0u8; WINDOW];
        window.copy_from_slice(&data[..WINDOW]);
        if !is_h2_headers(&window, captured) {
            return keep_all;
        }
        off = 0;
    }
    let at_start = off == 0;
    if at_start && captured >= PREFACE_LEN && data[0] == b'P' && data[1] == b'R' && data[2] == b'I' && data[3] == b' ' {
        off = PREFACE_LEN;
    }
    if off >= ret {
        // Still inside the payload left open (DATA ones never get here).
        live.h2_mode[dir] = mode;
        live.h2_left[dir] = (off - ret) as u32;
        return keep_all;
    }
    let mut w = FrameWalk {
        off: off as u64,
        ret: ret as u64,
        captured: captured as u64,
        found: 0,
        last_off: 0,
        last_next: 0,
        last_kind: 0,
        control: u64::from(at_start && ret == captured && ret <= CONTROL_MAX),
    };
    // SAFETY: the callback is a static BPF function; the context is this
    // stack slot, valid for the whole call.
    unsafe {
        bpf_loop(
            MAX_FRAMES,
            walk_frame as *mut c_void,
            (&mut w as *mut FrameWalk).cast(),
            0,
        );
    }
    if w.found == 0 {
        // A header past the capture, split across syscalls, or too many frames.
        return keep_all;
    }
    let is_data = w.last_kind == u64::from(KIND_DATA);
    live.h2_mode[dir] = if is_data { DATA } else { NEEDED };
    live.h2_left[dir] = (w.last_next - w.ret) as u32;
    if w.control != 0 && w.last_next == w.ret {
        return CONTROL_ONLY;
    }
    if is_data {
        (w.last_off + FRAME_HEADER as u64) & (MAX_CAPTURE as u64 * 2 - 1)
    } else {
        keep_all
    }
}

/// State of a frame walk, shared with the bpf_loop callback (lives on the
/// caller's stack).
#[repr(C)]
struct FrameWalk {
    /// Where the next frame header starts in the syscall's bytes.
    off: u64,
    ret: u64,
    captured: u64,
    /// 1 once the syscall's last frame was found.
    found: u64,
    /// Start, end and kind of the last frame.
    last_off: u64,
    last_next: u64,
    last_kind: u64,
    /// 1 while every frame seen is a connection-management frame.
    control: u64,
}

/// One frame of a walk; returns 1 to stop.
#[inline(never)]
extern "C" fn walk_frame(_i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `FrameWalk` given to it.
    let w = unsafe { &mut *(ctx as *mut FrameWalk) };
    if w.off + FRAME_HEADER as u64 > w.captured {
        return 1;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // `off + 9 <= captured <= MAX_CAPTURE`: the mask only shows the bound.
    let o = (w.off as usize) & (MAX_CAPTURE - 1);
    // SAFETY: per-CPU scratch of this program; `o + 9` is inside `data`.
    let d = unsafe { &(*ev).data };
    let len = (d[o] as u64) << 16 | (d[o + 1] as u64) << 8 | d[o + 2] as u64;
    let (kind, flags) = (d[o + 3], d[o + 4]);
    if w.control != 0 && !control_frame(kind, flags, len, &[d[o + 5], d[o + 6], d[o + 7], d[o + 8]]) {
        w.control = 0;
    }
    let next = w.off + FRAME_HEADER as u64 + len;
    if next >= w.ret {
        w.found = 1;
        w.last_off = w.off;
        w.last_next = next;
        w.last_kind = u64::from(kind);
        return 1;
    }
    w.off = next;
    0
}

/// Largest syscall that can be [`CONTROL_ONLY`] (a SETTINGS frame
/// with every standard setting plus a WINDOW_UPDATE and a PING fits).
const CONTROL_MAX: usize = 96;

/// A frame userspace never reads, with its exact length and stream rule
/// (so that bytes inside another frame's payload practically never pass).
#[inline(always)]
fn control_frame(kind: u8, flags: u8, len: u64, stream: &[u8; 4]) -> bool {
    let stream0 = stream[0] & 0x7f == 0 && stream[1] == 0 && stream[2] == 0 && stream[3] == 0;
    match kind {
        // PRIORITY
        2 => !stream0 && len == 5 && flags == 0,
        // SETTINGS (an ACK is empty)
        4 => stream0 && ((flags == 1 && len == 0) || (flags == 0 && len % 6 == 0)),
        // PING (or its ACK)
        6 => stream0 && len == 8 && flags & !1 == 0,
        // WINDOW_UPDATE
        8 => len == 4 && flags == 0,
        _ => false,
    }
}
