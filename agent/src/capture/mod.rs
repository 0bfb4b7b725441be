//! Stage 1: kernel programs → owned events.
//!
//! The kernel submits without waking us unless the ring buffer fills past a
//! threshold (wakeups cost ~44 µs per request here, see TOOLCHAIN.md), so
//! the reader drains on a short timer and on readiness.
pub mod btf;
pub mod confirm;
pub mod event;
pub mod loader;
pub mod preflight;

use std::{sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, time};
use tracing::warn;

pub use confirm::Confirmer;
pub use event::{ConnKey, Event, EventBody, SocketInfo};

use crate::stats::Stats;

/// Most events handed downstream in one batch.
const MAX_BATCH: usize = 4096;

/// Reads the ring buffer until the receiver goes away.
pub async fn run(
    events: RingBuf<MapData>,
    poll: Duration,
    events_tx: mpsc::Sender<Vec<Event>>,
    stats: Arc<Stats>,
    confirmer: Confirmer,
) -> std::io::Result<()> {
    #[allow(deprecated)] // AsyncFd::new is deprecated in tokio 1.54 in favour of a builder.
    let mut fd = AsyncFd::new(events)?;
    let mut tick = time::interval(poll);
    tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                guard.clear_ready();
            }
            _ = tick.tick() => {}
        }
        if !drain(fd.get_mut(), &events_tx, &stats, &confirmer) {
            return Ok(());
        }
    }
}

/// Drains every record; false when the pipeline has shut down.
fn drain(
    ring: &mut RingBuf<MapData>,
    events_tx: &mpsc::Sender<Vec<Event>>,
    stats: &Stats,
    confirmer: &Confirmer,
) -> bool {
    let mut batch = Vec::new();
    while let Some(record) = ring.next() {
        Stats::inc(&stats.events_read);
        if let Some((tgid, fd)) = event::unconfirmed(&record) {
            confirmer.ask(tgid, fd);
        }
        match Event::decode(&record) {
            Ok(ev) => batch.push(ev),
            Err(error) => {
                Stats::inc(&stats.events_malformed);
                warn!(%error, "skipping undecodable ring-buffer record");
            }
        }
        if batch.len() >= MAX_BATCH && !send(std::mem::take(&mut batch), events_tx, stats) {
            return false;
        }
    }
    batch.is_empty() || send(batch, events_tx, stats)
}

fn send(batch: Vec<Event>, events_tx: &mpsc::Sender<Vec<Event>>, stats: &Stats) -> bool {
    let n = batch.len() as u64;
    match events_tx.try_send(batch) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            Stats::add(&stats.events_dropped_queue, n);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
