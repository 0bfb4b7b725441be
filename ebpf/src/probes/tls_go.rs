//! Uprobes on Go's `crypto/tls.(*Conn)`: the plaintext of HTTPS in Go
//! programs, emitted as Data events of the connection's socket, flagged
//! `FLAG_TLS` (like the OpenSSL probes in `tls.rs`).
//!
//! Entry probes only (a return probe rewrites the return address on a
//! goroutine stack the runtime may move), each on an instruction the
//! kernel emulates (agent/src/tls/go.rs places them):
//! - `Write(b)`: on the JBE of its stack check. The plaintext is `b`
//!   (RBX, RCX), known before anything is encrypted.
//! - `Read(b)`: on the same JBE, the goroutine's `*Conn` and `b` are
//!   stashed; on the `CALL runtime.memmove` of the inlined
//!   `bytes.(*Reader).Read` that copies decrypted bytes into `b`, the
//!   registers hold (dst, src, n) before the copy: the plaintext is at src.
//!
//! The socket: `tls.Conn.conn` (a `net.Conn` at offset 0) whose itab is
//! `*net.TCPConn`'s (its hash in `GO_TLS_CONN_TYPES`) points to a
//! `net.conn{fd *netFD}`; `netFD.pfd.Sysfd` sits after the 16-byte
//! `fdMutex`. Once a connection's plaintext is followed, its own bytes
//! (handshake, encrypted records) are ignored (`FLAG_TLS` on `CONNS`).
use aya_ebpf::{helpers::bpf_probe_read_user, macros::uprobe, programs::ProbeContext};
use meshless_common::{Direction, Syscall, TlsCounter};

use super::{
    current,
    tls::{emit_plaintext, tls_count},
};
use crate::{
    capture::request_addrs,
    context::{client_request, starts_request},
    maps::{Args, BUF_PLAIN, CONNS, GO_TLS_CONN_TYPES, GO_TLS_READS, GoKey, GoTlsRead, TLS_ARGS, TLS_NO_FD, conn_key},
};

/// EFLAGS carry and zero bits: the JBE of a stack check jumps (to
/// `morestack`, after which the function starts over) when either is set.
const JBE_TAKEN: u64 = 1 | (1 << 6);

/// Offset of `Sysfd` in `net.netFD` (`pfd poll.FD` first, whose
/// `fdmu fdMutex{state uint64; rsema, wsema uint32}` precedes `Sysfd int`).
const NETFD_SYSFD: u64 = 16;
/// Offset of the type hash in a Go `itab` (after `inter`, `_type`).
const ITAB_HASH: u64 = 16;

/// The socket fd under a `*tls.Conn`, or `TLS_NO_FD` when its `net.Conn`
/// is not a `*net.TCPConn` of a traced executable.
#[inline(never)]
fn conn_fd(conn: u64) -> u32 {
    // SAFETY (all reads): user memory through the checked helper.
    let Ok([itab, data]) = (unsafe { bpf_probe_read_user(conn as *const [u64; 2]) }) else {
        return TLS_NO_FD;
    };
    let Ok(hash) = (unsafe { bpf_probe_read_user(itab.wrapping_add(ITAB_HASH) as *const u32) }) else {
        return TLS_NO_FD;
    };
    // SAFETY: presence check only.
    if unsafe { GO_TLS_CONN_TYPES.get(&hash) }.is_none() {
        return TLS_NO_FD;
    }
    let Ok(netfd) = (unsafe { bpf_probe_read_user(data as *const u64) }) else {
        return TLS_NO_FD;
    };
    match unsafe { bpf_probe_read_user(netfd.wrapping_add(NETFD_SYSFD) as *const i64) } {
        Ok(fd) if (0..i32::MAX as i64).contains(&fd) => fd as u32,
        _ => TLS_NO_FD,
    }
}

