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
//!
//! Memory BIOs (Node.js's TLSWrap) make no syscall inside the call: the
//! thread's entry is then kept between calls and notes the fd of its read
//! syscalls; the first `SSL *` to read after a socket read is tied to that
//! socket (see `by_thread`), and its writes use the fd so tied.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use meshless_common::{Direction, FLAG_NEW_CONN, FLAG_TLS, Syscall, TlsCounter, TraceCtx};

use super::current;
use crate::{
    capture::{emit_data, emit_held, request_addrs},
    context::{client_request, starts_request},
    follow::tracked_conn,
    maps::{
        Args, BUF_PLAIN, CONNS, FOLLOW, GoKey, TLS_ARGS, TLS_CALLS, TLS_COUNTERS, TLS_FD_BY_THREAD, TLS_FDS, TLS_NO_FD,
        TLS_SERVER_CTX, TlsCall, conn_key,
    },
    sock::{FdKind, fd_kind},
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
/// recorded for the call and not captured). A thread kept between
/// memory-BIO calls notes the fd of its reads instead (see [`by_thread`]).
#[inline(always)]
pub fn inside_ssl_call(id: u64, fd: u32, direction: Direction) -> bool {
    let Some(call) = TLS_CALLS.get_ptr_mut(&id) else {
        return false;
    };
    // SAFETY: an entry of this map, only this thread writes it.
    let call = unsafe { &mut *call };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if call.inside == 0 {
        if direction == Direction::Ingress {
            call.read_fd = fd;
            call.read_ns = now;
            call.read_claim = 0;
        }
        return false;
    }
    if now.saturating_sub(call.ktime_ns) > CALL_STALE_NS {
        call.inside = 0;
        return false;
    }
    // The first socket: not a file or eventfd the call touches meanwhile
    // (a certificate check reading /etc/localtime, a Node.js callback
    // waking its loop); their bytes take the usual path.
    if call.fd == TLS_NO_FD {
        if not_a_socket(fd) {
            return false;
        }
        call.fd = fd;
    }
    true
}

/// True when the kernel says `fd` is open and not a socket (checked once
/// per SSL call that makes syscalls; unknown counts as a socket).
#[inline(never)]
fn not_a_socket(fd: u32) -> bool {
    matches!(fd_kind(fd), FdKind::Other)
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
        read_claim: 0,
        read_ns: 0,
        read_fd: TLS_NO_FD,
        inside: 1,
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
                    request_addrs(unsafe { CONNS.get(&key) }, key)
                };
                client_request(id, addrs, &mut call.ctx);
            }
        }
    }
    if let Some(kept) = TLS_CALLS.get_ptr_mut(&id) {
        // A memory-BIO thread between calls: keep its last socket read.
        // SAFETY: an entry of this map, only this thread writes it.
        let kept = unsafe { &mut *kept };
        call.read_claim = kept.read_claim;
        call.read_ns = kept.read_ns;
        call.read_fd = kept.read_fd;
        *kept = call;
    } else if TLS_CALLS.insert(&id, &call, 0).is_err() {
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
    unsafe { TLS_FDS.get(&key) }.map_or(TLS_NO_FD, |fd| fd & !TLS_FD_BY_THREAD)
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

/// The socket of an SSL call that made a syscall: the fd it named
/// (remembered for the `SSL *`: it always wins over a thread tie).
#[inline(never)]
fn call_fd(tgid: u32, ssl: u64, seen: u32) -> u32 {
    let key = GoKey {
        tgid,
        _pad: 0,
        ptr: ssl,
    };
    let _ = TLS_FDS.insert(&key, &seen, 0);
    seen
}

/// A read syscall this long before a memory-BIO `SSL_read` is not taken as
/// its ciphertext (Node.js calls `SSL_read` synchronously from the read's
/// callback, microseconds later).
const READ_TIE_NS: u64 = 100 * 1_000_000;

/// The socket of an SSL call that made no syscall: the fd remembered for
/// its `SSL *` when that was seen inside a call (a socket BIO's read
/// served from OpenSSL's buffer); else, for a memory BIO (Node.js), the
/// socket the thread read just before, when this `SSL *` is the first to
/// read after it. A read already claimed by another `SSL *` is ambiguous:
/// the plaintext is dropped (`tls_ambiguous`), never tied wrongly. Writes
/// use the fd tied by the connection's reads, or tie it themselves when
/// none is known yet (then only a read syscall just before, unclaimed,
/// can be the one that completed their handshake).
#[inline(always)]
fn by_thread(tgid: u32, call: &mut TlsCall, n: u64) -> u32 {
    let key = GoKey {
        tgid,
        _pad: 0,
        ptr: call.ssl,
    };
    // SAFETY: copied out at once.
    let known = unsafe { TLS_FDS.get(&key) }.copied();
    if let Some(fd) = known {
        if fd & TLS_FD_BY_THREAD == 0 {
            return fd;
        }
    }
    let known = known.map_or(TLS_NO_FD, |fd| fd & !TLS_FD_BY_THREAD);
    let ingress = call.direction == Direction::Ingress as u32;
    // SAFETY: no preconditions.
    let fresh = unsafe { bpf_ktime_get_ns() }.saturating_sub(call.read_ns) < READ_TIE_NS;
    if call.read_fd == TLS_NO_FD || !fresh {
        return known;
    }
    if call.read_claim != 0 && call.read_claim != call.ssl {
        if !ingress {
            return known;
        }
        if n > 0 {
            tls_count(TlsCounter::Ambiguous);
        }
        return TLS_NO_FD;
    }
    // A write ties only a connection not tied yet: a client's first
    // request can be written (`ClearIn`) right after the read that
    // finished its handshake, before any `SSL_read` on it.
    if !ingress && known != TLS_NO_FD {
        return known;
    }
    call.read_claim = call.ssl;
    if call.read_fd == known {
        return known;
    }
    if !ciphertext_socket(tgid, call.read_fd) {
        return known;
    }
    // First tie, or the `SSL *` was freed and its address reused by a new
    // connection (the new one's handshake read re-ties it).
    let fd = call.read_fd | TLS_FD_BY_THREAD;
    let _ = TLS_FDS.insert(&key, &fd, 0);
    tls_count(TlsCounter::ThreadTies);
    call.read_fd
}

/// True when `fd` can carry TLS records: a socket not followed as
/// plaintext HTTP (an eventfd, pipe or file read, or a plaintext
/// connection read just before, is no evidence). An fd the kernel cannot
/// classify (no BTF offsets, or closed meanwhile) is not taken either.
#[inline(never)]
fn ciphertext_socket(tgid: u32, fd: u32) -> bool {
    // SAFETY: copied out at once.
    if let Some(state) = unsafe { CONNS.get(&conn_key(tgid, fd)) } {
        return state.flags & FLAG_TLS != 0;
    }
    match fd_kind(fd) {
        FdKind::Socket { .. } => true,
        FdKind::Other => false,
        FdKind::Unknown => false,
    }
}

/// Emits the plaintext of a finished SSL call as a Data event of its socket.
/// (The call is read in place, not copied: the stack is shared with the
/// emitting code below, and the BPF stack limit is 512 bytes.)
#[inline(always)]
fn leave(ctx: &RetProbeContext, ex: bool) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    let Some(call) = TLS_CALLS.get_ptr_mut(&id) else {
        return 0;
    };
    // SAFETY: an entry of this map, only this thread writes it.
    let call = unsafe { &mut *call };
    if call.inside == 0 {
        return 0;
    }
    let n = moved(ctx, ex, call.len_ptr);
    let membio = call.fd == TLS_NO_FD;
    let fd = if !membio {
        if n == 0 { TLS_NO_FD } else { call_fd(tgid, call.ssl, call.fd) }
    } else {
        by_thread(tgid, call, n)
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
    args.sent_ns = if ingress { 0 } else { call.ktime_ns };
    if membio {
        // Kept between calls: its next socket read ties the next call.
        call.inside = 0;
    } else {
        let _ = TLS_CALLS.remove(&id);
    }
    if n == 0 {
        return 0;
    }
    tls_count(TlsCounter::Calls);
    if fd == TLS_NO_FD {
        tls_count(TlsCounter::NoSocket);
        return 0;
    }
    emit_plaintext(ctx, id, args)
}

/// Emits the plaintext `args` describes as a Data event of its socket: the
/// connection is marked TLS (its encrypted records are not followed), bytes
/// held from before it was known go first. Shared with the Go probes.
#[inline(always)]
pub fn emit_plaintext<C: EbpfContext>(ctx: &C, id: u64, args: &Args) -> u32 {
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let n = args.count as usize;
    let key = conn_key(tgid, args.fd);
    let Some(f) = FOLLOW.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let f = unsafe { &mut *f };
    if !tracked_conn(key, args, n, true, f) {
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
    emit_data(ctx, &TLS_SERVER_CTX, id, args, n, &f.state, flags);
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
