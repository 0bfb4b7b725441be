//! Agent self-metrics: counters every stage bumps, read by the reporter.
use std::sync::atomic::{AtomicU64, Ordering};

/// A kernel program's run count and total run time, from the kernel's BPF
/// statistics (`--kernel-stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramTime {
    pub program: String,
    pub runs: u64,
    pub nanos: u64,
}

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        /// Userspace counters (kernel-side ones are read from the COUNTERS map).
        #[derive(Debug, Default)]
        pub struct Stats {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// The memory budget and its per-reason drop counters.
            pub budget: std::sync::Arc<crate::budget::Budget>,
            /// Runs and nanoseconds of each kernel program (`--kernel-stats`),
            /// as last read; empty without it.
            pub kernel_programs: std::sync::Mutex<Vec<ProgramTime>>,
        }

        impl Stats {
            /// (name, value) of every counter, for logs and metrics.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }

            /// (name, help, value) of every counter, for the metrics endpoint.
            pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $doc, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    events_read: "Ring-buffer records read.",
    events_malformed: "Ring-buffer records that could not be decoded.",
    events_dropped_queue: "Events dropped because the pipeline was behind.",
    http_malformed: "Byte runs on tracked sockets that were not valid HTTP/1.x.",
    http_orphan_responses: "Responses with no request seen (e.g. agent started mid-request).",
    http_early_responses: "HTTP/1 responses whose event came before their request's (a client writing and reading on different threads), paired by when the request was sent.",
    http_pairing_resyncs: "Requests given up so that request/response pairing cannot drift (response lost or ambiguous).",
    http_pending_overflows: "Connections whose queue of requests awaiting a response overflowed.",
    event_sequence_gaps: "Gaps in a connection's kernel event numbering (events lost): its pairing restarted there.",
    http_duplicate_events: "Events seen twice (same connection, direction, time and length) and ignored.",
    http_header_limits: "HTTP/2 header blocks or fields not kept because of decoding limits (HPACK bombs, oversized blocks).",
    link_wait_overflows: "Server spans sent without waiting for their same-node client because too many were already waiting (they name no client and may lack its trace).",
    correlator_state_bytes: "Approximate bytes held by the correlator's per-connection state.",
    correlator_shed_conns: "Connections dropped because the correlator was over its memory limit.",
    metric_series_overflow: "Metric recordings folded into the overflow series because a family hit its series limit.",
    metric_series_expired: "Metric series removed after not being updated for the expiry period.",
    conns_tracked: "Connections currently tracked in userspace.",
    process_names_cached: "Processes whose names are cached (read once from /proc, not per event).",
    process_names_evictions: "Times the process-name cache was full and started over.",
    process_names_stand_ins: "Processes named from the kernel's thread name because /proc had them no more (exited before their events were read).",
    conns_evicted: "Connections dropped because the table was full or idle.",
    spans_created: "Spans built from request/response pairs.",
    spans_exported: "Spans written by an exporter.",
    spans_dropped: "Spans dropped because an exporter was behind.",
    spans_unanswered: "Requests that ended without a response (closed or idle).",
    spans_sampled_out: "Spans not exported because the sampler said so.",
    spans_filtered: "Spans of opted-out pods or untraced namespaces.",
    spans_own_exports: "Spans of meshless agents' own export requests (seen at a traced collector): not exported and not in metrics, so exports cannot feed back into themselves.",
    otlp_spans_exported: "Spans the OTLP collector accepted.",
    otlp_spans_dropped: "Spans dropped by the OTLP exporter (queue full or export failed).",
    otlp_export_errors: "Failed OTLP export requests.",
    kernel_events_sent: "Events the kernel programs submitted.",
    kernel_event_bytes: "Bytes the kernel programs submitted to the ring buffer (event headers and payloads).",
    kernel_ringbuf_full: "Events lost because the ring buffer was full.",
    kernel_truncated: "Payload captures cut to the capture size.",
    kernel_read_user_failed: "Payload copies from user memory that failed.",
    kernel_table_full: "Kernel map insertions that failed (tables full).",
    kernel_non_socket_fds: "File descriptors the kernel found not to be sockets (then ignored).",
    kernel_unconfirmed_events: "Events for fds the kernel could not classify (at most one per fd).",
    kernel_peeks_skipped: "MSG_PEEK receives ignored by the kernel probes.",
    kernel_continuation_events: "Continuation events for request heads longer than the capture size.",
    kernel_read_failed: "Kernel-memory reads (fd to socket) that failed.",
    kernel_lookahead_held: "Small first writes held in the kernel look-ahead until HTTP was decided.",
    kernel_implicit_closes: "Connections ended by dup2/dup3, close_range or process exit.",
    kernel_h2_walk_missed: "HTTP/2 syscalls captured without the kernel frame walk (its tail call failed); the connection's HPACK state may become unknown.",
    kernel_conn_entries: "Entries in the kernel's table of followed connections at the last sweep.",
    kernel_addr_entries: "Entries in the kernel's table of accepted/connected socket addresses at the last sweep.",
    kernel_entries_expired: "Kernel per-fd entries removed by userspace (process gone, or fd closed past the kernel's sweep).",
    kernel_ringbuf_used_bytes: "Highest ring-buffer fill in bytes over the last 2 s.",
    kernel_ringbuf_size_bytes: "Ring-buffer size in bytes.",
    trace_opt_written: "Trace contexts written into TCP options of outgoing requests.",
    trace_opt_no_room: "Trace contexts that found no room in a TCP header.",
    trace_opt_parsed: "Trace contexts received in TCP options.",
    ctx_from_option: "Inbound requests whose parent came from the caller's TCP option.",
    ctx_from_header: "Inbound requests whose parent came from a traceparent header.",
    ctx_in_process: "Outbound requests linked to the inbound request their process was serving.",
    ctx_unknown_request: "Server reads that began a request whose start the kernel could not see (its process links no outbound call meanwhile).",
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        // Most adds on the event path are of zero (per-event problem
        // counts): six locked adds per event showed in profiles.
        if n != 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }
}
