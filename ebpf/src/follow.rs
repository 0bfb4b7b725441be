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
    ConnAddrs, Counter, FLAG_NEW_CONN, FLAG_UNCONFIRMED, FdVerdict, Syscall, VERDICT_NOT_SOCKET, VERDICT_PENDING,
    VERDICT_SOCKET,
};

use crate::{
    capture::head,
    detect::{Http, WINDOW, classify, join},
    maps::{ACTIVE, ADDRS, Args, CONNS, ConnState, HELD, Held, VERDICTS, count, note_tgid},
    sock::{FdKind, fd_kind, sock_addrs},
};

/// A connection events are emitted for, and what to emit first.
#[derive(Default)]
pub struct Followed {
    pub state: ConnState,
    pub flags: u32,
    /// Look-ahead bytes of earlier syscalls to emit before this one's.
    pub held: Option<Held>,
}

/// True for syscalls that only succeed on sockets.
#[inline(always)]
fn socket_syscall(syscall: u32) -> bool {
    syscall == Syscall::Sendto as u32
        || syscall == Syscall::Recvfrom as u32
        || syscall == Syscall::Sendmsg as u32
        || syscall == Syscall::Recvmsg as u32
}

/// Fills `out` with the connection state to emit this syscall's `ret`
/// bytes under, starting to follow the fd when it is a socket whose stream
/// starts like HTTP; false when nothing is to be emitted. (Not inlined: a
/// subprogram keeps each BPF stack frame under 512 bytes.)
#[inline(never)]
pub fn tracked_conn(key: u64, args: &Args, ret: usize, detect: bool, out: &mut Followed) -> bool {
    // SAFETY: the value is copied out at once.
    if let Some(state) = unsafe { CONNS.get(&key) } {
        out.state = *state;
        out.flags = 0;
        out.held = None;
        return true;
    }
    if !detect {
        return false;
    }
    match start_following(key, args, ret, out) {
        Some(()) => true,
        None => false,
    }
}

#[inline(always)]
fn start_following(key: u64, args: &Args, ret: usize, out: &mut Followed) -> Option<()> {
    // SAFETY: copied out at once.
    let verdict = unsafe { VERDICTS.get(&key) }.copied();
    if let Some(v) = verdict {
        if v.state != VERDICT_SOCKET {
            return None;
        }
    }
    let (cur, cur_len) = head(args, ret as u64)?;
    // SAFETY: copied out at once.
    let held = unsafe { HELD.get(&key) }.copied().filter(|h| h.direction == args.direction);
    let mut bytes = [0u8; WINDOW];
    let (verdict_http, n) = match held {
        Some(h) => {
            let n = join(&h.bytes, h.len as usize, &cur, cur_len, &mut bytes);
            (classify(&bytes, n), n)
        }
        None => (classify(&cur, cur_len), cur_len),
    };
    if verdict_http == Http::No {
        if held.is_some() {
            let _ = HELD.remove(&key);
        }
        return None;
    }
    let kind = fd_kind(args.fd);
    let (sk, ino) = match kind {
        FdKind::Other => {
            let v = FdVerdict {
                state: VERDICT_NOT_SOCKET,
                ..FdVerdict::default()
            };
            let _ = VERDICTS.insert(&key, &v, 0);
            note_tgid((key >> 32) as u32);
            count(Counter::NonSocketFds);
            return None;
        }
        FdKind::Socket { sk, ino } => (sk, ino),
        FdKind::Unknown => (0, 0),
    };
    if verdict_http == Http::NeedMore {
        let h = Held {
            len: n as u32,
            direction: args.direction,
            bytes: if held.is_some() { bytes } else { cur },
        };
        let _ = HELD.insert(&key, &h, 0);
        count(Counter::LookaheadHeld);
        return None;
    }
    if held.is_some() {
        let _ = HELD.remove(&key);
    }
    let confirmed = sk != 0 || socket_syscall(args.syscall) || verdict.is_some();
    let conn_id = match verdict {
        Some(v) if v.conn_id != 0 => v.conn_id,
        // SAFETY: no preconditions.
        _ => unsafe { bpf_ktime_get_ns() },
    };
    new_state(key, conn_id, sk, ino, &mut out.state);
    out.held = held;
    if !confirmed {
        // Userspace checks /proc/<tgid>/fd/<fd> and answers in VERDICTS;
        // until then this fd gives nothing more.
        let v = FdVerdict {
            state: VERDICT_PENDING,
            _pad: 0,
            conn_id,
        };
        let _ = VERDICTS.insert(&key, &v, 0);
        note_tgid((key >> 32) as u32);
        count(Counter::UnconfirmedEvents);
        out.flags = FLAG_NEW_CONN | FLAG_UNCONFIRMED;
        return Some(());
    }
    if CONNS.insert(&key, &out.state, 0).is_err() {
        count(Counter::ConnTableFull);
        return None;
    }
    note_tgid((key >> 32) as u32);
    count(Counter::ConnsTracked);
    out.flags = FLAG_NEW_CONN;
    Some(())
}

/// State of a newly followed connection: addresses from the socket itself
/// when the kernel can read them, else from accept/connect.
#[inline(never)]
fn new_state(key: u64, conn_id: u64, sk: u64, ino: u64, out: &mut ConnState) {
    // SAFETY: the value is copied out at once.
    let mut known = unsafe { ADDRS.get(&key) }.copied();
    if let Some(k) = known.as_mut() {
        if k.sk != 0 {
            // A connected socket: its full 4-tuple was recorded at ESTABLISHED.
            // SAFETY: copied out at once.
            if let Some(full) = unsafe { ACTIVE.get(&k.sk) } {
                k.addrs = *full;
            }
            let _ = ACTIVE.remove(&k.sk);
        }
    }
    out.conn_id = conn_id;
    out.flags = known.map_or(0, |k| k.flags);
    out._pad = 0;
    out.sock_ino = ino;
    out.addrs = known.map_or(ConnAddrs::default(), |k| k.addrs);
    if let Some(read) = sock_addrs(sk) {
        if read.remote_port != 0 {
            out.addrs = read;
        }
    }
}
