//! Which (tgid, fd) pairs are followed: sockets whose first bytes are HTTP.
//!
//! A file, pipe, tty or /dev/null is never followed. The kernel decides
//! where it can (a successful send/recv proves a socket; otherwise the fd's
//! inode mode is read from kernel memory) and remembers non-sockets in
//! `VERDICTS`, so they cost one lookup per syscall afterwards. When it cannot
//! tell, the fd gives one event flagged FLAG_UNCONFIRMED and nothing more
//! until userspace has written a verdict.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use meshless_common::{
    ConnAddrs, Counter, FLAG_HTTP2, FLAG_NEW_CONN, FLAG_UNCONFIRMED, FdVerdict, Syscall, VERDICT_NOT_SOCKET, VERDICT_PENDING,
    VERDICT_SOCKET,
};

use crate::{
    capture::head,
    detect::{Http, WINDOW, classify, is_h2_headers, is_h2_preface},
    maps::{ACTIVE, ADDRS, Args, CONNS, ConnState, HELD, Held, VERDICTS, count, note_tgid},
    sock::{FdKind, fd_kind, read_sock_addrs},
};

/// A connection events are emitted for, and what to emit first. Lives in
/// a per-CPU map (`FOLLOW`), not on the 512-byte BPF stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Followed {
    pub state: ConnState,
    pub flags: u32,
    /// 1 when `held` (look-ahead bytes of earlier syscalls) is to be
    /// emitted before this syscall's bytes.
    pub has_held: u32,
    pub held: Held,
    /// The socket's `struct sock` address, 0 when unknown.
    sk: u64,
    /// Held bytes followed by this syscall's first bytes (room for both).
    joined: [u8; WINDOW * 2],
}

/// True for syscalls that only succeed on sockets.
#[inline(always)]
fn socket_syscall(syscall: u32) -> bool {
    syscall == Syscall::Sendto as u32
        || syscall == Syscall::Recvfrom as u32
        || syscall == Syscall::Sendmsg as u32
        || syscall == Syscall::Recvmsg as u32
}

const NOTHING: u32 = 0;
const FOLLOW_NEW: u32 = 1;
const FOLLOW_ONCE: u32 = 2;

/// Fills `out` with the connection state to emit this syscall's `ret`
/// bytes under, starting to follow the fd when it is a socket whose stream
/// starts like HTTP; false when nothing is to be emitted.
#[inline(always)]
pub fn tracked_conn(key: u64, args: &Args, ret: usize, detect: bool, out: &mut Followed) -> bool {
    out.has_held = 0;
    out.flags = 0;
    // SAFETY: the value is copied out at once.
    if let Some(state) = unsafe { CONNS.get(&key) } {
        crate::mem::copy(&mut out.state, state);
        return true;
    }
    if !detect {
        return false;
    }
    let what = decide(key, args, ret, out);
    if what == NOTHING {
        return false;
    }
    new_state(key, out);
    if what == FOLLOW_ONCE {
        return true;
    }
    if CONNS.insert(&key, &out.state, 0).is_err() {
        count(Counter::ConnTableFull);
        return false;
    }
    note_tgid((key >> 32) as u32);
    count(Counter::ConnsTracked);
    true
}

