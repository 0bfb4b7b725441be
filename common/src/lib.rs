//! Wire types shared by meshless's kernel programs (`ebpf/`) and its agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding and `u32` flags so
//! that the byte layout is identical on both sides of the ring buffer.
#![no_std]

/// Name of the ring buffer that carries [`EventHeader`]s (+ payload) to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU array of drop/truncation counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Name of the global that holds the agent's own tgid (filtered in the kernel).
pub const AGENT_TGID_GLOBAL: &str = "AGENT_TGID";
/// Name of the global with the ring-buffer fill level (bytes) above which a
/// submit wakes the reader; below it the reader polls on a timer.
pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";
/// Name of the global that turns trace-context propagation in TCP header
/// options on (1) or off (0).
pub const PROPAGATION_GLOBAL: &str = "PROPAGATION";
/// Names of the globals that scope capture to one cgroup2 subtree: the
/// subtree root's cgroup id (0: everything) and its depth below the root.
pub const SCOPE_CGROUP_GLOBAL: &str = "SCOPE_CGROUP";
pub const SCOPE_LEVEL_GLOBAL: &str = "SCOPE_LEVEL";
/// Name of the map of per-process linking policies ([`LinkPolicy`]), keyed by tgid.
pub const LINK_POLICY_MAP: &str = "LINK_POLICY";
/// Name of the sock_ops program that writes and parses the trace option.
pub const SOCKOPS_PROGRAM: &str = "meshless_sockops";

/// How the kernel links a process's outbound requests to the inbound
/// request it is serving (a [`LINK_POLICY_MAP`] value). Until userspace
/// has classified a process, both the thread and the process must have
/// exactly that one request outstanding.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPolicy {
    /// A thread with exactly one inbound request outstanding is serving it
    /// (thread-per-request servers and single-threaded event loops).
    Thread = 1,
    /// Threads are not tied to requests (Go moves goroutines between
    /// threads): link only while the whole process has exactly one inbound
    /// request outstanding.
    Process = 2,
    /// Never link in-process.
    Off = 3,
    /// Link by goroutine (Go >= 1.18 on amd64 whose net/http and runtime
    /// uprobes are attached): the goroutine that read a request serves it,
    /// and `http.Transport` writes carry the caller goroutine's request.
    Goroutine = 4,
}

/// Name of the per-CPU array of Go linking counters ([`GoCounter`]).
pub const GO_COUNTERS_MAP: &str = "GO_COUNTERS";
/// Maps keyed by (tgid, Go pointer) (a goroutine's `g` or a request).
pub const GO_POINTER_MAPS: [&str; 3] = ["GO_SERVING", "GO_WRITERS", "GO_REQUESTS"];
/// Map keyed by (tgid << 32 | fd) of Go requests whose first byte was read alone.
pub const GO_PENDING_MAP: &str = "GO_PENDING";
/// Uprobe programs for Go binaries: (program, symbol).
pub const GO_UPROBES: [(&str, &str); 3] = [
    ("meshless_go_goexit", "runtime.goexit1"),
    ("meshless_go_round_trip", "net/http.(*persistConn).roundTrip"),
    ("meshless_go_request_write", "net/http.(*Request).write"),
];

