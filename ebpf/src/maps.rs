//! Every map and global of the kernel side, in one place.
use core::mem::MaybeUninit;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use meshless_common::{COUNTER_SLOTS, ConnAddrs, Counter, EventHeader, FdVerdict, MAX_CAPTURE, Syscall, TraceCtx};

use crate::detect::WINDOW;

/// The agent's own tgid; its syscalls are never traced. Set at load time.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;
/// Ring-buffer fill level (bytes) above which a submit wakes the reader.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 256 * 1024;

pub fn agent_tgid() -> u32 {
    // SAFETY: a global patched by the loader; volatile so it is not const-folded.
    unsafe { core::ptr::read_volatile(&AGENT_TGID) }
}

pub fn wakeup_bytes() -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) }
}

/// 1 when trace context travels in TCP options (the sock_ops program is attached).
#[unsafe(no_mangle)]
static PROPAGATION: u32 = 0;
/// Capture scope: cgroup id of the subtree root (0 = everything) and its level.
#[unsafe(no_mangle)]
static SCOPE_CGROUP: u64 = 0;
#[unsafe(no_mangle)]
static SCOPE_LEVEL: u32 = 0;

pub fn propagation() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&PROPAGATION) != 0 }
}

/// (cgroup id, level) of the capture scope; id 0 means no scope.
pub fn scope() -> (u64, u32) {
    // SAFETY: as above.
    unsafe {
        (
            core::ptr::read_volatile(&SCOPE_CGROUP),
            core::ptr::read_volatile(&SCOPE_LEVEL),
        )
    }
}

/// How a stashed syscall's buffer argument is laid out.
pub const BUF_PLAIN: u32 = 1;
pub const BUF_IOVEC: u32 = 2;
pub const BUF_MSGHDR: u32 = 3;
pub const BUF_NONE: u32 = 4;

/// Syscall arguments stashed at sys_enter, keyed by pid_tgid, used at sys_exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Args {
    pub ptr: u64,
    pub count: u64,
    pub fd: u32,
    pub layout: u32,
    pub syscall: u32,
    pub direction: u32,
    /// Context of the request an egress call starts (decided at sys_enter,
    /// before the bytes can leave, so the TCP option can carry it).
    pub ctx: TraceCtx,
    /// Egress: when the call began (`EventHeader::sent_ns`); 0 otherwise.
    pub sent_ns: u64,
}

impl Args {
    /// A syscall's arguments with an empty trace context, written into
    /// `out` field by field (a struct literal's zeroed context compiled to
    /// a byte-loop memset on every traced syscall).
    #[inline(always)]
    pub fn init(
        out: &mut MaybeUninit<Args>,
        ptr: u64,
        count: u64,
        fd: u32,
        layout: u32,
        syscall: u32,
        direction: u32,
    ) -> &mut Args {
        let p = out.as_mut_ptr();
        // SAFETY: every field of `*p` is written before `out` is read.
        unsafe {
            (&raw mut (*p).ptr).write(ptr);
            (&raw mut (*p).count).write(count);
            (&raw mut (*p).fd).write(fd);
            (&raw mut (*p).layout).write(layout);
            (&raw mut (*p).syscall).write(syscall);
            (&raw mut (*p).direction).write(direction);
            crate::mem::zero_raw(&raw mut (*p).ctx);
            (&raw mut (*p).sent_ns).write(0);
            out.assume_init_mut()
        }
    }
}

/// State of a tracked (HTTP) connection, keyed by (tgid << 32 | fd).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ConnState {
    pub conn_id: u64,
    pub flags: u32,
    pub _pad: u32,
    pub addrs: ConnAddrs,
    /// Socket inode number, 0 when the kernel could not read it.
    pub sock_ino: u64,
    /// Last event number taken (see `EventHeader::seq`). Only the `CONNS`
    /// copy counts.
    pub seq: u32,
    pub _pad2: u32,
    /// HTTP/2 framing per direction (ingress, egress), see `h2`.
    pub h2: [H2Way; 2],
}

/// Where a direction of an HTTP/2 connection stands in its framing after
/// the last syscall (see `h2`); all zero: unknown.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2Way {
    /// Payload bytes left of the open frame.
    pub left: u32,
    /// Synced, skipping, and header bytes seen (see `h2`).
    pub bits: u32,
    /// The first bytes of a frame header split across syscalls.
    pub hdr: [u8; 4],
}

