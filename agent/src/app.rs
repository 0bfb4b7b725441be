//! Wiring: loads the probes and connects the stages with bounded channels
//! named after their two ends. Closing a stage's input shuts it down and
//! closes its output, so shutdown cascades from capture to the exporters.
//!
//! ```text
//! capture ─capture_to_correlate─▶ correlate ─▶ route (metrics, sampling)
//!                                               ├─route_to_console─▶ console
//!                                               └─route_to_otlp────▶ OTLP traces
//! ```
use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context;
use tokio::{signal::unix::SignalKind, sync::mpsc, time};
use tracing::{error, info, warn};

use crate::{
    admin,
    budget::Share,
    capture::{self, loader, EventBatch},
    clock::Clock,
    config::{otel::ExportSettings, Config, LogFormat},
    correlate::{Correlator, Limits},
    export::{
        console::{Console, Format},
        otlp::{self, OtlpTraces, SpanBatch},
        resource::{self, Resources},
    },
    health::{Health, Heartbeat},
    k8s::{
        self,
        index::{Index, NamespaceFilter},
    },
    metrics::{OtlpMetrics, Prometheus},
    pipeline::{ChannelSink, Pipeline, Router, Sink},
    propagation,
    stats::Stats,
};

/// Batches in flight between stages (each batch holds up to 4096 items).
const CHANNEL_BATCHES: usize = 256;
/// The correlator's tick while traffic flows (link waits are released
/// on it).
const TICK: Duration = Duration::from_millis(50);
/// The slowest tick, reached by doubling while nothing arrives and nothing
/// waits: an idle agent wakes for it once a second, not 20 times.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// How often kernel counters are read (and losses reported).
const KERNEL_CHECK: Duration = Duration::from_secs(2);
/// How often freed heap memory is handed back to the kernel: after a
/// burst (thousands of connections at once) the state is freed, but glibc
/// would keep RSS at the peak.
const TRIM_EVERY: Duration = Duration::from_secs(30);

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
    let settings = ExportSettings::from_config(&config)?;
    let node = config.kubernetes_node().map_err(anyhow::Error::msg)?;
    let stats = Arc::new(Stats::default());
    stats.budget.set_limit(config.memory_limit);
    let health = Health::default();
    let ready: admin::Ready = Arc::default();
    let prometheus = Arc::new(Prometheus::new(stats.clone()));
    // Build exporters before loading probes: bad settings fail fast.
    let span_exporter = settings
        .otlp_traces
        .as_ref()
        .map(otlp::build_span_exporter)
        .transpose()?;
    let otlp_metrics = settings
        .otlp_metrics
        .as_ref()
        .map(|t| {
            OtlpMetrics::start(
                t,
                settings.metric_interval,
                resource::agent(&settings.agent_service_name, &settings.resource_attributes),
            )
        })
        .transpose()?;
    let live = config
        .ui_enabled(node.is_some())
        .then(|| crate::ui::Live::new((config.memory_limit / 32) as usize, config.capture_query));
    let admin = match config.metrics_addr.0 {
        Some(addr) => Some(
            admin::bind(
                addr,
                prometheus.clone(),
                ready.clone(),
                health.clone(),
                live.clone().map(crate::ui::api::router),
            )
            .await?,
        ),
        None => None,
    };

    let propagate = propagation::check(config.propagation)?;
    let scope = propagation::Scope::resolve(config.cgroup.as_deref())?;
    let probes = loader::load(&loader::LoadOptions {
        ringbuf_bytes: config.ringbuf_mib * 1024 * 1024,
        wakeup_bytes: config.wakeup_kib * 1024,
        propagation: propagate,
        scope: scope.kernel_filter(),
    })?;
    let loader::Probes {
        events,
        mut counters,
        verdicts,
        expiry,
        mut ebpf,
    } = probes;
    if propagate {
        propagation::attach(&mut ebpf, &propagation::option_cgroups(&scope, node.is_some()))?;
    }
    let quiet = node.is_some().then(k8s::quiet::QuietPods::default);
    let classify = propagation::Classifier::new(&mut ebpf, quiet.clone())
        .map(spawn_classifier)
        .transpose()?;
    let https =
        config.tls != crate::config::TlsMode::Off && start_tls(&mut ebpf, config.tls == crate::config::TlsMode::On)?;
    Stats::set(
        &stats.kernel_ringbuf_size_bytes,
        u64::from(config.ringbuf_mib) * 1024 * 1024,
    );
    // Held for the agent's lifetime: the kernel keeps counting while it is open.
    let kernel_stats = config.kernel_stats.then(enable_kernel_stats).flatten();
    let k8s = match &node {
        Some(node) => {
            let updates = k8s::watch::start(node).await?;
            let filter = NamespaceFilter {
                include: config.namespaces.clone(),
                exclude: config.exclude_namespaces.clone(),
            };
            Some(Index::new(updates, filter, quiet.unwrap_or_default()))
        }
        None => {
            ready.store(true, Ordering::Relaxed);
            None
        }
    };
    let metrics_at = admin.as_ref().map_or_else(|| "off".to_owned(), |(a, _)| a.to_string());
    let ui_at = live.as_ref().and(admin.as_ref()).map(|(a, _)| browsable(*a));
    if let Some((_, serve)) = admin {
        tokio::spawn(serve);
    }

    let recorder = match &config.record {
        Some(path) => {
            warn!(file = %path.display(), "recording raw ring-buffer records (payloads included)");
            Some(capture::record::Recorder::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => None,
    };
    let (capture_to_correlate, events_rx) = mpsc::channel::<EventBatch>(CHANNEL_BATCHES);
    tokio::spawn(expiry.run(capture_to_correlate.downgrade(), stats.clone()));
    let capture = tokio::spawn(capture::run(
        events,
        config.poll_interval(),
        capture_to_correlate,
        stats.clone(),
        capture::Confirmer::spawn(verdicts),
        health.stage("capture"),
        recorder,
    ));

    let mut export_threads = Vec::new();
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if settings.console {
        let (tx, rx) = mpsc::channel::<SpanBatch>(CHANNEL_BATCHES);
        let hb = health.stage_with("export-console", pending(&tx));
        sinks.push(Box::new(ChannelSink::new(tx, stats.clone())));
        let (format, query, st) = (config.console_format, settings.capture_query, stats.clone());
        export_threads.push(
            std::thread::Builder::new()
                .name("export-console".into())
                .spawn(move || console_stage(format, query, rx, &st, hb))
                .context("starting the console exporter thread")?,
        );
    }
    if let (Some(exporter), Some(target)) = (span_exporter, &settings.otlp_traces) {
        let (tx, rx) = mpsc::channel::<SpanBatch>(CHANNEL_BATCHES);
        sinks.push(Box::new(ChannelSink::new(tx, stats.clone())));
        let hb = health.stage("export-otlp");
        let resources = Resources::new(
            settings.resource_attributes.clone(),
            settings.service_names.clone(),
            node.clone(),
        );
        let stage = OtlpTraces::new(
            exporter,
            target.endpoint.clone(),
            resources,
            settings.capture_query,
            settings.queue,
            stats.clone(),
        );
        export_threads.push(
            std::thread::Builder::new()
                .name("export-otlp".into())
                .spawn(move || otlp_stage(stage, rx, hb))
                .context("starting the OTLP exporter thread")?,
        );
    }

    let limits = Limits {
        max_conns: config.max_connections as usize,
        idle_timeout_ns: config.idle_timeout_secs * 1_000_000_000,
        max_state_bytes: stats.budget.limit_of(Share::Correlate) as usize,
        link_wait_ns: Limits::link_wait_for_poll(config.poll_interval()),
    };
    let router = Router {
        sinks,
        sampler: settings.sampler,
        prometheus,
        otlp_metrics,
        names: Resources::new(Vec::new(), settings.service_names.clone(), node.clone()),
        stats: stats.clone(),
        k8s,
        ready,
        live,
    };
    let mut correlator = Correlator::new(limits, settings.headers.clone(), stats.clone());
    if let Some(tx) = classify {
        correlator.notify_new_processes(tx);
    }
    let correlate = tokio::spawn(correlate_stage(
        Pipeline::new(correlator, router),
        events_rx,
        health.stage("correlate"),
    ));
    info!(
        tracepoints = loader::TRACEPOINTS.len(),
        ringbuf_mib = config.ringbuf_mib,
        metrics = %metrics_at,
        console = settings.console,
        otlp = settings.otlp_traces.as_ref().map_or("off", |t| t.endpoint.as_str()),
        kubernetes = node.as_deref().unwrap_or("off"),
        propagation = if propagate { "tcp-options" } else { "off" },
        https,
        scope = %scope.path.display(),
        "meshless ready: tracing HTTP/1.x on every socket (Ctrl-C to stop)"
    );
    if let Some(addr) = ui_at {
        info!("live service map and traces: http://{addr}/");
    }

    let report_every = Duration::from_secs(config.stats_interval_secs);
    // Both made once, before the loop: a signal is delivered to the
    // streams that exist when it arrives, so a `ctrl_c()` future made anew
    // each turn of the loop missed a Ctrl-C that came while the loop body
    // ran (seen: an agent that ignored SIGINT until a second one).
    let mut interrupt =
        tokio::signal::unix::signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut report = time::interval(if report_every.is_zero() {
        Duration::from_secs(86_400)
    } else {
        report_every
    });
    report.tick().await;
    let mut kernel_check = time::interval(KERNEL_CHECK);
    let mut trim = time::interval(TRIM_EVERY);
    let mut supervise = Supervisor::new(health.clone());
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = report.tick(), if !report_every.is_zero() => log_stats(&stats, "statistics"),
            _ = supervise.tick.tick() => supervise.check(),
            _ = trim.tick() => crate::resident::release("periodic"),
            _ = kernel_check.tick() => {
                read_kernel_counters(&counters, &stats);
                if kernel_stats.is_some() {
                    read_program_times(&ebpf, &stats);
                }
                Stats::set(&stats.kernel_ringbuf_used_bytes, loader::take_ringbuf_high_water(&mut counters));
            }
        }
    }
    info!("stopping: detaching probes and flushing spans");
    health.stopping();
    capture.abort();
    let _ = capture.await;
    drop(ebpf);
    if let Ok(Some(m)) = correlate.await {
        m.shutdown();
    }
    let _ = tokio::task::spawn_blocking(move || export_threads.into_iter().for_each(|t| drop(t.join()))).await;
    read_kernel_counters(&counters, &stats);
    log_stats(&stats, "final statistics");
    Ok(())
}

