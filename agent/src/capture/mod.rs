//! Stage 1: kernel programs → owned events.
//!
//! The kernel submits without waking us unless the ring buffer fills past a
//! threshold (wakeups cost ~44 µs per request here, see TOOLCHAIN.md), so
//! the reader drains on a short timer and on readiness.
pub mod btf;
pub mod confirm;
pub mod event;
pub mod expiry;
pub mod loader;
pub mod names;
pub mod preflight;
pub mod record;
pub mod sequence;

use std::{sync::Arc, time::Duration};

use tokio::{io::unix::AsyncFd, sync::mpsc, time};
use tracing::warn;

pub use confirm::Confirmer;
pub use event::{Arena, Comm, ConnKey, Event, EventBody, SocketInfo};
pub use sequence::{Order, Sequence};

use crate::{
    budget::{self, Charged, Reason, Share},
    health::Heartbeat,
    stats::Stats,
};

/// Most events handed downstream in one batch.
const MAX_BATCH: usize = 4096;
/// Most bytes in one batch: what is held outside the budget while a batch
/// is being built stays a small constant.
const MAX_BATCH_BYTES: u64 = 1 << 20;

/// Events on their way to the correlator, their bytes held against the
/// [`Share::Capture`] budget until the batch is dropped.
pub type EventBatch = Charged<Vec<Event>>;

/// Longest wait between drains when little arrives: an idle agent wakes
/// ~10 times a second instead of once per `poll` (the kernel still wakes it
/// at once when the buffer fills past its wakeup mark).
const MAX_POLL: Duration = Duration::from_millis(100);
/// A drain below this many bytes lengthens the wait (doubling up to
/// [`MAX_POLL`]); above 4× it, the wait halves back towards `poll`. Keeps
/// what accumulates between drains far below the kernel's wakeup mark, so
/// a longer wait never makes the traced processes' syscalls wake us.
const SMALL_DRAIN_BYTES: u64 = 16 * 1024;

/// The wait before the next drain after one that read `bytes`.
fn next_wait(wait: Duration, bytes: u64, poll: Duration) -> Duration {
    if bytes < SMALL_DRAIN_BYTES {
        (wait * 2).min(MAX_POLL.max(poll))
    } else if bytes > 4 * SMALL_DRAIN_BYTES {
        (wait / 2).max(poll)
    } else {
        wait
    }
}

/// Reads the ring buffer until the receiver goes away.
pub async fn run(
    events: crate::ringbuf::Ring,
    poll: Duration,
    events_tx: mpsc::Sender<EventBatch>,
    stats: Arc<Stats>,
    confirmer: Confirmer,
    heartbeat: Heartbeat,
    mut recorder: Option<record::Recorder>,
) -> std::io::Result<()> {
    #[allow(deprecated)] // AsyncFd::new is deprecated in tokio 1.54 in favour of a builder.
    let mut fd = AsyncFd::new(events)?;
    let mut wait = poll;
    let mut arena = Arena::default();
    // Events in the last batch handed on: the next one is sized for as
    // many (growing a batch from empty copied it at every doubling).
    let mut last_len = 0;
    loop {
        let woken = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(error) => {
                        heartbeat.fail(format!("waiting on the ring buffer: {error}"));
                        return Err(error);
                    }
                };
                guard.clear_ready();
                true
            }
            _ = time::sleep(wait) => false,
        };
        heartbeat.beat();
        let drained = drain(
            fd.get_mut(),
            &mut arena,
            &mut last_len,
            &events_tx,
            &stats,
            &confirmer,
            recorder.as_mut(),
        );
        let Some(bytes) = drained else {
            heartbeat.finish();
            return Ok(());
        };
        // The kernel woke us: the buffer is filling, poll at full rate.
        wait = if woken { poll } else { next_wait(wait, bytes, poll) };
    }
}

/// Drains every record; the bytes read, or None when the pipeline has
/// shut down.
fn drain(
    ring: &mut crate::ringbuf::Ring,
    arena: &mut Arena,
    last_len: &mut usize,
    events_tx: &mpsc::Sender<EventBatch>,
    stats: &Stats,
    confirmer: &Confirmer,
    mut recorder: Option<&mut record::Recorder>,
) -> Option<u64> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut read = 0;
    while let Some(record) = ring.next() {
        read += record.len() as u64;
        Stats::inc(&stats.events_read);
        if let Some(r) = recorder.as_deref_mut() {
            r.write(&record);
        }
        if let Some((tgid, fd)) = event::unconfirmed(&record) {
            confirmer.ask(tgid, fd);
        }
        match Event::decode_in(&record, arena) {
            Ok(ev) => {
                bytes += budget::event_bytes(&ev);
                if batch.capacity() == 0 {
                    // Sized when its first event comes (most wakeups
                    // that find nothing allocate nothing).
                    batch.reserve_exact(*last_len);
                }
                batch.push(ev);
            }
            Err(error) => {
                Stats::inc(&stats.events_malformed);
                warn!(%error, "skipping undecodable ring-buffer record");
            }
        }
        if batch.len() >= MAX_BATCH || bytes >= MAX_BATCH_BYTES {
            *last_len = batch.len();
            if !send(std::mem::take(&mut batch), std::mem::take(&mut bytes), events_tx, stats) {
                return None;
            }
        }
    }
    if let Some(r) = recorder {
        r.flush();
    }
    if batch.is_empty() {
        return Some(read);
    }
    *last_len = batch.len();
    send(batch, bytes, events_tx, stats).then_some(read)
}

/// Hands a batch on if its bytes fit the budget and the channel has room;
/// otherwise sheds it, counted. False when the pipeline has shut down.
fn send(batch: Vec<Event>, bytes: u64, events_tx: &mpsc::Sender<EventBatch>, stats: &Stats) -> bool {
    let n = batch.len() as u64;
    // A batch sized for the last one may have room it did not use: that
    // is held memory too.
    let spare = (batch.capacity() - batch.len()) * std::mem::size_of::<Event>();
    let bytes = bytes + spare as u64;
    let Some(charge) = stats.budget.charge(Share::Capture, bytes) else {
        Stats::add(&stats.events_dropped_queue, n);
        stats.budget.shed(Reason::CaptureBudget, n);
        return !events_tx.is_closed();
    };
    match events_tx.try_send(Charged::new(batch, charge)) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            Stats::add(&stats.events_dropped_queue, n);
            stats.budget.shed(Reason::CaptureQueue, n);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_millis(10);

    #[test]
    fn small_drains_lengthen_the_wait_up_to_the_idle_limit() {
        let mut wait = POLL;
        for _ in 0..10 {
            wait = next_wait(wait, 0, POLL);
        }
        assert_eq!(wait, MAX_POLL);
    }

    #[test]
    fn large_drains_bring_the_wait_back_to_the_configured_poll() {
        let mut wait = MAX_POLL;
        for _ in 0..10 {
            wait = next_wait(wait, 1 << 20, POLL);
        }
        assert_eq!(wait, POLL);
        // A poll configured slower than the idle limit is kept.
        let slow = Duration::from_millis(500);
        assert_eq!(next_wait(slow, 0, slow), slow);
    }
}
