//! Uprobes on OpenSSL (`SSL_read`, `SSL_write` and their `_ex` variants):
//! the plaintext of TLS connections, emitted as Data events of the socket
//! the TLS session runs on, flagged `FLAG_TLS`.
//!
//! How plaintext finds its socket: while a thread is inside an SSL call,
//! the read/write syscalls it makes are the TLS records of that call; the
//! syscall probes record their fd in the thread's `TLS_CALLS` entry (and do
//! not capture the ciphertext). The fd is remembered per `SSL *` for reads
//! OpenSSL serves from its buffer without a syscall. Once a connection is
//! followed as TLS, its socket's own bytes are ignored (`FLAG_TLS` on the
//! `CONNS` entry), so handshake and alert records never reach the parsers.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use meshless_common::{Direction, FLAG_NEW_CONN, FLAG_TLS, Syscall, TlsCounter, TraceCtx};

use super::current;
use crate::{
    capture::{emit_data, emit_held, known_addrs},
    context::{client_request, starts_request},
    follow::tracked_conn,
    maps::{
        BUF_PLAIN, CONNS, FOLLOW, GoKey, TLS_ARGS, TLS_CALLS, TLS_COUNTERS, TLS_FDS, TLS_NO_FD, TLS_SERVER_CTX,
        TlsCall, conn_key,
    },
};

pub fn tls_count(counter: TlsCounter) {
    if let Some(slot) = TLS_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// A syscall this long after its thread entered an SSL call is not taken
/// as part of it: the call's return was missed (a thread that died inside
/// it, a probe attached mid-call) and its tid may be another thread's now.
const CALL_STALE_NS: u64 = 10 * 1_000_000_000;

/// Called by the read/write syscall probes at entry: true when the thread
/// is inside an SSL call (the syscall moves ciphertext of `fd`, which is
/// recorded for the call and not captured).
#[inline(always)]
pub fn inside_ssl_call(id: u64, fd: u32) -> bool {
    let Some(call) = TLS_CALLS.get_ptr_mut(&id) else {
        return false;
    };
    // SAFETY: an entry of this map, only this thread writes it.
    let call = unsafe { &mut *call };
    // SAFETY: no preconditions.
    if unsafe { bpf_ktime_get_ns() }.saturating_sub(call.ktime_ns) > CALL_STALE_NS {
        let _ = TLS_CALLS.remove(&id);
        return false;
    }
    call.fd = fd;
    true
}

/// (arg0..arg3) of a uprobe on a C function (System V amd64 ABI).
#[inline(always)]
fn c_args(ctx: &ProbeContext) -> (u64, u64, u64, u64) {
    // SAFETY: the context of a uprobe is the user pt_regs.
    unsafe { ((*ctx.regs).rdi, (*ctx.regs).rsi, (*ctx.regs).rdx, (*ctx.regs).rcx) }
}

/// Stashes an SSL call at its entry.
#[inline(always)]
fn enter(ctx: &ProbeContext, direction: Direction, ex: bool) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    let (ssl, buf, num, len_ptr) = c_args(ctx);
    let mut call = TlsCall {
        ssl,
        buf,
        len_ptr: if ex { len_ptr } else { 0 },
        fd: TLS_NO_FD,
        direction: direction as u32,
        // SAFETY: no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        ctx: TraceCtx::default(),
    };
    // `num` is a C int for SSL_write (upper half of RDX undefined).
    let num = if ex { num } else { num as u32 as u64 };
    if direction == Direction::Egress && num >= 8 {
        // A request written here gets its context now, like a plaintext
        // write at sys_enter (before its bytes leave).
        // SAFETY: user pointer read through the checked helper.
        if let Ok(first) = unsafe { bpf_probe_read_user(buf as *const [u8; 8]) } {
            if starts_request(&first) {
                let fd = known_fd(tgid, ssl);
                let addrs = if fd == TLS_NO_FD {
                    None
                } else {
                    let key = conn_key(tgid, fd);
                    // SAFETY: map values stay valid for the program's run.
                    unsafe { CONNS.get(&key) }
                        .map(|s| &s.addrs)
                        .or_else(|| known_addrs(key))
                };
                client_request(id, addrs, &mut call.ctx);
            }
        }
    }
    if TLS_CALLS.insert(&id, &call, 0).is_err() {
        tls_count(TlsCounter::CallsTableFull);
    }
    0
}

#[inline(always)]
fn known_fd(tgid: u32, ssl: u64) -> u32 {
    let key = GoKey {
        tgid,
        _pad: 0,
        ptr: ssl,
    };
    // SAFETY: copied out at once.
    unsafe { TLS_FDS.get(&key) }.copied().unwrap_or(TLS_NO_FD)
}

