//! Checks that name what is missing before we try to load anything, so the
//! user gets "mount tracefs" rather than a raw errno.
use std::path::{Path, PathBuf};

/// Why the agent cannot start capturing.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "meshless needs root (or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH) to load eBPF programs; \
         run it with sudo, or `sudo -E cargo xtask run`"
    )]
    NotRoot,
    #[error(
        "tracefs is not mounted (looked for {0}): mount it with \
         `sudo mount -t tracefs nodev /sys/kernel/tracing` (cargo xtask run does this for you)"
    )]
    NoTracefs(String),
    #[error(
        "tracepoint {0} does not exist on this kernel: meshless needs CONFIG_FTRACE_SYSCALLS \
         (syscall tracepoints) and the sock:inet_sock_set_state tracepoint"
    )]
    MissingTracepoint(String),
}

const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs directory, checking the tracepoints we attach exist.
pub fn check(tracepoints: &[(&str, &str)]) -> Result<PathBuf, PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !has_cap_bpf() {
        return Err(PreflightError::NotRoot);
    }
    let tracefs = TRACEFS_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .ok_or_else(|| PreflightError::NoTracefs(TRACEFS_CANDIDATES.join(" and ")))?;
    for (category, name) in tracepoints {
        if !tracefs.join("events").join(category).join(name).is_dir() {
            return Err(PreflightError::MissingTracepoint(format!("{category}/{name}")));
        }
    }
    Ok(tracefs.to_path_buf())
}

/// CAP_BPF (39) in the effective set, read from /proc/self/status.
fn has_cap_bpf() -> bool {
    const CAP_BPF: u32 = 39;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0)
}
