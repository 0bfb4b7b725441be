//! Converting kernel timestamps (CLOCK_MONOTONIC, from bpf_ktime_get_ns)
//! to Unix time.

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC, sampled at creation.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn sample() -> Self {
        let mono = now_ns(libc::CLOCK_MONOTONIC);
        let real = now_ns(libc::CLOCK_REALTIME);
        Self { offset_ns: real - mono }
    }

    /// Unix nanoseconds for a kernel timestamp.
    pub fn to_unix_nanos(&self, ktime_ns: u64) -> u64 {
        (i128::from(ktime_ns) + self.offset_ns).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Current CLOCK_MONOTONIC in nanoseconds (the kernel's time base).
    pub fn monotonic_now() -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }
}
