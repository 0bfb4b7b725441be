//! Command-line and environment configuration.
use std::time::Duration;

use clap::Parser;

use crate::export::console::Format;

/// Environment variable names, each defined once.
pub mod env {
    pub const CONSOLE_FORMAT: &str = "MESHLESS_CONSOLE_FORMAT";
    pub const LOG: &str = "MESHLESS_LOG";
    pub const LOG_FORMAT: &str = "MESHLESS_LOG_FORMAT";
    pub const RINGBUF_MIB: &str = "MESHLESS_RINGBUF_MIB";
}

/// meshless: sidecarless HTTP tracing with eBPF.
///
/// Follows every HTTP/1.x connection on this machine from the kernel
/// (syscall tracepoints; no proxy, no restart of your apps) and prints one
/// span per request on each side of every call: method, path, status,
/// duration, process and peer. Needs root (or CAP_BPF + CAP_PERFMON) and
/// tracefs mounted at /sys/kernel/tracing.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshless", version, about, long_about)]
pub struct Config {
    /// How spans are printed on stdout: `human` (one readable line each) or
    /// `json` (one OTel-style JSON object per line, stable for tools).
    #[arg(long, value_enum, default_value = "human", env = env::CONSOLE_FORMAT)]
    pub console_format: Format,

    /// Ring-buffer size in MiB shared by all CPUs (a power of two). Larger
    /// absorbs longer bursts; overflow is counted, never fatal.
    #[arg(long, default_value_t = 8, env = env::RINGBUF_MIB, value_parser = parse_ringbuf_mib)]
    pub ringbuf_mib: u32,

    /// How often the ring buffer is drained, in milliseconds. The kernel
    /// only wakes the agent early when the buffer is filling up.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub poll_interval_ms: u64,

    /// Fill level (KiB) past which the kernel wakes the agent at once.
    #[arg(long, default_value_t = 256)]
    pub wakeup_kib: u64,

    /// Most connections tracked at once; the least recently active is
    /// dropped (and counted) beyond it.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(16..))]
    pub max_connections: u64,

    /// Forget connections idle for this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// Log self-statistics (events, drops, spans) every N seconds; 0 = only at exit.
    #[arg(long, default_value_t = 60)]
    pub stats_interval_secs: u64,

    /// Log filter for the agent's own logs on stderr (e.g. `info`, `meshless=debug`).
    #[arg(long, default_value = "info", env = env::LOG)]
    pub log_level: String,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", env = env::LOG_FORMAT)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_ringbuf_mib(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number of MiB"))?;
    if n == 0 || !n.is_power_of_two() || n > 1024 {
        return Err(format!(
            "ring buffer size must be a power of two between 1 and 1024 MiB, got {n}"
        ));
    }
    Ok(n)
}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_print_human_spans() {
        let c = Config::try_parse_from(["meshless"]).expect("defaults parse");
        assert_eq!(c.console_format, Format::Human);
        assert_eq!(c.ringbuf_mib, 8);
    }

    #[test]
    fn rejects_a_ring_buffer_that_is_not_a_power_of_two() {
        let err = Config::try_parse_from(["meshless", "--ringbuf-mib", "3"]).expect_err("must fail");
        assert!(err.to_string().contains("power of two"), "{err}");
    }
}