/// Attaches the TLS uprobes to the libssl files found now (before the
/// agent says it is ready) and keeps finding new ones on a side thread.
/// False when HTTPS cannot be traced (logged; plaintext still is).
/// `expensive_too`: `--tls on` (also libraries whose probes single-step).
fn start_tls(ebpf: &mut aya::Ebpf, expensive_too: bool) -> anyhow::Result<bool> {
    let mut probes = match crate::tls::TlsProbes::load(ebpf, expensive_too) {
        Ok(probes) => probes,
        Err(error) => {
            warn!(%error, "HTTPS is not traced");
            return Ok(false);
        }
    };
    probes.attach_host();
    probes.scan();
    crate::resident::release("TLS libraries scanned");
    info!(libraries = probes.attached(), "HTTPS: OpenSSL uprobes attached");
    crate::tls::spawn(probes).context("starting the TLS attach thread")?;
    Ok(true)
}

/// Queue of processes waiting for their linking policy.
const CLASSIFY_QUEUE: usize = 4096;

/// Decides new processes' linking policies on a thread of their own (it
/// reads executables, which must not stall correlation).
fn spawn_classifier(
    mut classifier: crate::propagation::Classifier,
) -> anyhow::Result<std::sync::mpsc::SyncSender<crate::propagation::Seen>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<crate::propagation::Seen>(CLASSIFY_QUEUE);
    std::thread::Builder::new()
        .name("classify".into())
        .spawn(move || {
            lower_priority();
            loop {
                match rx.recv_timeout(crate::propagation::TICK) {
                    Ok(seen) => classifier.observe(seen),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                classifier.tick();
            }
        })
        .context("starting the process classifier thread")?;
    Ok(tx)
}

