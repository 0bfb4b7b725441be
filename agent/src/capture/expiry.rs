//! Kernel state of fds whose end the kernel did not see.
//!
//! The kernel forgets a (tgid, fd) on close(), on dup2/dup3 onto it, and —
//! for [`KERNEL_SWEPT_FDS`] fds — on close_range and process exit (a
//! bounded loop, so those stay cheap). A process with more fds than that
//! (a busy proxy) would leave entries behind until the LRU maps evicted
//! them, and its connections would linger in the correlator until idle.
//! So every [`SWEEP_EVERY`] this task walks the maps keyed by
//! (tgid << 32 | fd) and removes entries whose process is gone, or whose fd
//! (one past the kernel's sweep) no longer names the socket the kernel
//! followed; followed connections it removes are closed in the correlator
//! too. It also reports how full the maps are.
//!
//! Runs off the event path (a blocking task): it reads /proc.
use std::{collections::HashMap as StdHashMap, sync::Arc, time::Duration};

use aya::maps::{HashMap, MapData};
use meshless_common::{
    FdVerdict, ADDRS_MAP, CONNS_MAP, CONN_STATE_ID_OFFSET, CONN_STATE_INO_OFFSET, CONN_STATE_SIZE, HELD_MAP, HELD_SIZE,
    KERNEL_SWEPT_FDS, KNOWN_ADDRS_SIZE,
};
use tokio::sync::mpsc;

use super::{event::Comm, ConnKey, Event, EventBatch, EventBody, SocketInfo};
use crate::{
    budget::{Charged, Share},
    stats::Stats,
};

/// How often the maps are walked.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Most fds of live processes checked in /proc per map and sweep (a
/// rotating window: the cost of a sweep stays bounded whatever the load).
const MAX_FD_CHECKS: usize = 8192;

/// Handles on the kernel maps this task expires.
pub struct Expiry {
    conns: HashMap<MapData, u64, [u8; CONN_STATE_SIZE]>,
    addrs: HashMap<MapData, u64, [u8; KNOWN_ADDRS_SIZE]>,
    held: HashMap<MapData, u64, [u8; HELD_SIZE]>,
    verdicts: HashMap<MapData, u64, FdVerdict>,
    /// Sweeps so far, and the most entries a map had last time: each sweep
    /// checks every `rounds`-th high fd (`rounds` keeps the checks per map
    /// under MAX_FD_CHECKS), a different share each time.
    sweeps: usize,
    most_entries: usize,
}

/// Why the maps could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    #[error("kernel map {0} is missing from the eBPF object (agent and object out of step?)")]
    Missing(&'static str),
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

fn open<V: aya::Pod>(ebpf: &aya::Ebpf, name: &'static str) -> Result<HashMap<MapData, u64, V>, ExpiryError> {
    let map = ebpf.map(name).ok_or(ExpiryError::Missing(name))?;
    // A second handle on the same kernel map (the loader keeps its own).
    let id = match map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => data.info(),
        _ => return Err(ExpiryError::Missing(name)),
    }
    .map_err(|source| ExpiryError::Map { name, source })?
    .id();
    let data = MapData::from_id(id).map_err(|source| ExpiryError::Map { name, source })?;
    HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|source| ExpiryError::Map { name, source })
}

impl Expiry {
    /// Opens second handles on the maps of a loaded object (call before
    /// the loader takes any of them out of it).
    pub fn open(ebpf: &aya::Ebpf) -> Result<Expiry, ExpiryError> {
        Ok(Expiry {
            conns: open(ebpf, CONNS_MAP)?,
            addrs: open(ebpf, ADDRS_MAP)?,
            held: open(ebpf, HELD_MAP)?,
            verdicts: open(ebpf, meshless_common::VERDICTS_MAP)?,
            sweeps: 0,
            most_entries: 0,
        })
    }

