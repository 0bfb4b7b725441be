//! The agent's own memory: its resident set at start-up checkpoints (in
//! the debug log of `meshless::resident`) and freed heap pages handed back
//! to the kernel.
//!
//! Why at start-up: loading parses the kernel's BTF twice (the socket
//! offsets here, relocations in aya) and the eBPF object; that memory is
//! freed once loading is done, but glibc keeps freed pages of its heaps,
//! so without a trim they stay resident under the ring buffer mapped next
//! and set the agent's peak (docs/bench/memory.md).
use tracing::debug;

/// Gives freed heap pages back to the kernel (all arenas, whole free
/// pages inside the heap too, not only its top), then logs the resident
/// set at `stage`.
pub fn release(stage: &'static str) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
    checkpoint(stage);
}

/// Logs the resident set (now, peak, anonymous, file-backed) at debug.
pub fn checkpoint(stage: &'static str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    debug!(
        stage,
        rss_kib = kib("VmRSS:"),
        peak_kib = kib("VmHWM:"),
        anon_kib = kib("RssAnon:"),
        file_kib = kib("RssFile:"),
        "resident memory"
    );
}
