//! Is this fd a socket, and what are its addresses? Read from kernel memory
//! (task -> files -> fdtable -> file -> inode / socket -> sock) with field
//! offsets the loader computed from the running kernel's BTF.
//!
//! Everything here is optional: without offsets (no BTF) or when
//! `bpf_probe_read_kernel` is denied (lockdown=confidentiality) the answer
//! is `Unknown`, and the caller falls back to userspace confirmation.
use aya_ebpf::helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task};
use meshless_common::{AF_INET, AF_INET6, ConnAddrs, Counter, FLAG_LOCAL_ADDR, FLAG_REMOTE_ADDR, KernelOffsets};

use crate::maps::count;

/// Offsets of the kernel fields read below. Patched by the loader.
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    valid: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_private_data: 0,
    inode_mode: 0,
    inode_ino: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    _pad: 0,
};

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a global patched by the loader; volatile so it is not const-folded.
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// What the kernel says an fd of the current process is.
#[derive(Clone, Copy)]
pub enum FdKind {
    /// A socket: its `struct sock` address (an identity, also used to read
    /// addresses) and inode number.
    Socket { sk: u64, ino: u64 },
    /// Open, and not a socket.
    Other,
    /// Could not tell (no offsets, read denied, fd not open any more).
    Unknown,
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: the checked helper never faults; a bad address gives Err.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Classifies `fd` of the current task.
#[inline(always)]
pub fn fd_kind(fd: u32) -> FdKind {
    let o = offsets();
    if o.valid == 0 {
        return FdKind::Unknown;
    }
    match read_fd(&o, fd) {
        Some(kind) => kind,
        None => {
            count(Counter::KernelReadFailed);
            FdKind::Unknown
        }
    }
}

#[inline(always)]
fn read_fd(o: &KernelOffsets, fd: u32) -> Option<FdKind> {
    // SAFETY: returns the current task_struct address; only read through the helper.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + o.task_files as u64)?;
    let fdt: u64 = read(files + o.files_fdt as u64)?;
    let max_fds: u32 = read(fdt + o.fdt_max_fds as u64)?;
    if fd >= max_fds {
        return None;
    }
    let table: u64 = read(fdt + o.fdt_fd as u64)?;
    let file: u64 = read(table + fd as u64 * 8)?;
    if file == 0 {
        return None;
    }
    let inode: u64 = read(file + o.file_inode as u64)?;
    let mode: u16 = read(inode + o.inode_mode as u64)?;
    if mode & S_IFMT != S_IFSOCK {
        return Some(FdKind::Other);
    }
    let ino: u64 = read(inode + o.inode_ino as u64)?;
    let socket: u64 = read(file + o.file_private_data as u64)?;
    let sk: u64 = read(socket + o.socket_sk as u64)?;
    Some(FdKind::Socket { sk, ino })
}

/// Overwrites `addrs` with both ends of an IPv4/IPv6 socket, read from its
/// `struct sock_common`; leaves it alone when they cannot be read or the
/// socket has no peer yet.
#[inline(always)]
pub fn read_sock_addrs(sk: u64, addrs: &mut ConnAddrs) {
    let o = offsets();
    if o.valid == 0 || sk == 0 {
        return;
    }
    let (Some(family), Some(dport), Some(num)) = (
        read::<u16>(sk + o.sk_family as u64),
        read::<u16>(sk + o.sk_dport as u64),
        read::<u16>(sk + o.sk_num as u64),
    ) else {
        return;
    };
    if dport == 0 {
        return;
    }
    match family {
        AF_INET => {
            let (Some(d), Some(s)) = (
                read::<[u8; 4]>(sk + o.sk_daddr as u64),
                read::<[u8; 4]>(sk + o.sk_rcv_saddr as u64),
            ) else {
                return;
            };
            addrs.remote = [0; 16];
            addrs.local = [0; 16];
            addrs.remote[..4].copy_from_slice(&d);
            addrs.local[..4].copy_from_slice(&s);
        }
        AF_INET6 => {
            let Some(d) = read::<[u8; 16]>(sk + o.sk_v6_daddr as u64) else {
                return;
            };
            let Some(s) = read::<[u8; 16]>(sk + o.sk_v6_rcv_saddr as u64) else {
                return;
            };
            addrs.remote = d;
            addrs.local = s;
        }
        _ => return,
    }
    addrs.family = family;
    addrs.local_port = num;
    addrs.remote_port = u16::from_be(dport);
    addrs.valid = FLAG_LOCAL_ADDR | FLAG_REMOTE_ADDR;
}