async fn correlate_stage(
    mut pipeline: Pipeline,
    mut events_rx: mpsc::Receiver<EventBatch>,
    heartbeat: Heartbeat,
) -> Option<OtlpMetrics> {
    let mut period = TICK;
    let mut next_tick = time::Instant::now() + period;
    let mut quiet = true;
    loop {
        heartbeat.beat();
        tokio::select! {
            batch = events_rx.recv() => match batch {
                Some(mut batch) => {
                    pipeline.correlator.arrived(Clock::monotonic_now());
                    pipeline.events(batch.items.drain(..));
                    quiet = false;
                    // Traffic again: tick at full rate from now on.
                    if period > TICK {
                        period = TICK;
                        next_tick = next_tick.min(time::Instant::now() + TICK);
                    }
                }
                None => break,
            },
            _ = time::sleep_until(next_tick) => {
                pipeline.tick(Clock::monotonic_now());
                let idle = quiet && !pipeline.correlator.has_waiting();
                period = if idle { (period * 2).min(IDLE_TICK) } else { TICK };
                quiet = true;
                next_tick = time::Instant::now() + period;
            }
        }
    }
    let mut router = pipeline.finish();
    heartbeat.finish();
    router.otlp_metrics.take()
}

/// Niceness of the exporter threads: encoding and sending spans should
/// yield the CPU to the traced applications (measured: the OTLP batches
/// were the agent's main source of tail latency for its neighbours).
const EXPORT_NICE: i32 = 10;

fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, EXPORT_NICE);
    }
}

/// The OTLP exporter on its own low-priority thread and runtime.
fn otlp_stage(stage: OtlpTraces, rx: mpsc::Receiver<SpanBatch>, heartbeat: Heartbeat) {
    lower_priority();
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(stage.run(rx, heartbeat)),
        Err(error) => {
            warn!(%error, "cannot start the OTLP exporter runtime; spans will not be exported");
            heartbeat.fail(format!("cannot start its runtime: {error}"));
        }
    }
}

fn console_stage(
    format: Format,
    capture_query: bool,
    mut spans_rx: mpsc::Receiver<SpanBatch>,
    stats: &Stats,
    heartbeat: Heartbeat,
) {
    lower_priority();
    let stdout = std::io::stdout();
    let mut console = Console::new(format, capture_query, std::io::BufWriter::new(stdout.lock()));
    while let Some(batch) = spans_rx.blocking_recv() {
        heartbeat.beat();
        let spans: usize = batch.items.iter().map(Vec::len).sum();
        match batch.items.iter().try_for_each(|spans| console.write(spans)) {
            Ok(()) => Stats::add(&stats.spans_exported, spans as u64),
            Err(error) => {
                Stats::add(&stats.spans_dropped, spans as u64);
                if error.kind() == std::io::ErrorKind::BrokenPipe {
                    warn!("stdout closed; console exporter stops");
                    return heartbeat.fail("stdout closed");
                }
                warn!(%error, "console write failed");
            }
        }
    }
    heartbeat.finish();
}

/// Turns on the kernel's BPF run-time statistics until the returned fd is
/// closed (`--kernel-stats`); None, with a warning, when the kernel refuses.
fn enable_kernel_stats() -> Option<std::os::fd::OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(error) => {
            warn!(%error, "--kernel-stats: the kernel's BPF statistics could not be turned on (needs Linux 5.8 and CAP_SYS_ADMIN); no program times");
            None
        }
    }
}

/// Copies each loaded kernel program's run count and run time into [`Stats`].
fn read_program_times(ebpf: &aya::Ebpf, stats: &Stats) {
    let times: Vec<crate::stats::ProgramTime> = ebpf
        .programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(crate::stats::ProgramTime {
                program: name.to_owned(),
                runs: info.run_count(),
                nanos: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            })
        })
        .collect();
    *stats.kernel_programs.lock().unwrap_or_else(|e| e.into_inner()) = times;
}