/// Uprobes on a TLS library: (program, symbol, 1 for a return probe).
/// The entry and return probes of one function share a symbol.
pub const TLS_UPROBES: [(&str, &str, bool); 8] = [
    ("meshless_ssl_read", "SSL_read", false),
    ("meshless_ssl_read_ret", "SSL_read", true),
    ("meshless_ssl_read_ex", "SSL_read_ex", false),
    ("meshless_ssl_read_ex_ret", "SSL_read_ex", true),
    ("meshless_ssl_write", "SSL_write", false),
    ("meshless_ssl_write_ret", "SSL_write", true),
    ("meshless_ssl_write_ex", "SSL_write_ex", false),
    ("meshless_ssl_write_ex_ret", "SSL_write_ex", true),
];
/// Uprobes on Go executables' `crypto/tls` (entry probes only, see
/// agent/src/tls/go.rs): (program, what it is placed on).
pub const GO_TLS_UPROBES: [(&str, &str); 3] = [
    ("meshless_go_tls_write", "crypto/tls.(*Conn).Write"),
    ("meshless_go_tls_read", "crypto/tls.(*Conn).Read"),
    (
        "meshless_go_tls_read_copy",
        "crypto/tls.(*Conn).Read: call runtime.memmove",
    ),
];
/// Hash map of the itab hashes (u32 at itab + 16) of `*net.TCPConn` as a
/// `net.Conn`, one per traced Go executable: a `tls.Conn` over anything
/// else has no socket fd to read.
pub const GO_TLS_CONN_TYPES_MAP: &str = "GO_TLS_CONN_TYPES";
/// Program the TLS return probes tail-call for a request a server read,
/// and the program array it sits in (slot [`TAIL_SERVER_CTX`]).
pub const TLS_SERVER_CTX_PROGRAM: &str = "meshless_tls_server_ctx";
pub const TLS_SERVER_CTX_MAP: &str = "TLS_SERVER_CTX";
/// Program the TLS return probes tail-call to walk an HTTP/2 connection's
/// plaintext (slot [`TAIL_H2_WALK`] of `TLS_SERVER_CTX`).
pub const TLS_H2_WALK_PROGRAM: &str = "meshless_tls_h2_walk";
/// Slots of the tail-call program arrays (`SERVER_CTX` for tracepoints,
/// `TLS_SERVER_CTX` for uprobes): the request-context decision, and the
/// HTTP/2 frame walk (each verified once, not in every probe).
pub const TAIL_SERVER_CTX: u32 = 0;
pub const TAIL_H2_WALK: u32 = 1;
/// Per-CPU TLS counters (index: a [`TlsCounter`]).
pub const TLS_COUNTERS_MAP: &str = "TLS_COUNTERS";

/// What the TLS uprobes count (index into [`TLS_COUNTERS_MAP`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCounter {
    /// SSL_read/SSL_write calls that returned plaintext.
    Calls = 0,
    /// Calls whose socket was never seen (a memory BIO, as Node.js uses):
    /// their plaintext is not traced.
    NoSocket = 1,
    /// Plaintext events emitted.
    Events = 2,
    /// Calls in progress that could not be stashed (table full).
    CallsTableFull = 3,
    /// Memory-BIO calls (Node.js) tied to their socket by the thread's
    /// read syscall just before them.
    ThreadTies = 4,
    /// Memory-BIO reads not tied because the thread's last socket read was
    /// claimed by another `SSL *` (dropped rather than risk a wrong tie).
    Ambiguous = 5,
}

/// Number of [`TlsCounter`] slots.
pub const TLS_COUNTER_SLOTS: u32 = 6;

impl TlsCounter {
    /// Every counter with a stable snake_case name.
    pub const ALL: [(TlsCounter, &'static str); 6] = [
        (TlsCounter::Calls, "tls_calls"),
        (TlsCounter::NoSocket, "tls_no_socket"),
        (TlsCounter::Events, "tls_events"),
        (TlsCounter::CallsTableFull, "tls_calls_table_full"),
        (TlsCounter::ThreadTies, "tls_thread_ties"),
        (TlsCounter::Ambiguous, "tls_ambiguous"),
    ];
}

/// Go linking counters (index into [`GO_COUNTERS_MAP`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoCounter {
    /// `runtime.goexit1` uprobe hits (goroutine exits).
    Goexits = 0,
    /// `persistConn.roundTrip` uprobe hits.
    RoundTrips = 1,
    /// `Request.write` uprobe hits.
    RequestWrites = 2,
    /// Outbound requests linked through the Transport's write loop.
    LinkedByTransport = 3,
    /// Outbound requests written by the serving goroutine itself.
    LinkedByGoroutine = 4,
    /// Request heads whose first byte came from net/http's background read.
    SplitHeads = 5,
}

/// Number of [`GoCounter`] slots.
pub const GO_COUNTER_SLOTS: u32 = 8;

