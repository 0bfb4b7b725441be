//! read/write-family syscalls: stash arguments on enter, emit on exit.
use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use meshless_common::{Direction, Syscall};

use super::{arg, current, ret};
use crate::{
    capture::{emit_data, emit_held, head, request_addrs},
    context::{client_request, starts_request},
    detect::{WINDOW, classify},
    follow::tracked_conn,
    maps::{
        Aligned, Args, BUF_IOVEC, BUF_MSGHDR, BUF_NONE, BUF_PLAIN, CONNS, FOLLOW, HELD, SERVER_CTX, VERDICTS, conn_key,
        count, put_args, take_args,
    },
};
use meshless_common::Counter;

/// `MSG_PEEK`: the bytes stay in the socket and will be read again.
const MSG_PEEK: u64 = 2;

/// The recv flags argument, for the syscalls that have one.
#[inline(always)]
fn peeks(ctx: &TracePointContext, syscall: Syscall) -> bool {
    let flags = match syscall {
        Syscall::Recvfrom => arg(ctx, 3),
        Syscall::Recvmsg => arg(ctx, 2),
        _ => return false,
    };
    flags & MSG_PEEK != 0
}

/// Whether an untracked fd's write may start (or continue) an HTTP stream:
/// its first bytes could be HTTP, or a look-ahead is held for it, and it is
/// not known to be something else.
#[inline(always)]
fn worth_stashing(key: u64, b: &[u8; WINDOW], n: usize) -> bool {
    let maybe = n > 0 && classify(b, n).maybe();
    // SAFETY: presence checks only.
    if !maybe && unsafe { HELD.get(&key) }.is_none() {
        return false;
    }
    unsafe { VERDICTS.get(&key) }.is_none_or(|v| v.state == meshless_common::VERDICT_SOCKET)
}

/// Stashes the arguments of a data syscall for its exit probe. Writes on
/// sockets we do not follow are filtered here already: their bytes are in
/// user memory at enter, so HTTP detection needs no stash.
#[inline(always)]
fn stash(ctx: &TracePointContext, syscall: Syscall, direction: Direction, layout: u32) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    if peeks(ctx, syscall) {
        count(Counter::PeeksSkipped);
        return 0;
    }
    let fd = arg(ctx, 0) as u32;
    if super::tls::inside_ssl_call(id, fd, direction) {
        // TLS records of an SSL call: its return probe emits the plaintext.
        return 0;
    }
    let mut slot = MaybeUninit::uninit();
    let args = Args::init(
        &mut slot,
        arg(ctx, 1),
        arg(ctx, 2),
        fd,
        layout,
        syscall as u32,
        direction as u32,
    );
    if direction == Direction::Egress {
        let key = conn_key(tgid, fd);
        // SAFETY: map values stay valid for the program's run.
        let state = unsafe { CONNS.get(&key) };
        // Zeroed a word at a time, not by a byte loop.
        let mut b = MaybeUninit::<Aligned<[u8; WINDOW]>>::uninit();
        let b = &mut crate::mem::zeroed_in(&mut b).0;
        // For iovec layouts `count` is the iovec count, not a byte count.
        let avail = if layout == BUF_PLAIN { args.count } else { u64::MAX };
        let n = if layout == BUF_NONE {
            0
        } else {
            head(args, avail, b.as_mut_ptr(), WINDOW)
        };
        if state.is_none() && !worth_stashing(key, b, n) {
            return 0;
        }
        let first = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
        if n >= 8 && starts_request(&first) {
            let addrs = request_addrs(state, key);
            client_request(id, addrs, &mut args.ctx);
        }
        // SAFETY: no preconditions.
        args.sent_ns = unsafe { bpf_ktime_get_ns() };
    }
    put_args(id, args);
    0
}

#[inline(always)]
fn finish(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    let mut slot = MaybeUninit::uninit();
    let Some(args) = take_args(id, syscall, &mut slot) else {
        return 0;
    };
    let n = ret(ctx);
    if n <= 0 {
        return 0;
    }
    let key = conn_key(tgid, args.fd);
    let detect = args.layout != BUF_NONE;
    let Some(f) = FOLLOW.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by one program at a time on this CPU.
    let f = unsafe { &mut *f };
    if tracked_conn(key, &args, n as usize, detect, f) {
        if f.state.flags & meshless_common::FLAG_TLS != 0 {
            // Ciphertext outside an SSL call (handshake, alerts): the
            // connection's plaintext comes from the TLS probes.
            return 0;
        }
        let mut flags = f.flags;
        if f.has_held != 0 {
            emit_held(tgid, id as u32, &args, &f.held, &f.state, flags);
            flags &= !meshless_common::FLAG_NEW_CONN;
        }
        emit_data(ctx, &SERVER_CTX, id, &args, n as usize, &f.state, flags);
    }
    0
}

/// Tail-called by the sys_exit programs for a request a server read.
#[tracepoint]
pub fn meshless_server_ctx(_ctx: TracePointContext) -> u32 {
    crate::capture::finish_server_request();
    0
}

/// Tail-called by the sys_exit programs for a syscall of an HTTP/2
/// connection (its frame walk, verified once here).
#[tracepoint]
pub fn meshless_h2_walk(ctx: TracePointContext) -> u32 {
    crate::h2::walk(&ctx, &SERVER_CTX);
    0
}

macro_rules! data_probe {
    ($enter:ident, $exit:ident, $syscall:expr, $dir:expr, $layout:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            stash(&ctx, $syscall, $dir, $layout)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            finish(&ctx, $syscall)
        }
    };
}

data_probe!(
    sys_enter_read,
    sys_exit_read,
    Syscall::Read,
    Direction::Ingress,
    BUF_PLAIN
);
data_probe!(
    sys_enter_write,
    sys_exit_write,
    Syscall::Write,
    Direction::Egress,
    BUF_PLAIN
);
data_probe!(
    sys_enter_readv,
    sys_exit_readv,
    Syscall::Readv,
    Direction::Ingress,
    BUF_IOVEC
);
data_probe!(
    sys_enter_writev,
    sys_exit_writev,
    Syscall::Writev,
    Direction::Egress,
    BUF_IOVEC
);
data_probe!(
    sys_enter_sendto,
    sys_exit_sendto,
    Syscall::Sendto,
    Direction::Egress,
    BUF_PLAIN
);
data_probe!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    Syscall::Recvfrom,
    Direction::Ingress,
    BUF_PLAIN
);
data_probe!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    Syscall::Sendmsg,
    Direction::Egress,
    BUF_MSGHDR
);
data_probe!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    Syscall::Recvmsg,
    Direction::Ingress,
    BUF_MSGHDR
);
data_probe!(
    sys_enter_sendfile64,
    sys_exit_sendfile64,
    Syscall::Sendfile,
    Direction::Egress,
    BUF_NONE
);
