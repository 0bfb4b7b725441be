//! read/write-family syscalls: stash arguments on enter, emit on exit.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use meshless_common::{Direction, Syscall};

use super::{arg, current, ret};
use crate::{
    capture::{emit_data, first_bytes, known_addrs, looks_like_http, tracked_conn},
    context::{client_request, starts_request},
    maps::{ARGS, Args, BUF_IOVEC, BUF_MSGHDR, BUF_NONE, BUF_PLAIN, CONNS, conn_key, count},
};
use meshless_common::{Counter, TraceCtx};

/// Stashes the arguments of a data syscall for its exit probe. Writes on
/// sockets we do not follow are filtered here already: their bytes are in
/// user memory at enter, so HTTP detection needs no stash.
#[inline(always)]
fn stash(ctx: &TracePointContext, syscall: Syscall, direction: Direction, layout: u32) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    let fd = arg(ctx, 0) as u32;
    let mut args = Args {
        ptr: arg(ctx, 1),
        count: arg(ctx, 2),
        fd,
        layout,
        syscall: syscall as u32,
        direction: direction as u32,
        ctx: TraceCtx::default(),
    };
    if direction == Direction::Egress {
        let key = conn_key(tgid, fd);
        // SAFETY: map values stay valid for the program's run.
        let state = unsafe { CONNS.get(&key) };
        let first = if layout == BUF_NONE { None } else { first_bytes(&args) };
        if state.is_none() && !first.is_some_and(|b| looks_like_http(&b)) {
            return 0;
        }
        if first.is_some_and(|b| starts_request(&b)) {
            let addrs = state.map(|s| &s.addrs).or_else(|| known_addrs(key));
            client_request(id, addrs, &mut args.ctx);
        }
    }
    if ARGS.insert(&id, &args, 0).is_err() {
        count(Counter::ArgsTableFull);
    }
    0
}

#[inline(always)]
fn finish(ctx: &TracePointContext) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(args) = (unsafe { ARGS.get(&id) }).copied() else {
        return 0;
    };
    let _ = ARGS.remove(&id);
    let n = ret(ctx);
    if n <= 0 {
        return 0;
    }
    let key = conn_key(tgid, args.fd);
    let detect = args.layout != BUF_NONE;
    if let Some((state, flags)) = tracked_conn(key, &args, detect) {
        emit_data(ctx, id, &args, n as usize, state, flags);
    }
    0
}

/// Tail-called by the sys_exit programs for a request a server read.
#[tracepoint]
pub fn meshless_server_ctx(_ctx: TracePointContext) -> u32 {
    crate::capture::finish_server_request();
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
            finish(&ctx)
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