impl GoCounter {
    /// Every counter with a stable snake_case name.
    pub const ALL: [(GoCounter, &'static str); 6] = [
        (GoCounter::Goexits, "go_goexits"),
        (GoCounter::RoundTrips, "go_round_trips"),
        (GoCounter::RequestWrites, "go_request_writes"),
        (GoCounter::LinkedByTransport, "go_linked_by_transport"),
        (GoCounter::LinkedByGoroutine, "go_linked_by_goroutine"),
        (GoCounter::SplitHeads, "go_split_heads"),
    ];
}

/// Bit set on a [`LINK_POLICY_MAP`] value (next to the [`LinkPolicy`] in the
/// low byte) for processes whose requests must carry no trace option: pods
/// that opted out of tracing or run in an untraced namespace.
pub const LINK_QUIET: u32 = 0x100;
/// The [`LinkPolicy`] part of a [`LINK_POLICY_MAP`] value.
pub const LINK_POLICY_MASK: u32 = 0xff;

/// Cgroups (by id) of pods whose requests carry no trace option, whatever
/// process sends them: a process that has not been classified yet (a
/// fresh `curl`, a `kubectl exec`) is still quiet. Value: the cgroup's level.
pub const QUIET_CGROUPS_MAP: &str = "QUIET_CGROUPS";
/// Most quiet pod cgroups the kernel side holds.
pub const MAX_QUIET_CGROUPS: u32 = 4096;
/// One `u32`: bit `n` set when a quiet cgroup sits at level `n` (0 = none).
pub const QUIET_LEVELS_MAP: &str = "QUIET_LEVELS";
/// Deepest cgroup level a quiet pod cgroup may sit at (bits of `QUIET_LEVELS`).
pub const MAX_QUIET_LEVEL: u32 = 12;

/// TCP option kind used for the trace context (RFC 6994 shared experimental).
pub const TRACE_OPT_KIND: u8 = 254;
/// Experiment id ("ml") that marks meshless's option.
pub const TRACE_OPT_MAGIC: u16 = 0x6d6c;
/// Option length: kind, length, magic, trace id, span id.
pub const TRACE_OPT_LEN: usize = 28;

/// Largest number of payload bytes copied per syscall. A power of two so the
/// kernel side can bound lengths with a mask the verifier understands.
pub const MAX_CAPTURE: usize = 2048;
/// How many iovecs of a readv/writev/sendmsg/recvmsg are copied at most.
pub const MAX_IOVECS: usize = 64;

/// What an event says happened.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes moved on a tracked socket; payload follows the header.
    Data = 1,
    /// A tracked socket was closed (or its fd reused for a new connection).
    Close = 2,
    /// A process started a new program (its linking policy is decided anew).
    Exec = 3,
}

/// Which way the bytes moved, seen from the traced process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process received the bytes (read, recvfrom, readv, recvmsg).
    Ingress = 1,
    /// The process sent the bytes (write, sendto, writev, sendmsg, sendfile).
    Egress = 2,
}

/// The syscall that produced an event (for debugging and statistics).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscall {
    Read = 1,
    Write = 2,
    Readv = 3,
    Writev = 4,
    Sendto = 5,
    Recvfrom = 6,
    Sendmsg = 7,
    Recvmsg = 8,
    Sendfile = 9,
    Close = 10,
    Accept = 11,
    Connect = 12,
}

/// Event flag: `len` was larger than the bytes captured.
pub const FLAG_TRUNCATED: u32 = 1 << 0;
/// Event flag: first event of a newly tracked connection.
pub const FLAG_NEW_CONN: u32 = 1 << 1;
/// Event flag: `addrs.remote_*` is valid.
pub const FLAG_REMOTE_ADDR: u32 = 1 << 2;
/// Event flag: `addrs.local_*` is valid.
pub const FLAG_LOCAL_ADDR: u32 = 1 << 3;
/// Event flag: the socket came from accept4 (the process is the server).
pub const FLAG_ACCEPTED: u32 = 1 << 4;
/// Event flag: the socket came from connect (the process is the client).
pub const FLAG_CONNECTED: u32 = 1 << 5;
/// Event flag: the kernel could not tell whether the fd is a socket; this
/// is the only event the fd gives until userspace writes a verdict to
/// [`VERDICTS_MAP`].
pub const FLAG_UNCONFIRMED: u32 = 1 << 6;
/// Event flag: the payload continues the previous event of the same
/// syscall (a request head longer than [`MAX_CAPTURE`]).
pub const FLAG_CONTINUATION: u32 = 1 << 7;
/// Connection flag: the stream began with the HTTP/2 client preface; its
/// syscalls (frames, not only request heads) get continuation events.
pub const FLAG_HTTP2: u32 = 1 << 8;