/// Whether to start following (tgid, fd): HTTP-looking bytes on a socket.
/// Sets `out.flags`, the held bytes, `out.sk` and the ids in `out.state`.
/// (Not inlined: its own stack frame keeps each under the BPF limit.)
#[inline(never)]
fn decide(key: u64, args: &Args, ret: usize, out: &mut Followed) -> u32 {
    // SAFETY: copied out at once.
    let verdict = unsafe { VERDICTS.get(&key) }.copied();
    if let Some(v) = verdict {
        if v.state != VERDICT_SOCKET {
            return NOTHING;
        }
    }
    // SAFETY: copied out at once.
    let held = unsafe { HELD.get(&key) }.filter(|h| h.direction == args.direction);
    // Held bytes first, then this syscall's, read straight behind them.
    let held_len = match held {
        Some(h) => {
            out.held = *h;
            let mut first = [0u8; WINDOW];
            first.copy_from_slice(&h.bytes);
            out.joined[..WINDOW].copy_from_slice(&first);
            (h.len as usize) & (WINDOW - 1)
        }
        None => 0,
    };
    let dst = out.joined.as_mut_ptr().wrapping_add(held_len);
    let cur_len = head(args, ret as u64, dst, WINDOW - held_len);
    if cur_len == 0 {
        return NOTHING;
    }
    let n = held_len + cur_len;
    let mut window = [0u8; WINDOW];
    window.copy_from_slice(&out.joined[..WINDOW]);
    let mut http = classify(&window, n);
    // Kept in `out.flags` until `new_state` makes it a connection flag.
    let h2 = if is_h2_preface(&window, n) {
        FLAG_HTTP2
    } else if http == Http::No && held.is_none() && is_h2_headers(&window, n) {
        // An HTTP/2 connection that was open before the agent started.
        http = Http::Request;
        FLAG_HTTP2
    } else {
        0
    };
    let had_held = held.is_some();
    if http == Http::No {
        if had_held {
            let _ = HELD.remove(&key);
        }
        return NOTHING;
    }
    out.sk = 0;
    out.state.sock_ino = 0;
    match fd_kind(args.fd) {
        FdKind::Other => {
            let v = FdVerdict {
                state: VERDICT_NOT_SOCKET,
                ..FdVerdict::default()
            };
            let _ = VERDICTS.insert(&key, &v, 0);
            note_tgid((key >> 32) as u32);
            count(Counter::NonSocketFds);
            return NOTHING;
        }
        FdKind::Socket { sk, ino } => {
            out.sk = sk;
            out.state.sock_ino = ino;
        }
        FdKind::Unknown => {}
    }
    if http == Http::NeedMore {
        let h = Held {
            len: n as u32,
            direction: args.direction,
            bytes: window,
        };
        let _ = HELD.insert(&key, &h, 0);
        count(Counter::LookaheadHeld);
        return NOTHING;
    }
    if had_held {
        out.has_held = 1;
        let _ = HELD.remove(&key);
    }
    let confirmed = out.sk != 0 || socket_syscall(args.syscall) || verdict.is_some();
    out.state.conn_id = match verdict {
        Some(v) if v.conn_id != 0 => v.conn_id,
        // SAFETY: no preconditions.
        _ => unsafe { bpf_ktime_get_ns() },
    };
    if confirmed {
        out.flags = FLAG_NEW_CONN | h2;
        return FOLLOW_NEW;
    }
    // Userspace checks /proc/<tgid>/fd/<fd> and answers in VERDICTS; until
    // then this fd gives nothing more.
    let v = FdVerdict {
        state: VERDICT_PENDING,
        _pad: 0,
        conn_id: out.state.conn_id,
    };
    let _ = VERDICTS.insert(&key, &v, 0);
    note_tgid((key >> 32) as u32);
    count(Counter::UnconfirmedEvents);
    out.flags = FLAG_NEW_CONN | FLAG_UNCONFIRMED | h2;
    FOLLOW_ONCE
}

/// Flags and addresses of a newly followed connection: addresses from the
/// socket itself when the kernel can read them, else from accept/connect.
#[inline(never)]
fn new_state(key: u64, out: &mut Followed) {
    out.state.flags = out.flags & FLAG_HTTP2;
    out.state._pad = 0;
    out.state.seq = 0;
    out.state._pad2 = 0;
    out.state.h2 = [crate::maps::H2Way::default(); 2];
    out.state.addrs = ConnAddrs::default();
    // SAFETY: map values stay valid for the program's run.
    if let Some(k) = unsafe { ADDRS.get(&key) } {
        out.state.flags |= k.flags;
        out.state.addrs = k.addrs;
        if k.sk != 0 {
            // A connected socket: its full 4-tuple was recorded at ESTABLISHED.
            // SAFETY: as above.
            if let Some(full) = unsafe { ACTIVE.get(&k.sk) } {
                out.state.addrs = *full;
            }
            let _ = ACTIVE.remove(&k.sk);
        }
    }
    read_sock_addrs(out.sk, &mut out.state.addrs);
}
