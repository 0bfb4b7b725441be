//! Connection lifecycle: accept/connect learn addresses, close ends tracking.
//!
//! Addresses come without reading kernel memory: the peer sockaddr passed
//! to connect/accept4 is user memory, and the `sock:inet_sock_set_state`
//! tracepoint carries the 4-tuple in its record (the SYN_SENT transition
//! runs in the connecting thread; SYN_RECV -> ESTABLISHED is keyed by the
//! client's address so accept4 can find its local half).
use core::mem::MaybeUninit;

use aya_ebpf::{helpers::bpf_probe_read_user, macros::tracepoint, programs::TracePointContext};
use meshless_common::{
    AF_INET, AF_INET6, ConnAddrs, FLAG_ACCEPTED, FLAG_CONNECTED, FLAG_LOCAL_ADDR, FLAG_REMOTE_ADDR, Syscall,
};

use super::{arg, current, ret};
use crate::{
    capture::emit_close,
    maps::{
        ACTIVE, ADDRS, Args, BUF_NONE, CONNECTING, CONNS, HELD, KnownAddrs, PASSIVE, PeerKey, VERDICTS, conn_key,
        put_args, take_args,
    },
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const IPPROTO_TCP: u16 = 6;
const EINPROGRESS: i64 = 115;

#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddr16 {
    family: u16,
    port: [u8; 2],
    v4: [u8; 4],
    _zero: [u8; 8],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SockAddr28 {
    family: u16,
    port: [u8; 2],
    flowinfo: [u8; 4],
    v6: [u8; 16],
    scope: u32,
}

/// Reads a user sockaddr into (family, address, port in host order).
fn read_sockaddr(ptr: u64) -> Option<(u16, [u8; 16], u16)> {
    if ptr == 0 {
        return None;
    }
    // SAFETY: user pointer read through the checked helper.
    let sa: SockAddr16 = unsafe { bpf_probe_read_user(ptr as *const SockAddr16) }.ok()?;
    let port = u16::from_be_bytes(sa.port);
    let mut addr = [0u8; 16];
    match sa.family {
        AF_INET => {
            addr[..4].copy_from_slice(&sa.v4);
            Some((AF_INET, addr, port))
        }
        AF_INET6 => {
            // SAFETY: as above.
            let sa6: SockAddr28 = unsafe { bpf_probe_read_user(ptr as *const SockAddr28) }.ok()?;
            Some((AF_INET6, sa6.v6, port))
        }
        _ => None,
    }
}

fn remote_only(family: u16, addr: [u8; 16], port: u16) -> ConnAddrs {
    ConnAddrs {
        family,
        remote_port: port,
        remote: addr,
        valid: FLAG_REMOTE_ADDR,
        ..ConnAddrs::default()
    }
}

fn stash_accept(ctx: &TracePointContext, syscall: Syscall) -> u32 {
    let Some((id, _, _)) = current() else {
        return 0;
    };
    let mut slot = MaybeUninit::uninit();
    let args = Args::init(&mut slot, arg(ctx, 1), 0, arg(ctx, 0) as u32, BUF_NONE, syscall as u32, 0);
    put_args(id, args);
    0
}

fn finish_accept(ctx: &TracePointContext) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    let mut slot = MaybeUninit::uninit();
    let Some(args) = take_args(id, Syscall::Accept, &mut slot) else {
        return 0;
    };
    let fd = ret(ctx);
    if fd < 0 {
        return 0;
    }
    let key = conn_key(tgid, fd as u32);
    let _ = CONNS.remove(&key);
    let _ = VERDICTS.remove(&key);
    let _ = HELD.remove(&key);
    let mut known = KnownAddrs {
        flags: FLAG_ACCEPTED,
        fd: fd as u32,
        sk: 0,
        addrs: ConnAddrs::default(),
    };
    if let Some((family, addr, port)) = read_sockaddr(args.ptr) {
        let peer = PeerKey {
            addr,
            port,
            family,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        known.addrs = match unsafe { PASSIVE.get(&peer) } {
            Some(full) => *full,
            None => remote_only(family, addr, port),
        };
        let _ = PASSIVE.remove(&peer);
    }
    let _ = ADDRS.insert(&key, &known, 0);
    0
}

#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    stash_accept(&ctx, Syscall::Accept)
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    finish_accept(&ctx)
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    stash_accept(&ctx, Syscall::Accept)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    finish_accept(&ctx)
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let Some((id, _, _)) = current() else {
        return 0;
    };
    let Some((family, addr, port)) = read_sockaddr(arg(&ctx, 1)) else {
        return 0;
    };
    let known = KnownAddrs {
        flags: FLAG_CONNECTED,
        fd: arg(&ctx, 0) as u32,
        sk: 0,
        addrs: remote_only(family, addr, port),
    };
    let _ = CONNECTING.insert(&id, &known, 0);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let Some((id, tgid, _)) = current() else {
        return 0;
    };
    // SAFETY: copied out before removal.
    let Some(known) = (unsafe { CONNECTING.get(&id) }).copied() else {
        return 0;
    };
    let _ = CONNECTING.remove(&id);
    let r = ret(&ctx);
    if r == 0 || r == -EINPROGRESS {
        let key = conn_key(tgid, known.fd);
        let _ = CONNS.remove(&key);
        let _ = ADDRS.insert(&key, &known, 0);
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let Some((_, tgid, tid)) = current() else {
        return 0;
    };
    forget(tgid, tid, arg(&ctx, 0) as u32);
    0
}

/// Ends everything known about (tgid, fd): a Close event if it was
/// followed; true if it was.
#[inline(always)]
pub fn forget(tgid: u32, tid: u32, fd: u32) -> bool {
    let key = conn_key(tgid, fd);
    // SAFETY: copied out before removal.
    let followed = if let Some(state) = (unsafe { CONNS.get(&key) }).copied() {
        emit_close(tgid, tid, fd, Syscall::Close as u32, &state);
        let _ = CONNS.remove(&key);
        true
    } else {
        false
    };
    let _ = ADDRS.remove(&key);
    let _ = VERDICTS.remove(&key);
    let _ = HELD.remove(&key);
    crate::context::conn_closed(tgid, fd);
    followed
}

/// Field offsets of `sock:inet_sock_set_state`, from
/// /sys/kernel/tracing/events/sock/inet_sock_set_state/format.
mod set_state {
    pub const SKADDR: usize = 8;
    pub const OLDSTATE: usize = 16;
    pub const NEWSTATE: usize = 20;
    pub const SPORT: usize = 24;
    pub const DPORT: usize = 26;
    pub const FAMILY: usize = 28;
    pub const PROTOCOL: usize = 30;
    pub const SADDR: usize = 32;
    pub const DADDR: usize = 36;
    pub const SADDR_V6: usize = 40;
    pub const DADDR_V6: usize = 56;
}

/// Reads a context field at a constant offset. The verifier only allows
/// context loads at fixed offsets from the unmodified pointer, so every
/// field is loaded on its own (no memcpy of arrays).
#[inline(always)]
fn ctx_load<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    use aya_ebpf::EbpfContext;
    // SAFETY: offsets come from the tracepoint format; reads stay in the record.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(offset) as *const T) }
}