/// Event and connection flag: the payload is TLS plaintext read at the TLS
/// library (OpenSSL's `SSL_read`/`SSL_write`), not the socket's bytes; the
/// socket's own (encrypted) bytes are never emitted for such a connection.
pub const FLAG_TLS: u32 = 1 << 9;

/// Name of the map of per-(tgid, fd) verdicts "socket or not" (value: [`FdVerdict`]).
pub const VERDICTS_MAP: &str = "VERDICTS";
/// Name of the global holding the [`KernelOffsets`] computed from BTF at load time.
pub const KERNEL_OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";
/// Bytes of a syscall's payload sent as continuation events after the
/// first [`MAX_CAPTURE`] (request heads only): the head is seen up to
/// `MAX_CAPTURE + MAX_CONTINUATION` bytes.
pub const MAX_CONTINUATION: usize = 3 * MAX_CAPTURE;

/// What is known about whether a (tgid, fd) is a socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdVerdict {
    /// One of the `VERDICT_*` values.
    pub state: u32,
    pub _pad: u32,
    /// The connection id the fd's unconfirmed event carried, reused once
    /// the fd is confirmed to be a socket so userspace sees one connection.
    pub conn_id: u64,
}

/// Verdict: not a socket; the fd is ignored until closed.
pub const VERDICT_NOT_SOCKET: u32 = 1;
/// Verdict: an unconfirmed event was sent; userspace has not answered yet.
pub const VERDICT_PENDING: u32 = 2;
/// Verdict: userspace confirmed a socket.
pub const VERDICT_SOCKET: u32 = 3;

/// Byte offsets of the kernel struct fields the programs read with
/// `bpf_probe_read_kernel` to tell sockets from other files and to read a
/// socket's addresses. Computed in userspace from `/sys/kernel/btf/vmlinux`;
/// `valid == 0` means "unknown", and the programs fall back to userspace
/// confirmation (also the case under lockdown=confidentiality).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    /// task_struct.files
    pub task_files: u32,
    /// files_struct.fdt
    pub files_fdt: u32,
    /// fdtable.max_fds
    pub fdt_max_fds: u32,
    /// fdtable.fd
    pub fdt_fd: u32,
    /// file.f_inode
    pub file_inode: u32,
    /// file.private_data (a `struct socket *` for sockets)
    pub file_private_data: u32,
    /// inode.i_mode
    pub inode_mode: u32,
    /// inode.i_ino
    pub inode_ino: u32,
    /// socket.sk
    pub socket_sk: u32,
    /// sock.__sk_common.skc_family
    pub sk_family: u32,
    /// sock.__sk_common.skc_daddr
    pub sk_daddr: u32,
    /// sock.__sk_common.skc_rcv_saddr
    pub sk_rcv_saddr: u32,
    /// sock.__sk_common.skc_dport (network order)
    pub sk_dport: u32,
    /// sock.__sk_common.skc_num (host order)
    pub sk_num: u32,
    /// sock.__sk_common.skc_v6_daddr
    pub sk_v6_daddr: u32,
    /// sock.__sk_common.skc_v6_rcv_saddr
    pub sk_v6_rcv_saddr: u32,
    pub _pad: u32,
}

/// [`TraceCtx::flags`]: the context is set (the payload starts a request).
pub const CTX_VALID: u32 = 1 << 0;
/// The trace is sampled.
pub const CTX_SAMPLED: u32 = 1 << 1;
/// `parent_id` is set.
pub const CTX_PARENT: u32 = 1 << 2;
/// The parent came from a `traceparent` header in the request.
pub const CTX_FROM_HEADER: u32 = 1 << 3;
/// The parent came from the caller's TCP option (another meshless kernel).
pub const CTX_FROM_OPTION: u32 = 1 << 4;
/// The parent is the inbound request this process is serving.
pub const CTX_IN_PROCESS: u32 = 1 << 5;
/// The context was sent to the peer in a TCP option.
pub const CTX_SENT: u32 = 1 << 6;