/// Fills the per-CPU `TLS_ARGS` for `n` plaintext bytes at `ptr` on `fd`.
#[inline(always)]
fn plaintext(ptr: u64, n: u64, fd: u32, direction: Direction) -> Option<&'static mut Args> {
    let args = TLS_ARGS.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let args = unsafe { &mut *args };
    args.ptr = ptr;
    args.count = n;
    args.fd = fd;
    args.layout = BUF_PLAIN;
    args.syscall = if direction == Direction::Ingress {
        Syscall::Read
    } else {
        Syscall::Write
    } as u32;
    args.direction = direction as u32;
    crate::mem::zero(&mut args.ctx);
    // Emitted at the call's entry: its own time is before the bytes leave.
    args.sent_ns = 0;
    Some(args)
}

/// `crypto/tls.(*Conn).Write(b)`: RAX = the `*Conn`, RBX/RCX = `b`'s
/// pointer and length. Go's `Write` writes all of `b` or fails.
#[uprobe]
pub fn meshless_go_tls_write(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    // SAFETY: the context of a uprobe is the user pt_regs.
    let (conn, buf, len, eflags) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).rcx, (*ctx.regs).eflags) };
    if eflags & JBE_TAKEN != 0 || len == 0 {
        // The stack grows (or the goroutine yields) first; the call
        // starts over and comes back here.
        return 0;
    }
    tls_count(TlsCounter::Calls);
    let fd = conn_fd(conn);
    if fd == TLS_NO_FD {
        tls_count(TlsCounter::NoSocket);
        return 0;
    }
    let Some(args) = plaintext(buf, len, fd, Direction::Egress) else {
        return 0;
    };
    if len >= 8 {
        // SAFETY: user pointer read through the checked helper.
        if let Ok(first) = unsafe { bpf_probe_read_user(buf as *const [u8; 8]) } {
            if starts_request(&first) {
                let key = conn_key(tgid, fd);
                // SAFETY: map values stay valid for the program's run.
                let addrs = request_addrs(unsafe { CONNS.get(&key) }, key);
                client_request(id, addrs, &mut args.ctx);
            }
        }
    }
    emit_plaintext(&ctx, id, args)
}

/// `crypto/tls.(*Conn).Read(b)`: remembers the goroutine's `*Conn` and
/// `b` for the copy below (a stack-growth rerun stores the same).
#[uprobe]
pub fn meshless_go_tls_read(ctx: ProbeContext) -> u32 {
    let Some((_, tgid, _)) = current() else {
        return 0;
    };
    // SAFETY: the context of a uprobe is the user pt_regs.
    let (conn, buf, len, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).rcx, (*ctx.regs).r14) };
    let key = GoKey { tgid, _pad: 0, ptr: g };
    let read = GoTlsRead { conn, buf, len };
    let _ = GO_TLS_READS.insert(&key, &read, 0);
    0
}

/// The `CALL runtime.memmove(dst=RAX, src=RBX, n=RCX)` inside
/// `(*Conn).Read` that copies plaintext into `b`: emitted from `src`.
#[uprobe]
pub fn meshless_go_tls_read_copy(ctx: ProbeContext) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    // SAFETY: the context of a uprobe is the user pt_regs.
    let (dst, src, n, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).rcx, (*ctx.regs).r14) };
    let key = GoKey { tgid, _pad: 0, ptr: g };
    // SAFETY: copied out before removal.
    let Some(read) = (unsafe { GO_TLS_READS.get(&key) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_READS.remove(&key);
    // The copy goes to the start of this goroutine's Read buffer, or it is
    // not the copy of that Read (the probes were attached mid-call).
    if read.buf != dst || n == 0 || n > read.len {
        return 0;
    }
    tls_count(TlsCounter::Calls);
    let fd = conn_fd(read.conn);
    if fd == TLS_NO_FD {
        tls_count(TlsCounter::NoSocket);
        return 0;
    }
    let Some(args) = plaintext(src, n, fd, Direction::Ingress) else {
        return 0;
    };
    emit_plaintext(&ctx, id, args)
}
