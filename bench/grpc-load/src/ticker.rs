//! Microsecond-precise sleeps inside the tokio runtime. tokio's own timer
//! rounds up to whole milliseconds, which at 10 000 calls/s would send
//! calls in bursts of ten and (since latency counts from the intended send
//! time) add up to 1 ms to each; a timerfd wakes the runtime's epoll on an
//! hrtimer instead, with no extra thread and no cross-thread handoff.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// Waits shorter than this are not slept: arming a timer costs about as much.
const MIN_SLEEP: Duration = Duration::from_micros(20);

/// A one-shot monotonic timer registered with the runtime.
pub struct Ticker {
    fd: AsyncFd<OwnedFd>,
}

impl Ticker {
    pub fn new() -> io::Result<Ticker> {
        // SAFETY: a plain syscall with constant flags.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        #[allow(deprecated)] // AsyncFd::new is deprecated in tokio 1.54 in favour of a builder.
        let fd = AsyncFd::new(fd)?;
        Ok(Ticker { fd })
    }

    /// Sleeps for `d` (returns at once for very short waits).
    pub async fn sleep(&mut self, d: Duration) -> io::Result<()> {
        if d < MIN_SLEEP {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid fd and a fully initialised itimerspec; no old value wanted.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let expired = guard.try_io(|fd| {
                let mut count = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer.
                let n = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match expired {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_sub_millisecond_waits_without_rounding_up_to_a_tick() {
        let mut ticker = Ticker::new().expect("timerfd");
        let t0 = Instant::now();
        for _ in 0..50 {
            let t = Instant::now();
            ticker.sleep(Duration::from_micros(100)).await.expect("sleep");
            assert!(t.elapsed() >= Duration::from_micros(100), "woke early");
        }
        // 5 ms asked; tokio's millisecond timer would take at least 50 ms.
        let total = t0.elapsed();
        assert!(total < Duration::from_millis(50), "50 × 100 µs took {total:?}");
    }
}