/// Trace context the kernel decided for the request that starts at the
/// first byte of an event's payload: a server span's ids when a request is
/// read, a client span's ids when one is written. Userspace uses these ids
/// and never makes up others for the same request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: [u8; 8],
    /// `CTX_*` bits; 0 when the event starts no request.
    pub flags: u32,
    pub _pad: u32,
}

/// Address family values carried in [`ConnAddrs::family`] (Linux values).
pub const AF_INET: u16 = 2;
/// IPv6 address family.
pub const AF_INET6: u16 = 10;

/// Both ends of a TCP connection, as far as the kernel side learned them.
/// IPv4 addresses occupy the first four bytes of the 16-byte arrays.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnAddrs {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub valid: u32,
    pub _pad2: u32,
    pub local: [u8; 16],
    pub remote: [u8; 16],
}

/// Fixed header of every ring-buffer record; `captured` payload bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at syscall exit.
    pub ktime_ns: u64,
    /// Distinguishes successive connections on the same (tgid, fd).
    pub conn_id: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    /// An [`EventKind`] value.
    pub kind: u32,
    /// A [`Direction`] value.
    pub direction: u32,
    /// A [`Syscall`] value.
    pub syscall: u32,
    /// Bytes the syscall moved (may exceed `captured`).
    pub len: u32,
    /// Payload bytes following this header.
    pub captured: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Data events: this event's number on its connection, both directions
    /// counted together (1, 2, …, wrapping past 0). Taken for every event
    /// the kernel tries to send, also when the ring buffer is full: a jump
    /// tells userspace events were lost. 0: unnumbered (the fd is not in
    /// the connection table).
    pub seq: u32,
    pub addrs: ConnAddrs,
    /// Inode number of the socket (`socket:[N]`), 0 when unknown: lets a
    /// userspace lookup check it found the same socket.
    pub sock_ino: u64,
    /// `bpf_get_current_comm` of the thread.
    pub comm: [u8; 16],
    /// Trace context of the request starting in this payload, if any.
    pub ctx: TraceCtx,
    /// Egress data: `bpf_ktime_get_ns` when the call that sent the bytes
    /// began (sys_enter, or an SSL call's entry), so before they could
    /// leave. Events of one connection made by different threads reach the
    /// ring buffer in the order their exits ran, which a preempted writer
    /// can put after the peer's answer; this time keeps cause before
    /// effect. 0: not taken (ingress, or the exit is as early).
    pub sent_ns: u64,
}

/// Size of the header on the wire.
pub const HEADER_SIZE: usize = core::mem::size_of::<EventHeader>();

// The wire layout both sides compile against: a change here is a change of
// the ring-buffer format (and of the verifier-checked copies into it).
const _: () = assert!(HEADER_SIZE == 184);
const _: () = assert!(core::mem::offset_of!(EventHeader, seq) == 60);
const _: () = assert!(core::mem::offset_of!(EventHeader, addrs) == 64);

/// Names and value sizes of the kernel maps keyed by (tgid << 32 | fd) that
/// userspace expires (fds past the kernel's own sweeps, dead processes).
/// The kernel side asserts the sizes of its value types against these.
pub const CONNS_MAP: &str = "CONNS";
pub const CONN_STATE_SIZE: usize = 104;
/// Offsets in a `CONNS` value: the connection id and the socket inode.
pub const CONN_STATE_ID_OFFSET: usize = 0;
pub const CONN_STATE_INO_OFFSET: usize = 64;
pub const ADDRS_MAP: &str = "ADDRS";
pub const KNOWN_ADDRS_SIZE: usize = 64;
pub const HELD_MAP: &str = "HELD";
pub const HELD_SIZE: usize = 24;
/// close_range and process exit forget fds below this in the kernel;
/// userspace expires the rest.
pub const KERNEL_SWEPT_FDS: u32 = 1024;

