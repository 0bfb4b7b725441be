//! Userspace answers for fds the kernel could not classify (no BTF offsets,
//! or kernel reads denied): `/proc/<tgid>/fd/<fd>` names sockets
//! `socket:[N]`. The kernel sent one event for such an fd and waits for the
//! verdict written here; until then (and forever for non-sockets) the fd
//! costs it one map lookup per syscall.
//!
//! Runs as its own task so the ring-buffer reader never touches /proc.
use aya::maps::{HashMap, MapData};
use meshless_common::{FdVerdict, VERDICT_NOT_SOCKET, VERDICT_PENDING, VERDICT_SOCKET};
use tokio::sync::mpsc;
use tracing::debug;

/// Questions queued at most; more are dropped (the fd then stays pending,
/// which only costs its events).
const QUEUE: usize = 4096;

/// The reader's handle: asks for a verdict without waiting.
#[derive(Clone)]
pub struct Confirmer {
    tx: mpsc::Sender<(u32, u32)>,
}

impl Confirmer {
    /// Starts the task that owns the verdict map.
    pub fn spawn(verdicts: HashMap<MapData, u64, FdVerdict>) -> Confirmer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(verdicts, rx));
        Confirmer { tx }
    }

    pub fn ask(&self, tgid: u32, fd: u32) {
        let _ = self.tx.try_send((tgid, fd));
    }
}

async fn run(mut verdicts: HashMap<MapData, u64, FdVerdict>, mut rx: mpsc::Receiver<(u32, u32)>) {
    while let Some((tgid, fd)) = rx.recv().await {
        let key = (u64::from(tgid) << 32) | u64::from(fd);
        // Only answer a question still open: a close in between removed it.
        let Ok(pending) = verdicts.get(&key, 0) else {
            continue;
        };
        if pending.state != VERDICT_PENDING {
            continue;
        }
        let state = if is_socket(tgid, fd) {
            VERDICT_SOCKET
        } else {
            VERDICT_NOT_SOCKET
        };
        debug!(tgid, fd, socket = state == VERDICT_SOCKET, "fd verdict");
        let _ = verdicts.insert(key, FdVerdict { state, ..pending }, 0);
    }
}

/// True when the fd's /proc link names a socket.
pub fn is_socket(tgid: u32, fd: u32) -> bool {
    std::fs::read_link(format!("/proc/{tgid}/fd/{fd}"))
        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:["))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    #[test]
    fn tells_sockets_from_files_and_pipes() {
        let me = std::process::id();
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let file = std::fs::File::open("/dev/null").expect("open");
        assert!(super::is_socket(me, sock.as_raw_fd() as u32));
        assert!(!super::is_socket(me, file.as_raw_fd() as u32));
        assert!(!super::is_socket(me, 999_999));
    }
}