// Userspace reads these maps' values by size and offset (see common).
const _: () = assert!(core::mem::size_of::<ConnState>() == meshless_common::CONN_STATE_SIZE);
const _: () = assert!(core::mem::offset_of!(ConnState, conn_id) == meshless_common::CONN_STATE_ID_OFFSET);
const _: () = assert!(core::mem::offset_of!(ConnState, sock_ino) == meshless_common::CONN_STATE_INO_OFFSET);
const _: () = assert!(core::mem::size_of::<KnownAddrs>() == meshless_common::KNOWN_ADDRS_SIZE);
const _: () = assert!(core::mem::size_of::<Held>() == meshless_common::HELD_SIZE);

/// First bytes of an untracked socket's stream, held until they decide
/// whether it is HTTP (a request written one byte per syscall).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Held {
    pub len: u32,
    pub direction: u32,
    pub bytes: [u8; WINDOW],
}

/// Addresses learned from accept4/connect, keyed like `CONNS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KnownAddrs {
    pub flags: u32,
    /// The socket's fd while a connect is in flight (CONNECTING only).
    pub fd: u32,
    /// Kernel socket address (an opaque key, never dereferenced) of a
    /// connecting socket: its source port is only known at ESTABLISHED.
    pub sk: u64,
    pub addrs: ConnAddrs,
}

/// Passive connections that reached ESTABLISHED, keyed by the client's end.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PeerKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// One event under construction: header then payload (twice MAX_CAPTURE so
/// that every bounded copy at a bounded offset stays inside the buffer).
#[repr(C)]
pub struct EventBuf {
    pub header: EventHeader,
    pub data: [u8; MAX_CAPTURE * 2],
}

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// One slot per thread (pid_tgid): written in place at sys_enter, marked
/// taken at sys_exit (`syscall` = [`NO_SYSCALL`]), removed when the thread
/// exits. A map update and delete per syscall cost more than the rest of a
/// sys_enter program; LRU, so threads that never exit cleanly age out.
#[map(name = "ARGS")]
pub static ARGS: LruHashMap<u64, Args> = LruHashMap::with_max_entries(16384, 0);

/// `Args::syscall` of a slot whose arguments were taken (or never stashed).
pub const NO_SYSCALL: u32 = 0;

/// Stashes `args` for the current syscall's exit probe of thread `id`.
#[inline(always)]
pub fn put_args(id: u64, args: &Args) {
    match ARGS.get_ptr_mut(&id) {
        // SAFETY: the thread's own slot; only this thread writes it.
        Some(slot) => crate::mem::copy(unsafe { &mut *slot }, args),
        None => {
            if ARGS.insert(&id, args, 0).is_err() {
                count(Counter::ArgsTableFull);
            }
        }
    }
}

/// Takes the arguments thread `id` stashed for `syscall` at sys_enter
/// (copied into `out`); None when nothing was stashed for it (a filtered
/// call, or the stash of another syscall whose exit never ran).
#[inline(always)]
pub fn take_args(id: u64, syscall: Syscall, out: &mut MaybeUninit<Args>) -> Option<&Args> {
    let slot = ARGS.get_ptr_mut(&id)?;
    // SAFETY: the thread's own slot; only this thread writes it.
    let slot = unsafe { &mut *slot };
    if slot.syscall != syscall as u32 {
        return None;
    }
    // SAFETY: `out` has room for an `Args`, all of which is written.
    let args = unsafe {
        crate::mem::copy_raw(out.as_mut_ptr(), slot);
        out.assume_init_ref()
    };
    slot.syscall = NO_SYSCALL;
    Some(args)
}

/// Eight-byte alignment for a small byte buffer on the BPF stack: zeroing
/// or copying it takes a few word stores instead of a byte loop.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Aligned<T>(pub T);

#[map(name = "CONNS")]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ADDRS")]
pub static ADDRS: LruHashMap<u64, KnownAddrs> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "CONNECTING")]
pub static CONNECTING: HashMap<u64, KnownAddrs> = HashMap::with_max_entries(4096, 0);

#[map(name = "PASSIVE")]
pub static PASSIVE: LruHashMap<PeerKey, ConnAddrs> = LruHashMap::with_max_entries(16384, 0);

/// Full 4-tuples of active connections at ESTABLISHED, by socket address.
#[map(name = "ACTIVE")]
pub static ACTIVE: LruHashMap<u64, ConnAddrs> = LruHashMap::with_max_entries(16384, 0);

/// Per-(tgid, fd) "socket or not" verdicts: non-sockets are ignored with
/// one lookup; unconfirmed fds wait for userspace. Cleaned on close.
#[map(name = "VERDICTS")]
pub static VERDICTS: LruHashMap<u64, FdVerdict> = LruHashMap::with_max_entries(65536, 0);

/// Look-ahead bytes of untracked sockets, keyed like `CONNS`.
#[map(name = "HELD")]
pub static HELD: LruHashMap<u64, Held> = LruHashMap::with_max_entries(8192, 0);

