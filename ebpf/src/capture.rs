//! Copying payload prefixes into ring-buffer events, HTTP detection, and
//! the tracking of HTTP connections per (tgid, fd).
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_user, generated},
};
use meshless_common::{
    ConnAddrs, Counter, Direction, EventKind, FLAG_NEW_CONN, FLAG_TRUNCATED, HEADER_SIZE, MAX_CAPTURE, MAX_IOVECS,
    TraceCtx,
};

use crate::context;
use aya_ebpf::programs::TracePointContext;

use crate::maps::{
    ACTIVE, ADDRS, SERVER_CTX, Args, BUF_IOVEC, BUF_MSGHDR, BUF_PLAIN, CONNS, COUNTERS, ConnState, EVENTS, SCRATCH, count,
    wakeup_bytes,
};

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// Offset of `msg_iov` and `msg_iovlen` in `struct user_msghdr` (64-bit).
const MSG_IOV_OFFSET: u64 = 16;

/// Resolves a stashed buffer argument to (iovec array, iovec count), or a
/// plain buffer as a single pseudo-iovec.
fn iovecs(args: &Args) -> Option<(u64, u64, bool)> {
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

/// Reads the first eight payload bytes of a syscall buffer.
pub fn first_bytes(args: &Args) -> Option<[u8; 8]> {
    let (ptr, cnt, plain) = iovecs(args)?;
    let base = if plain {
        ptr
    } else {
        if cnt == 0 {
            return None;
        }
        // SAFETY: user pointer read through the checked helper.
        let iov: IoVec = unsafe { bpf_probe_read_user(ptr as *const IoVec) }.ok()?;
        if iov.len < 4 {
            return None;
        }
        iov.base
    };
    // SAFETY: as above; a short buffer makes the helper fail, not fault.
    unsafe { bpf_probe_read_user(base as *const [u8; 8]) }.ok()
}

/// True when bytes start like an HTTP/1.x request or response. Userspace
/// validates fully; this only keeps the kernel from following sockets that
/// are certainly not HTTP. (The HTTP/2 preface `PRI * HTTP/2.0` is left out
/// until userspace parses HTTP/2: following it would only cost.)
pub fn looks_like_http(b: &[u8; 8]) -> bool {
    let head = [b[0], b[1], b[2], b[3]];
    match &head {
        b"GET " | b"PUT " => true,
        b"POST" | b"HEAD" => b[4] == b' ',
        b"HTTP" => b[4] == b'/',
        b"DELE" => b[4] == b'T',
        b"PATC" => b[4] == b'H',
        b"OPTI" => b[4] == b'O',
        b"CONN" => b[4] == b'E',
        b"TRAC" => b[4] == b'E',
        _ => false,
    }
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

/// Returns the state of a tracked connection, or starts tracking it when
/// `detect` says its first bytes look like HTTP.
pub fn tracked_conn(key: u64, args: &Args, detect: bool) -> Option<(&'static ConnState, u32)> {
    // SAFETY: map values stay valid for the program's run.
    if let Some(state) = unsafe { CONNS.get(&key) } {
        return Some((state, 0));
    }
    if !detect || !looks_like_http(&first_bytes(args)?) {
        return None;
    }
    let mut state = ConnState {
        conn_id: unsafe { bpf_ktime_get_ns() },
        flags: 0,
        _pad: 0,
        addrs: ConnAddrs::default(),
    };
    // SAFETY: map values stay valid for the program's run.
    if let Some(k) = unsafe { ADDRS.get(&key) } {
        state.flags = k.flags;
        state.addrs = k.addrs;
        if k.sk != 0 {
            // A connected socket: its full 4-tuple was recorded at ESTABLISHED.
            // SAFETY: as above.
            if let Some(full) = unsafe { ACTIVE.get(&k.sk) } {
                state.addrs = *full;
            }
            let _ = ACTIVE.remove(&k.sk);
        }
    }
    if CONNS.insert(&key, &state, 0).is_err() {
        count(Counter::ConnTableFull);
        return None;
    }
    count(Counter::ConnsTracked);
    // SAFETY: as above (just inserted; an LRU eviction in between only loses this event).
    unsafe { CONNS.get(&key) }.map(|s| (s, FLAG_NEW_CONN))
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
    let mut off = 0usize;
    for i in 0..MAX_IOVECS {
        if i as u64 >= cnt || off >= want {
            break;
        }
        // SAFETY: user pointer read through the checked helper.
        let Ok(iov) = (unsafe { bpf_probe_read_user((ptr as *const IoVec).wrapping_add(i)) }) else {
            break;
        };
        let room = want - off;
        let n = if iov.len as usize > room {
            room
        } else {
            iov.len as usize
        };
        // `off < MAX_CAPTURE` and `n <= MAX_CAPTURE`: in bounds of the 2x buffer.
        let dst = buf.wrapping_add(off & (MAX_CAPTURE - 1));
        if read_user(dst, iov.base, n).is_err() {
            count(Counter::ReadUserFailed);
            break;
        }
        off += n;
    }
    off
}

fn read_user(dst: *mut u8, src: u64, len: usize) -> Result<(), i64> {
    let len = (len & (MAX_CAPTURE * 2 - 1)) as u32;
    if len > MAX_CAPTURE as u32 {
        return Err(-1);
    }
    // SAFETY: dst points into the per-CPU scratch buffer with room for len.
    let ret = unsafe { generated::bpf_probe_read_user(dst.cast(), len, src as *const _) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}

#[inline(always)]
/// Emits one Data event for a finished syscall on a tracked connection.
pub fn emit_data(tp: &TracePointContext, id: u64, args: &Args, ret: usize, state: &ConnState, flags: u32) {
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let ev = unsafe { &mut *ev };
    let captured = if ret > 0 {
        copy_payload(ev.data.as_mut_ptr(), args, ret)
    } else {
        0
    };

    let mut flags = flags | state.flags;
    if captured < ret {
        flags |= FLAG_TRUNCATED;
        count(Counter::Truncated);
    }
    fill_header(ev, tgid, tid, args.fd, EventKind::Data, state);
    ev.header.direction = args.direction;
    ev.header.syscall = args.syscall;
    ev.header.len = ret as u32;
    ev.header.captured = captured as u32;
    ev.header.flags = flags;
    ev.header.ctx = args.ctx;
    if args.ctx.flags == 0 && captured >= 8 {
        let first = [
            ev.data[0], ev.data[1], ev.data[2], ev.data[3], ev.data[4], ev.data[5], ev.data[6], ev.data[7],
        ];
        if args.direction == Direction::Ingress as u32 && context::starts_request(&first) {
            // Does not return when it works; on failure the event goes out
            // without a context below.
            // SAFETY: the slot holds a tracepoint program like this one.
            unsafe { SERVER_CTX.tail_call(tp, 0) };
        } else if args.direction == Direction::Egress as u32 && &first[..5] == b"HTTP/" {
            context::response_written(tgid, args.fd);
        }
    }
    submit(ev, captured);
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
}

/// Emits a header-only Exec event for the current process.
pub fn emit_exec(tgid: u32, tid: u32) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in emit_data.
    let ev = unsafe { &mut *ev };
    let none = ConnState {
        conn_id: 0,
        flags: 0,
        _pad: 0,
        addrs: ConnAddrs::default(),
    };
    fill_header(ev, tgid, tid, 0, EventKind::Exec, &none);
    ev.header.direction = 0;
    ev.header.syscall = 0;
    ev.header.len = 0;
    ev.header.captured = 0;
    ev.header.flags = 0;
    ev.header.ctx = TraceCtx::default();
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
    ev.header.ctx = TraceCtx::default();
    submit(ev, 0);
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
    h._pad = 0;
    h.addrs = state.addrs;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
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

fn submit(ev: &mut crate::maps::EventBuf, captured: usize) {
    let size = HEADER_SIZE + (captured & (MAX_CAPTURE * 2 - 1));
    let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    high_water(used);
    let flags = if used > wakeup_bytes() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    // SAFETY: size <= size_of::<EventBuf>() by construction.
    let bytes = unsafe { core::slice::from_raw_parts((ev as *const crate::maps::EventBuf).cast::<u8>(), size) };
    if EVENTS.output::<[u8]>(bytes, flags as u64).is_ok() {
        count(Counter::EventsSent);
    } else {
        count(Counter::RingbufFull);
    }
}
