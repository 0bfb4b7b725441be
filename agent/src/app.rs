//! Wiring: loads the probes and connects the stages with bounded channels
//! named after their two ends. Closing a stage's input shuts it down and
//! closes its output, so shutdown cascades from capture to export.
use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{signal::unix::SignalKind, sync::mpsc, time};
use tracing::{info, warn};

use crate::{
    capture::{self, loader, Event},
    clock::Clock,
    config::{Config, LogFormat},
    correlate::{Correlator, Limits},
    export::console::Console,
    span::Span,
    stats::Stats,
};

/// Batches in flight between stages (each batch holds up to 4096 items).
const CHANNEL_BATCHES: usize = 256;
const TICK: Duration = Duration::from_millis(50);
/// How often kernel-side losses are checked and, if any, reported.
const LOSS_CHECK: Duration = Duration::from_secs(5);

pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let probes = loader::load(&loader::LoadOptions {
        ringbuf_bytes: config.ringbuf_mib * 1024 * 1024,
        wakeup_bytes: config.wakeup_kib * 1024,
    })?;
    let loader::Probes { events, counters, ebpf } = probes;
    info!(
        tracepoints = loader::TRACEPOINTS.len(),
        ringbuf_mib = config.ringbuf_mib,
        "meshless ready: tracing HTTP/1.x on every socket (Ctrl-C to stop)"
    );

    let (capture_to_correlate, events_rx) = mpsc::channel::<Vec<Event>>(CHANNEL_BATCHES);
    let (correlate_to_export, spans_rx) = mpsc::channel::<Vec<Span>>(CHANNEL_BATCHES);

    let capture = tokio::spawn(capture::run(
        events,
        config.poll_interval(),
        capture_to_correlate,
        stats.clone(),
    ));
    let limits = Limits {
        max_conns: config.max_connections as usize,
        idle_timeout_ns: config.idle_timeout_secs * 1_000_000_000,
        ..Limits::default()
    };
    let correlate = tokio::spawn(correlate_stage(
        Correlator::new(limits, stats.clone()),
        events_rx,
        correlate_to_export,
        stats.clone(),
    ));
    let format = config.console_format;
    let export_stats = stats.clone();
    let export = std::thread::Builder::new()
        .name("export-console".into())
        .spawn(move || console_stage(format, spans_rx, &export_stats))
        .context("starting the console exporter thread")?;

    let report_every = Duration::from_secs(config.stats_interval_secs);
    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut report = time::interval(if report_every.is_zero() {
        Duration::from_secs(3600 * 24)
    } else {
        report_every
    });
    report.tick().await;
    let mut loss_check = time::interval(LOSS_CHECK);
    let mut lost_before = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = report.tick(), if !report_every.is_zero() => log_stats(&stats, &counters, "statistics"),
            _ = loss_check.tick() => lost_before = warn_on_loss(&counters, lost_before),
        }
    }
    info!("stopping: detaching probes and flushing spans");
    capture.abort();
    let _ = capture.await;
    drop(ebpf);
    let _ = correlate.await;
    let _ = tokio::task::spawn_blocking(move || export.join()).await;
    log_stats(&stats, &counters, "final statistics");
    Ok(())
}

async fn correlate_stage(
    mut correlator: Correlator,
    mut events_rx: mpsc::Receiver<Vec<Event>>,
    spans_tx: mpsc::Sender<Vec<Span>>,
    stats: Arc<Stats>,
) {
    let mut tick = time::interval(TICK);
    tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut spans = Vec::new();
    loop {
        tokio::select! {
            batch = events_rx.recv() => match batch {
                Some(batch) => batch.into_iter().for_each(|ev| correlator.handle(ev, &mut spans)),
                None => break,
            },
            _ = tick.tick() => correlator.tick(Clock::monotonic_now(), &mut spans),
        }
        if !spans.is_empty() {
            send_spans(std::mem::take(&mut spans), &spans_tx, &stats);
        }
    }
    correlator.flush(&mut spans);
    if !spans.is_empty() {
        send_spans(spans, &spans_tx, &stats);
    }
}

fn send_spans(batch: Vec<Span>, spans_tx: &mpsc::Sender<Vec<Span>>, stats: &Stats) {
    let n = batch.len() as u64;
    if spans_tx.try_send(batch).is_err() {
        Stats::add(&stats.spans_dropped, n);
    }
}

fn console_stage(format: crate::export::console::Format, mut spans_rx: mpsc::Receiver<Vec<Span>>, stats: &Stats) {
    let stdout = std::io::stdout();
    let mut console = Console::new(format, std::io::BufWriter::new(stdout.lock()));
    while let Some(batch) = spans_rx.blocking_recv() {
        match console.write(&batch) {
            Ok(()) => Stats::add(&stats.spans_exported, batch.len() as u64),
            Err(error) => {
                Stats::add(&stats.spans_dropped, batch.len() as u64);
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    warn!("stdout closed; console exporter stops");
                    return;
                }
                warn!(%error, "console write failed");
            }
        }
    }
}

/// Warns (at most once per check) when the ring buffer overflowed; returns the new total.
fn warn_on_loss(counters: &aya::maps::PerCpuArray<aya::maps::MapData, u64>, before: u64) -> u64 {
    let lost = loader::read_counters(counters)
        .iter()
        .find(|(k, _)| *k == "ringbuf_full")
        .map_or(0, |(_, v)| *v);
    if lost > before {
        warn!(
            lost = lost - before,
            total = lost,
            "ring buffer full: events were lost; raise --ringbuf-mib or lower --poll-interval-ms"
        );
    }
    lost
}

fn log_stats(stats: &Stats, counters: &aya::maps::PerCpuArray<aya::maps::MapData, u64>, what: &str) {
    let user: Vec<String> = stats.snapshot().iter().map(|(k, v)| format!("{k}={v}")).collect();
    let kernel: Vec<String> = loader::read_counters(counters)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info!(kernel = %kernel.join(" "), agent = %user.join(" "), "{what}");
}