/// Copies the kernel's per-CPU counters into [`Stats`]; warns on new losses.
fn read_kernel_counters(counters: &aya::maps::PerCpuArray<aya::maps::MapData, u64>, stats: &Stats) {
    let mut table_full = 0;
    for (name, value) in loader::read_counters(counters) {
        match name {
            "events_sent" => Stats::set(&stats.kernel_events_sent, value),
            "event_bytes" => Stats::set(&stats.kernel_event_bytes, value),
            "truncated" => Stats::set(&stats.kernel_truncated, value),
            "trace_opt_written" => Stats::set(&stats.trace_opt_written, value),
            "trace_opt_no_room" => Stats::set(&stats.trace_opt_no_room, value),
            "trace_opt_parsed" => Stats::set(&stats.trace_opt_parsed, value),
            "ctx_from_option" => Stats::set(&stats.ctx_from_option, value),
            "ctx_from_header" => Stats::set(&stats.ctx_from_header, value),
            "ctx_in_process" => Stats::set(&stats.ctx_in_process, value),
            "ctx_unknown_request" => Stats::set(&stats.ctx_unknown_request, value),
            "read_user_failed" => Stats::set(&stats.kernel_read_user_failed, value),
            "non_socket_fds" => Stats::set(&stats.kernel_non_socket_fds, value),
            "unconfirmed_events" => Stats::set(&stats.kernel_unconfirmed_events, value),
            "peeks_skipped" => Stats::set(&stats.kernel_peeks_skipped, value),
            "continuation_events" => Stats::set(&stats.kernel_continuation_events, value),
            "kernel_read_failed" => Stats::set(&stats.kernel_read_failed, value),
            "lookahead_held" => Stats::set(&stats.kernel_lookahead_held, value),
            "implicit_closes" => Stats::set(&stats.kernel_implicit_closes, value),
            "h2_walk_missed" => Stats::set(&stats.kernel_h2_walk_missed, value),
            "conn_table_full" | "args_table_full" => table_full += value,
            "ringbuf_full" => {
                let before = stats
                    .kernel_ringbuf_full
                    .swap(value, std::sync::atomic::Ordering::Relaxed);
                if value > before {
                    warn!(
                        lost = value - before,
                        total = value,
                        "ring buffer full: events were lost; raise --ringbuf-mib or lower --poll-interval-ms"
                    );
                }
            }
            _ => {}
        }
    }
    Stats::set(&stats.kernel_table_full, table_full);
}

fn log_stats(stats: &Stats, what: &str) {
    let all: Vec<String> = stats.snapshot().iter().map(|(k, v)| format!("{k}={v}")).collect();
    info!(counters = %all.join(" "), "{what}");
}

/// Whether a channel-fed stage has input waiting (a stage that sleeps on
/// its channel is only stalled if something is queued for it). Holds a
/// weak sender so the channel still closes on shutdown.
fn pending(tx: &mpsc::Sender<SpanBatch>) -> crate::health::Pending {
    let weak = tx.downgrade();
    Box::new(move || weak.upgrade().is_some_and(|tx| tx.capacity() < tx.max_capacity()))
}

/// Logs when the stages' health changes (what `/healthz` then reports).
struct Supervisor {
    health: Health,
    tick: time::Interval,
    last: Vec<String>,
}

impl Supervisor {
    fn new(health: Health) -> Self {
        Self {
            health,
            tick: time::interval(Duration::from_secs(1)),
            last: Vec::new(),
        }
    }

    fn check(&mut self) {
        let now = self.health.problems();
        if now == self.last {
            return;
        }
        if now.is_empty() {
            info!("all stages healthy again");
        } else {
            error!(problems = %now.join("; "), "a pipeline stage failed: /healthz reports unhealthy");
        }
        self.last = now;
    }
}

/// An address a browser on this machine can open (0.0.0.0 → 127.0.0.1).
fn browsable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => (std::net::Ipv4Addr::LOCALHOST, addr.port()).into(),
        ip if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}