#[inline(always)]
fn ctx_addr16(ctx: &TracePointContext, offset: usize) -> [u8; 16] {
    let words: [u32; 4] = [
        ctx_load(ctx, offset),
        ctx_load(ctx, offset + 4),
        ctx_load(ctx, offset + 8),
        ctx_load(ctx, offset + 12),
    ];
    // SAFETY: [u32; 4] and [u8; 16] have the same size; bytes keep memory order.
    unsafe { core::mem::transmute(words) }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if ctx_load::<u16>(&ctx, set_state::PROTOCOL) != IPPROTO_TCP {
        return 0;
    }
    let old: i32 = ctx_load(&ctx, set_state::OLDSTATE);
    let new: i32 = ctx_load(&ctx, set_state::NEWSTATE);
    let connecting = new == TCP_SYN_SENT;
    let established = old == TCP_SYN_RECV && new == TCP_ESTABLISHED;
    let connected = old == TCP_SYN_SENT && new == TCP_ESTABLISHED;
    if !connecting && !established && !connected {
        return 0;
    }
    let family: u16 = ctx_load(&ctx, set_state::FAMILY);
    let mut addrs = ConnAddrs {
        family,
        local_port: ctx_load(&ctx, set_state::SPORT),
        remote_port: ctx_load(&ctx, set_state::DPORT),
        valid: FLAG_LOCAL_ADDR | FLAG_REMOTE_ADDR,
        ..ConnAddrs::default()
    };
    if family == AF_INET6 {
        addrs.local = ctx_addr16(&ctx, set_state::SADDR_V6);
        addrs.remote = ctx_addr16(&ctx, set_state::DADDR_V6);
    } else {
        let (s, d): (u32, u32) = (ctx_load(&ctx, set_state::SADDR), ctx_load(&ctx, set_state::DADDR));
        addrs.local[..4].copy_from_slice(&s.to_ne_bytes());
        addrs.remote[..4].copy_from_slice(&d.to_ne_bytes());
    }
    let sk: u64 = ctx_load(&ctx, set_state::SKADDR);
    if connecting {
        // Runs in the connecting thread; the source port is not chosen yet.
        let Some((id, _, _)) = current() else {
            return 0;
        };
        if let Some(known) = CONNECTING.get_ptr_mut(&id) {
            // SAFETY: entry of this thread, only this thread writes it.
            unsafe {
                (*known).sk = sk;
            }
        }
    } else if connected {
        let _ = ACTIVE.insert(&sk, &addrs, 0);
    } else {
        let peer = PeerKey {
            addr: addrs.remote,
            port: addrs.remote_port,
            family: addrs.family,
            _pad: 0,
        };
        let _ = PASSIVE.insert(&peer, &addrs, 0);
    }
    0
}

/// A new program in a process: userspace decides its linking policy before
/// it can serve (and the policy of a reused pid is forgotten).
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let Some((_, tgid, tid)) = current() else {
        return 0;
    };
    let _ = crate::maps::LINK_POLICY.remove(&tgid);
    crate::capture::emit_exec(tgid, tid);
    0
}