    /// Sweeps every [`SWEEP_EVERY`] until the capture stage is gone. Holds
    /// only a weak handle on the channel, so shutdown still cascades when
    /// the capture stage drops its sender.
    pub async fn run(mut self, events_tx: mpsc::WeakSender<EventBatch>, stats: Arc<Stats>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if events_tx.upgrade().is_none() {
                return;
            }
            let st = stats.clone();
            let Ok((back, closed)) = tokio::task::spawn_blocking(move || {
                let closed = self.sweep(&st);
                (self, closed)
            })
            .await
            else {
                return;
            };
            self = back;
            let Some(tx) = events_tx.upgrade() else {
                return;
            };
            close_in_correlator(closed, &tx, &stats);
        }
    }

    /// One pass over the maps; returns the followed connections removed.
    pub fn sweep(&mut self, stats: &Stats) -> Vec<ConnKey> {
        let mut procs = Liveness::default();
        let rounds = self.most_entries / MAX_FD_CHECKS + 1;
        let window = (rounds, self.sweeps % rounds);
        self.sweeps = self.sweeps.wrapping_add(1);
        let mut closed = Vec::new();
        let mut removed = 0;
        // CONNS: also checks that the fd still names the followed socket.
        let mut entries = 0;
        let mut stale = Vec::new();
        for (i, (key, value)) in self.conns.iter().filter_map(Result::ok).enumerate() {
            entries += 1;
            let (tgid, fd) = split(key);
            let field = |at: usize| u64::from_ne_bytes(value[at..at + 8].try_into().unwrap_or_default());
            if stale_fd(&mut procs, tgid, fd, field(CONN_STATE_INO_OFFSET), i, window) {
                stale.push(key);
                closed.push(ConnKey {
                    tgid,
                    fd,
                    conn_id: field(CONN_STATE_ID_OFFSET),
                });
            }
        }
        Stats::set(&stats.kernel_conn_entries, entries);
        self.most_entries = entries as usize;
        for key in stale {
            removed += u64::from(self.conns.remove(&key).is_ok());
        }
        let (n, addrs) = expire(&mut self.addrs, &mut procs, window);
        Stats::set(&stats.kernel_addr_entries, n);
        self.most_entries = self.most_entries.max(n as usize);
        removed += addrs;
        removed += expire(&mut self.held, &mut procs, window).1;
        removed += expire(&mut self.verdicts, &mut procs, window).1;
        Stats::add(&stats.kernel_entries_expired, removed);
        closed
    }
}

/// Removes a map's entries of dead processes and closed high fds; returns
/// (entries found, entries removed).
fn expire<V: aya::Pod>(map: &mut HashMap<MapData, u64, V>, procs: &mut Liveness, window: (usize, usize)) -> (u64, u64) {
    let mut entries = 0;
    let mut stale = Vec::new();
    for (i, key) in map.keys().filter_map(Result::ok).enumerate() {
        entries += 1;
        let (tgid, fd) = split(key);
        if stale_fd(procs, tgid, fd, 0, i, window) {
            stale.push(key);
        }
    }
    let removed = stale.into_iter().filter(|key| map.remove(key).is_ok()).count() as u64;
    (entries, removed)
}

fn split(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

/// True when (tgid, fd) is gone: its process exited, or — for an fd the
/// kernel's sweeps do not reach, checked within this sweep's window — the
/// fd is closed or (`ino` != 0) names another socket now.
fn stale_fd(procs: &mut Liveness, tgid: u32, fd: u32, ino: u64, index: usize, window: (usize, usize)) -> bool {
    if !procs.alive(tgid) {
        return true;
    }
    let (rounds, round) = window;
    if fd < KERNEL_SWEPT_FDS || index % rounds != round {
        return false;
    }
    match std::fs::read_link(format!("/proc/{tgid}/fd/{fd}")) {
        Ok(target) => ino != 0 && target.to_string_lossy() != format!("socket:[{ino}]"),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Which processes exist, looked up once per sweep.
#[derive(Default)]
struct Liveness(StdHashMap<u32, bool>);

impl Liveness {
    fn alive(&mut self, tgid: u32) -> bool {
        *self.0.entry(tgid).or_insert_with(|| process_exists(tgid))
    }
}

/// True when `tgid` is a live process (a thread id of another process
/// with the same number does not count, nor does a zombie: its fds are
/// closed already).
fn process_exists(tgid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{tgid}/status")) {
        Ok(status) => {
            let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
            field("Tgid:").is_some_and(|t| t == tgid.to_string())
                && !field("State:").is_some_and(|s| s.starts_with('Z'))
        }
        // Unreadable for another reason: keep the entry.
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Ends the removed connections in the correlator (a Close each), so their
/// state goes now rather than at the idle timeout. Dropped, like any event,
/// when the budget or the queue is full; idle expiry then catches them.
fn close_in_correlator(closed: Vec<ConnKey>, events_tx: &mpsc::Sender<EventBatch>, stats: &Stats) {
    if closed.is_empty() {
        return;
    }
    let now = crate::clock::Clock::monotonic_now();
    let batch: Vec<Event> = closed
        .into_iter()
        .map(|conn| Event {
            ktime_ns: now,
            conn,
            tid: conn.tgid,
            cgroup_id: 0,
            comm: Comm([0; 16]),
            new_conn: false,
            seq: 0,
            socket: SocketInfo::default(),
            ctx: None,
            body: EventBody::Close,
        })
        .collect();
    let bytes = (batch.len() * std::mem::size_of::<Event>()) as u64;
    if let Some(charge) = stats.budget.charge(Share::Capture, bytes) {
        let _ = events_tx.try_send(Charged::new(batch, charge));
    }
}