/// Processes with entries in `CONNS` or `VERDICTS`: only their exit,
/// close_range or dup2 needs a sweep.
#[map(name = "TGIDS")]
pub static TGIDS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// The rest of a long request head to send after the first event (the
/// first may leave through a tail call, so the plan is kept here).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Continuation {
    /// The plain buffer, or the iovec array (`plain` = 0).
    pub ptr: u64,
    /// Bytes the syscall moved; 0 when nothing follows.
    pub ret: u64,
    /// Iovecs at `ptr` when not plain.
    pub count: u64,
    pub plain: u32,
    pub _pad: u32,
}

#[map(name = "CONT")]
pub static CONT: PerCpuArray<Continuation> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working state of `follow::tracked_conn` (too big for the stack).
#[map(name = "FOLLOW")]
pub static FOLLOW: PerCpuArray<crate::follow::Followed> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<EventBuf> = PerCpuArray::with_max_entries(1, 0);

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds `n` to a counter.
pub fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += n };
    }
}

/// Notes that `tgid` has per-fd state to clean at exit.
pub fn note_tgid(tgid: u32) {
    // SAFETY: presence check only.
    if unsafe { TGIDS.get(&tgid) }.is_none() {
        let _ = TGIDS.insert(&tgid, &1, 0);
    }
}

/// Key of a (process, file descriptor) pair.
pub fn conn_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// Both ends of a TCP socket as that socket sees them (local first); the
/// key under which the tracepoints and the sock_ops program meet.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SockKey {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// local port << 16 | remote port (host order).
    pub ports: u32,
}

/// A trace context on its way into, or out of, a TCP option.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OptCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Receiving side: 1 once a request read took it.
    pub used: u32,
    pub _pad: u32,
}

/// What a thread (key pid_tgid) or a process (key tgid << 32) is serving:
/// the context of its one outstanding inbound request, if exactly one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Serving {
    pub ctx: TraceCtx,
    /// Inbound requests read and not yet answered.
    pub outstanding: u32,
    pub _pad: u32,
    pub ktime_ns: u64,
}

/// Which thread last read requests of a server connection, and how many
/// of them await a response.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Reader {
    /// pid_tgid of the reading thread, or the `g` of the reading goroutine
    /// when `goroutine` is 1 (see `GO_SERVING`).
    pub serving_key: u64,
    pub outstanding: u32,
    pub goroutine: u32,
}

/// Context to write into the next data segment of a client socket.
#[map(name = "OUT_OPT")]
pub static OUT_OPT: LruHashMap<SockKey, OptCtx> = LruHashMap::with_max_entries(16384, 0);

/// Context received in a TCP option, for the server's next request read.
#[map(name = "IN_OPT")]
pub static IN_OPT: LruHashMap<SockKey, OptCtx> = LruHashMap::with_max_entries(16384, 0);

/// Serving state per thread (pid_tgid) or per process (tgid << 32).
#[map(name = "SERVING")]
pub static SERVING: LruHashMap<u64, Serving> = LruHashMap::with_max_entries(32768, 0);

/// Readers of server connections, keyed like `CONNS`.
#[map(name = "READERS")]
pub static READERS: LruHashMap<u64, Reader> = LruHashMap::with_max_entries(65536, 0);

/// Linking policy per process (a `LinkPolicy` value), written by userspace.
#[map(name = "LINK_POLICY")]
pub static LINK_POLICY: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// Quiet pods' cgroup ids (`QUIET_CGROUPS_MAP`), written by userspace.
#[map(name = "QUIET_CGROUPS")]
pub static QUIET_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(meshless_common::MAX_QUIET_CGROUPS, 0);

/// Levels holding quiet cgroups (`QUIET_LEVELS_MAP`), written by userspace.
#[map(name = "QUIET_LEVELS")]
pub static QUIET_LEVELS: Array<u32> = Array::with_max_entries(1, 0);

/// Tail calls of the sys_exit programs, so each is verified once, not in
/// every sys_exit: slot `TAIL_SERVER_CTX` decides a read request's context
/// and submits its event; slot `TAIL_H2_WALK` walks an HTTP/2 syscall.
#[map(name = "SERVER_CTX")]
pub static SERVER_CTX: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// A goroutine (its `g` pointer) or a Go heap object (a `*http.Request`)
/// of one process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ptr: u64,
}

/// The inbound request a goroutine serves, or the parent an outbound
/// request was given; `fd` is the server connection it was read on, `req`
/// the outbound `*http.Request` it is for (0 for inbound requests).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoCtx {
    pub ctx: TraceCtx,
    pub fd: u32,
    pub _pad: u32,
    pub ktime_ns: u64,
    pub req: u64,
}

