//! Asking the kernel for a socket's addresses from outside its process:
//! `pidfd_open` + `pidfd_getfd` borrow the socket, then `getsockname` /
//! `getpeername`. Used only when the kernel programs could not learn them
//! (no BTF or kernel reads denied, sockets older than the agent). ~5 µs.
//!
//! The fd may have been closed and reused since the event: the borrowed
//! socket's inode must equal the one the kernel reported (or, when it
//! reported none, the one /proc named before borrowing), else no answer.
use std::{
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// (local, remote) of socket `fd` in process `pid`, if it is a TCP/IP socket
/// and still the socket with inode `ino` (0: the kernel did not know it).
pub fn lookup(pid: u32, fd: u32, ino: u64) -> Option<(SocketAddr, SocketAddr)> {
    let expected = if ino != 0 { ino } else { proc_inode(pid, fd)? };
    // SAFETY: plain syscalls; returned fds are owned and closed on drop.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return None;
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let sock = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as libc::c_int, 0) };
    if sock < 0 {
        return None;
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock as i32) };
    if inode(sock.as_raw_fd())? != expected {
        return None;
    }
    let local = name(sock.as_raw_fd(), libc::getsockname)?;
    let remote = name(sock.as_raw_fd(), libc::getpeername)?;
    Some((local, remote))
}

/// The inode /proc names for a socket fd (`socket:[N]`).
fn proc_inode(pid: u32, fd: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

fn inode(fd: i32) -> Option<u64> {
    let mut st = MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: st is large enough for struct stat.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: filled by a successful fstat.
    Some(unsafe { st.assume_init() }.st_ino)
}

type NameFn = unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

fn name(fd: i32, f: NameFn) -> Option<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is large enough for any address; len says so.
    if unsafe { f(fd, storage.as_mut_ptr().cast(), &mut len) } != 0 {
        return None;
    }
    // SAFETY: zero-initialised and filled by the kernel.
    let storage = unsafe { storage.assume_init() };
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let v6 = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            Some(SocketAddr::new(ip, u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn finds_both_ends_of_an_own_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        use std::os::fd::AsRawFd;
        let got = super::lookup(std::process::id(), client.as_raw_fd() as u32, 0);
        // pidfd_getfd on our own process needs no privilege.
        assert_eq!(
            got,
            Some((client.local_addr().expect("l"), client.peer_addr().expect("p")))
        );
    }

    #[test]
    fn refuses_a_socket_that_is_not_the_one_the_kernel_saw() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        use std::os::fd::AsRawFd;
        let fd = client.as_raw_fd();
        let real = super::proc_inode(std::process::id(), fd as u32).expect("a socket");
        assert!(super::lookup(std::process::id(), fd as u32, real).is_some());
        assert_eq!(super::lookup(std::process::id(), fd as u32, real + 1), None);
    }
}