/// Per-CPU counters kept by the kernel side (index into [`COUNTERS_MAP`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events submitted to the ring buffer.
    EventsSent = 0,
    /// Events lost because the ring buffer was full.
    RingbufFull = 1,
    /// Events whose payload was cut to MAX_CAPTURE.
    Truncated = 2,
    /// New connections tracked after HTTP was detected.
    ConnsTracked = 3,
    /// Connection table insertions that failed (table full).
    ConnTableFull = 4,
    /// Syscall-argument stash insertions that failed.
    ArgsTableFull = 5,
    /// Copies from user memory that failed.
    ReadUserFailed = 6,
    /// Not a counter: the highest ring-buffer fill (bytes) seen at a submit
    /// on this CPU since userspace last reset it.
    RingbufHighWater = 7,
    /// File descriptors found not to be sockets (each is then ignored).
    NonSocketFds = 8,
    /// Events sent for fds the kernel could not classify (at most one per fd).
    UnconfirmedEvents = 9,
    /// MSG_PEEK receives ignored.
    PeeksSkipped = 10,
    /// Continuation events sent for request heads longer than MAX_CAPTURE.
    ContinuationEvents = 11,
    /// Kernel-memory reads (fd -> socket) that failed.
    KernelReadFailed = 12,
    /// Small first writes held in the per-fd look-ahead until HTTP was decided.
    LookaheadHeld = 13,
    /// Connections cleaned up by dup2/dup3, close_range or process exit.
    ImplicitCloses = 14,
    /// Bytes submitted to the ring buffer (headers and payloads).
    EventBytes = 15,
    /// Trace options written into outgoing TCP segments.
    OptWritten = 16,
    /// Trace options that did not fit into a segment (no header room).
    OptNoRoom = 17,
    /// Trace options parsed from incoming TCP segments.
    OptParsed = 18,
    /// Inbound requests whose parent came from a TCP option.
    CtxFromOption = 19,
    /// Inbound requests whose parent came from a traceparent header.
    CtxFromHeader = 20,
    /// Outbound requests linked to the inbound request being served.
    CtxInProcess = 21,
    /// Server reads that began a request the kernel could not see the
    /// start of (byte-by-byte heads, TLS, HTTP/2): its process links no
    /// outbound call while it is outstanding.
    CtxUnknownRequest = 22,
    /// HTTP/2 syscalls captured without the frame walk because its tail
    /// call failed (the direction's framing is then lost until a resync).
    H2WalkMissed = 23,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 24;

impl Counter {
    /// Every counter, in index order, with a stable snake_case name.
    pub const ALL: [(Counter, &'static str); 23] = [
        (Counter::EventsSent, "events_sent"),
        (Counter::RingbufFull, "ringbuf_full"),
        (Counter::Truncated, "truncated"),
        (Counter::ConnsTracked, "conns_tracked"),
        (Counter::ConnTableFull, "conn_table_full"),
        (Counter::ArgsTableFull, "args_table_full"),
        (Counter::ReadUserFailed, "read_user_failed"),
        (Counter::NonSocketFds, "non_socket_fds"),
        (Counter::UnconfirmedEvents, "unconfirmed_events"),
        (Counter::PeeksSkipped, "peeks_skipped"),
        (Counter::ContinuationEvents, "continuation_events"),
        (Counter::KernelReadFailed, "kernel_read_failed"),
        (Counter::LookaheadHeld, "lookahead_held"),
        (Counter::ImplicitCloses, "implicit_closes"),
        (Counter::EventBytes, "event_bytes"),
        (Counter::OptWritten, "trace_opt_written"),
        (Counter::OptNoRoom, "trace_opt_no_room"),
        (Counter::OptParsed, "trace_opt_parsed"),
        (Counter::CtxFromOption, "ctx_from_option"),
        (Counter::CtxFromHeader, "ctx_from_header"),
        (Counter::CtxInProcess, "ctx_in_process"),
        (Counter::CtxUnknownRequest, "ctx_unknown_request"),
        (Counter::H2WalkMissed, "h2_walk_missed"),
    ];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding and no pointers.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ConnAddrs {}
    unsafe impl aya::Pod for super::FdVerdict {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::TraceCtx {}
}