/// Bytes a finished SSL call moved (0: none or failed).
#[inline(always)]
fn moved(ctx: &RetProbeContext, ex: bool, len_ptr: u64) -> u64 {
    // The functions return a C int: only EAX is defined (-1 arrives as
    // 0xffffffff with the upper half clear, nginx's WANT_READ).
    // SAFETY: the context of a uretprobe is the user pt_regs.
    let ret = unsafe { (*ctx.regs).rax } as u32 as i32;
    if !ex {
        return if ret > 0 { ret as u64 } else { 0 };
    }
    if ret != 1 {
        return 0;
    }
    // SAFETY: user pointer read through the checked helper.
    unsafe { bpf_probe_read_user(len_ptr as *const u64) }.unwrap_or(0)
}

/// The socket of an SSL call: the fd its syscalls named (remembered for
/// the `SSL *`), else the one remembered, else `TLS_NO_FD`.
#[inline(never)]
fn call_fd(tgid: u32, ssl: u64, seen: u32) -> u32 {
    if seen == TLS_NO_FD {
        return known_fd(tgid, ssl);
    }
    let key = GoKey {
        tgid,
        _pad: 0,
        ptr: ssl,
    };
    let _ = TLS_FDS.insert(&key, &seen, 0);
    seen
}

/// Emits the plaintext of a finished SSL call as a Data event of its socket.
/// (The call is read in place, not copied: the stack is shared with the
/// emitting code below, and the BPF stack limit is 512 bytes.)
#[inline(always)]
fn leave(ctx: &RetProbeContext, ex: bool) -> u32 {
    let Some((id, tgid, tid)) = current() else {
        return 0;
    };
    // SAFETY: map values stay valid for the program's run.
    let Some(call) = (unsafe { TLS_CALLS.get(&id) }) else {
        return 0;
    };
    let n = moved(ctx, ex, call.len_ptr);
    let fd = if n == 0 {
        TLS_NO_FD
    } else {
        call_fd(tgid, call.ssl, call.fd)
    };
    let Some(args) = TLS_ARGS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let args = unsafe { &mut *args };
    let ingress = call.direction == Direction::Ingress as u32;
    args.ptr = call.buf;
    args.count = n;
    args.fd = fd;
    args.layout = BUF_PLAIN;
    args.syscall = if ingress { Syscall::Read } else { Syscall::Write } as u32;
    args.direction = call.direction;
    args.ctx = call.ctx;
    let _ = TLS_CALLS.remove(&id);
    if n == 0 {
        return 0;
    }
    tls_count(TlsCounter::Calls);
    if fd == TLS_NO_FD {
        tls_count(TlsCounter::NoSocket);
        return 0;
    }
    let key = conn_key(tgid, fd);
    let Some(f) = FOLLOW.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let f = unsafe { &mut *f };
    if !tracked_conn(key, args, n as usize, true, f) {
        return 0;
    }
    if f.state.flags & FLAG_TLS == 0 {
        f.state.flags |= FLAG_TLS;
        if let Some(state) = CONNS.get_ptr_mut(&key) {
            // SAFETY: map values stay valid for the program's run.
            unsafe { (*state).flags |= FLAG_TLS };
        }
    }
    let mut flags = f.flags;
    if f.has_held != 0 {
        emit_held(tgid, tid, args, &f.held, &f.state, flags);
        flags &= !FLAG_NEW_CONN;
    }
    tls_count(TlsCounter::Events);
    emit_data(ctx, &TLS_SERVER_CTX, id, args, n as usize, &f.state, flags);
    0
}

#[uprobe]
pub fn meshless_ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Ingress, false)
}

#[uretprobe]
pub fn meshless_ssl_read_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, false)
}

#[uprobe]
pub fn meshless_ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Ingress, true)
}

#[uretprobe]
pub fn meshless_ssl_read_ex_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, true)
}

#[uprobe]
pub fn meshless_ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Egress, false)
}

#[uretprobe]
pub fn meshless_ssl_write_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, false)
}

#[uprobe]
pub fn meshless_ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Egress, true)
}

#[uretprobe]
pub fn meshless_ssl_write_ex_ret(ctx: RetProbeContext) -> u32 {
    leave(&ctx, true)
}

/// Tail-called by the return probes for a request a server read.
#[uprobe]
pub fn meshless_tls_server_ctx(_ctx: ProbeContext) -> u32 {
    crate::capture::finish_server_request();
    0
}

/// Tail-called by the TLS probes for plaintext of an HTTP/2 connection
/// (its frame walk, verified once here).
#[uprobe]
pub fn meshless_tls_h2_walk(ctx: ProbeContext) -> u32 {
    crate::h2::walk(&ctx, &TLS_SERVER_CTX);
    0
}