/// Inbound request served per goroutine (Go processes under
/// `LinkPolicy::Goroutine`). Cleared on response, close and goroutine exit
/// (`g` structs are reused).
#[map(name = "GO_SERVING")]
pub static GO_SERVING: LruHashMap<GoKey, GoCtx> = LruHashMap::with_max_entries(16384, 0);

/// Parent of an outbound `*http.Request` between the caller's
/// `persistConn.roundTrip` and the write loop's `Request.write`.
#[map(name = "GO_REQUESTS")]
pub static GO_REQUESTS: LruHashMap<GoKey, GoCtx> = LruHashMap::with_max_entries(16384, 0);

/// Parent of the request a goroutine is writing (set by `Request.write`,
/// taken by the request's first write syscall).
#[map(name = "GO_WRITERS")]
pub static GO_WRITERS: LruHashMap<GoKey, GoCtx> = LruHashMap::with_max_entries(16384, 0);

/// Context of a request whose first byte net/http's background read took,
/// keyed like `CONNS`, until the serving goroutine reads the rest.
#[map(name = "GO_PENDING")]
pub static GO_PENDING: LruHashMap<u64, GoCtx> = LruHashMap::with_max_entries(16384, 0);

/// Go linking counters (`GoCounter` slots).
#[map(name = "GO_COUNTERS")]
pub static GO_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(meshless_common::GO_COUNTER_SLOTS, 0);

/// An `SSL_read`/`SSL_write` call in progress on a thread (keyed by
/// pid_tgid): what its return probe needs, and the socket the thread's
/// read/write syscalls named meanwhile.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    pub ssl: u64,
    pub buf: u64,
    /// `size_t *` of the `_ex` variants (bytes moved), 0 otherwise.
    pub len_ptr: u64,
    /// The fd of a read/write made during the call, `TLS_NO_FD` if none.
    pub fd: u32,
    pub direction: u32,
    /// When the call started (an entry whose return was never seen expires).
    pub ktime_ns: u64,
    /// Client side: the context decided for a request written by this call.
    pub ctx: TraceCtx,
    /// Memory-BIO tie (Node.js): the `SSL *` whose read claimed `read_fd`
    /// (0: none yet). Kept while the thread is between SSL calls.
    pub read_claim: u64,
    /// When the thread last started a read syscall outside an SSL call.
    pub read_ns: u64,
    /// The fd of that read, `TLS_NO_FD` if none.
    pub read_fd: u32,
    /// 1 while an SSL call is in progress, 0 for a thread kept between
    /// calls (its SSL calls made no syscall: memory BIOs).
    pub inside: u32,
}

pub const TLS_NO_FD: u32 = u32::MAX;

/// SSL calls in progress, and threads whose SSL calls use memory BIOs
/// (kept between calls for the tie to their socket reads; LRU: threads
/// that end leave their entry behind).
#[map(name = "TLS_CALLS")]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// `TLS_FDS` value bit: the fd was tied by the thread's socket read before
/// a memory-BIO call, not seen inside a call (which always wins).
pub const TLS_FD_BY_THREAD: u32 = 1 << 31;

/// The socket fd of an `SSL *` of a process: an `SSL_read` served from
/// OpenSSL's buffer makes no syscall, so the fd seen earlier is used.
#[map(name = "TLS_FDS")]
pub static TLS_FDS: LruHashMap<GoKey, u32> = LruHashMap::with_max_entries(16384, 0);

/// The finished SSL call being emitted, as syscall arguments (per CPU: the
/// BPF stack is too small for it next to the emitting code).
#[map(name = "TLS_ARGS")]
pub static TLS_ARGS: PerCpuArray<Args> = PerCpuArray::with_max_entries(1, 0);

/// `meshless_tls_server_ctx` and `meshless_tls_h2_walk` (like
/// `SERVER_CTX`, for uprobes: a tail call stays within one program type).
#[map(name = "TLS_SERVER_CTX")]
pub static TLS_SERVER_CTX: ProgramArray = ProgramArray::with_max_entries(2, 0);

#[map(name = "TLS_COUNTERS")]
pub static TLS_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(meshless_common::TLS_COUNTER_SLOTS, 0);

/// A goroutine inside `crypto/tls.(*Conn).Read`: its `*tls.Conn` and
/// buffer, until the copy of the plaintext into the buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoTlsRead {
    pub conn: u64,
    pub buf: u64,
    pub len: u64,
}

#[map(name = "GO_TLS_READS")]
pub static GO_TLS_READS: LruHashMap<GoKey, GoTlsRead> = LruHashMap::with_max_entries(16384, 0);

/// Itab hashes of `*net.TCPConn` as a `net.Conn` (value unused), written
/// by the agent per traced Go executable.
#[map(name = "GO_TLS_CONN_TYPES")]
pub static GO_TLS_CONN_TYPES: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);
