//! Trace context across the wire: a TCP header option (RFC 6994 shared
//! experimental kind 254, ExID "ml") carrying the client span's trace id
//! and span id in the first segment of each request. No payload byte is
//! changed and no socket goes into a sockmap; peers without meshless ignore
//! the unknown option, as TCP requires.
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::generated::{bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt},
    macros::sock_ops,
    programs::SockOpsContext,
};
use meshless_common::{AF_INET, Counter, TRACE_OPT_KIND, TRACE_OPT_LEN, TRACE_OPT_MAGIC};

use crate::{
    context::canonical,
    maps::{Aligned, IN_OPT, OUT_OPT, OptCtx, SockKey, count},
};

/// `args[0]` bit of HDR_OPT_LEN_CB: the kernel is computing the MSS (no skb).
const WRITE_HDR_TCP_CURRENT_MSS: u32 = 1;

#[sock_ops]
pub fn meshless_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        // A connecting socket carries requests out: it writes options (and
        // the kernel then asks this program about every segment it sends,
        // so an accepted socket, whose segments never carry one, is not
        // asked). An accepted socket reads them.
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG) as i32);
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => reserve(&ctx),
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => write(&ctx),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => parse(&ctx),
        _ => {}
    }
    1
}

/// The socket's key as the tracepoints build it (local end first).
#[inline(always)]
fn key(ctx: &SockOpsContext) -> SockKey {
    let (local, remote) = if ctx.family() == AF_INET as u32 {
        ([ctx.local_ip4(), 0, 0, 0], [ctx.remote_ip4(), 0, 0, 0])
    } else {
        (canonical(ctx.local_ip6()), canonical(ctx.remote_ip6()))
    };
    // remote_port is in network order (in the upper half on little endian).
    let raw = ctx.remote_port();
    let remote_port = if raw >> 16 != 0 {
        u32::from_be(raw) as u16
    } else {
        u16::from_be(raw as u16)
    };
    SockKey {
        local,
        remote,
        ports: (ctx.local_port() & 0xffff) << 16 | remote_port as u32,
    }
}

#[inline(always)]
fn skb_len(ctx: &SockOpsContext) -> u32 {
    // SAFETY: field of the context the verifier allows for these ops.
    unsafe { (*ctx.ops).skb_len }
}

/// Makes room for the option in the segment (or the MSS) when a request's
/// context is waiting to go out on this socket.
fn reserve(ctx: &SockOpsContext) {
    let sizing = ctx.arg(0) & WRITE_HDR_TCP_CURRENT_MSS != 0;
    if !sizing && skb_len(ctx) == 0 {
        // A segment without data (an ACK): no lookup.
        return;
    }
    let Some(pending) = OUT_OPT.get_ptr_mut(&key(ctx)) else {
        return;
    };
    // SAFETY: the context pointer is the program's own.
    if unsafe { bpf_reserve_hdr_opt(ctx.ops.cast(), TRACE_OPT_LEN as u32, 0) } != 0 {
        count(Counter::OptNoRoom);
        return;
    }
    if !sizing {
        // SAFETY: entry of this map; the next WRITE callback is this segment's.
        unsafe { (*pending).used = 1 };
    }
}

fn write(ctx: &SockOpsContext) {
    let key = key(ctx);
    // SAFETY: copied out at once.
    let Some(pending) = (unsafe { OUT_OPT.get(&key) }).copied() else {
        return;
    };
    if pending.used == 0 {
        return;
    }
    // Zeroed a word at a time, not by a byte loop.
    let mut opt = MaybeUninit::<Aligned<[u8; TRACE_OPT_LEN]>>::uninit();
    let opt = &mut crate::mem::zeroed_in(&mut opt).0;
    opt[0] = TRACE_OPT_KIND;
    opt[1] = TRACE_OPT_LEN as u8;
    opt[2..4].copy_from_slice(&TRACE_OPT_MAGIC.to_be_bytes());
    opt[4..20].copy_from_slice(&pending.trace_id);
    opt[20..28].copy_from_slice(&pending.span_id);
    // SAFETY: a stack buffer of the given length.
    let ret = unsafe { bpf_store_hdr_opt(ctx.ops.cast(), opt.as_ptr().cast(), TRACE_OPT_LEN as u32, 0) };
    if ret == 0 {
        count(Counter::OptWritten);
        let _ = OUT_OPT.remove(&key);
    } else {
        count(Counter::OptNoRoom);
    }
}

fn parse(ctx: &SockOpsContext) {
    // Zeroed a word at a time, not by a byte loop.
    let mut opt = MaybeUninit::<Aligned<[u8; TRACE_OPT_LEN]>>::uninit();
    let opt = &mut crate::mem::zeroed_in(&mut opt).0;
    opt[0] = TRACE_OPT_KIND;
    // For experimental kinds the search matches the magic: length 4 = kind, len, ExID.
    opt[1] = 4;
    opt[2..4].copy_from_slice(&TRACE_OPT_MAGIC.to_be_bytes());
    // SAFETY: a stack buffer of the given length.
    let n = unsafe { bpf_load_hdr_opt(ctx.ops.cast(), opt.as_mut_ptr().cast(), TRACE_OPT_LEN as u32, 0) };
    if n != TRACE_OPT_LEN as i64 || opt[1] != TRACE_OPT_LEN as u8 {
        return;
    }
    let mut got = OptCtx {
        trace_id: [0; 16],
        span_id: [0; 8],
        used: 0,
        _pad: 0,
    };
    got.trace_id.copy_from_slice(&opt[4..20]);
    got.span_id.copy_from_slice(&opt[20..28]);
    let key = key(ctx);
    // Every segment cut from one send carries the same option: a context
    // already taken by a request read stays taken.
    // SAFETY: copied out at once.
    if let Some(old) = unsafe { IN_OPT.get(&key) } {
        if old.span_id == got.span_id {
            return;
        }
    }
    count(Counter::OptParsed);
    let _ = IN_OPT.insert(&key, &got, 0);
}
