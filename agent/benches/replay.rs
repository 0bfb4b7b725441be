//! Replay benchmark of the userspace pipeline: a recording of real
//! ring-buffer records (`meshless --record FILE`) is pushed through
//! decode → correlate → route (metrics, sampling) → OTLP protobuf encoding
//! on this one thread, the encoded bytes discarded. Reports requests per
//! second of this thread's CPU time and heap allocations per request
//! (a counting global allocator).
//!
//! `cargo bench -p meshless --bench replay [-- FILE [SECONDS]]`
//! (default: the checked-in nginx recording, 3 s of replays).
use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use meshless::{
    capture::{record, Arena, Event},
    correlate::{Correlator, Limits},
    export::{attributes::Options, encode::Encoder, resource::Resources, sampler::Sampler},
    k8s::{
        index::{Index, NamespaceFilter, Update},
        quiet::QuietPods,
        IstioLabels, PodMeta, SliceMeta, WorkloadKind,
    },
    pipeline::{Pipeline, Router, Sink},
    privacy::HeaderPolicy,
    span::{Span, SpanKind},
    stats::Stats,
};

/// Counts heap allocations (alloc and realloc calls) of the whole process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEFAULT_RECORDING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/nginx-h1.mlrec");
/// Events handed to the pipeline at once (the agent drains ~200 per
/// 10 ms poll at 5k requests/s).
const BATCH: usize = 256;
/// Event time between ticks, as the agent's 50 ms timer.
const TICK_NS: u64 = 50_000_000;

/// Encodes every batch as the OTLP exporter does, then drops the bytes.
struct Encode {
    encoder: Encoder,
    spans: Arc<AtomicU64>,
    servers: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Sink for Encode {
    fn send(&mut self, spans: Vec<Span>) {
        self.spans.fetch_add(spans.len() as u64, Relaxed);
        let servers = spans.iter().filter(|s| s.kind == SpanKind::Server).count();
        self.servers.fetch_add(servers as u64, Relaxed);
        let bytes = self.encoder.encode_discard(&spans);
        self.bytes.fetch_add(bytes as u64, Relaxed);
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Counters {
    spans: Arc<AtomicU64>,
    servers: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

fn pipeline() -> (Pipeline, Counters, Arc<Stats>) {
    let stats = Arc::new(Stats::default());
    // No /proc or live sockets behind a replay: processes are named from
    // the kernel's comm, and every address comes from the records.
    let correlator = Correlator::with_host(
        Limits::default(),
        HeaderPolicy::new(&[], &[], &[]),
        stats.clone(),
        |_| None,
        |_, _, _| None,
    );
    let names = Resources::new(Vec::new(), Default::default(), None);
    let mut router = Router::plain(Sampler::AlwaysOn, names, stats.clone());
    let c = Counters {
        spans: Arc::default(),
        servers: Arc::default(),
        bytes: Arc::default(),
    };
    router.sinks.push(Box::new(Encode {
        encoder: Encoder::new(Resources::new(Vec::new(), Default::default(), None), Options::default()),
        spans: c.spans.clone(),
        servers: c.servers.clone(),
        bytes: c.bytes.clone(),
    }));
    (Pipeline::new(correlator, router), c, stats)
}

/// `--k8s`: every process of the recording in a pod of its own (one
/// container each), and the loopback address a pod behind a Service, so
/// that each span is enriched as on a node: own pod and container, the
/// peer's pod, workload, Istio labels and Service.
fn kubernetes(cgroups: &std::collections::BTreeSet<u64>) -> Index {
    let (_updates, rx) = tokio::sync::mpsc::channel(1);
    let mut ix = Index::new(rx, NamespaceFilter::default(), QuietPods::default());
    let loopback: std::net::IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
    for (n, cgroup) in cgroups.iter().enumerate() {
        let uid = format!("pod-{n}");
        let container = format!("{:064x}", n + 1);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("app".to_owned(), format!("web{n}"));
        labels.insert("version".to_owned(), "v1".to_owned());
        ix.apply(Update::Pod(PodMeta {
            uid: uid.clone(),
            name: format!("web{n}-5d4f8b7c9-x7k2p"),
            namespace: "shop".into(),
            node: "node-a".into(),
            ips: if n == 0 { vec![loopback] } else { vec![] },
            app_label: Some(format!("web{n}")),
            workload: Some((WorkloadKind::Deployment, format!("web{n}"))),
            containers: vec![(container.clone(), "app".into())],
            opted_out: false,
            istio: Box::new(IstioLabels::from_labels(&labels)),
        }));
        ix.assume_cgroup(*cgroup, &uid, Some(&container));
    }
    ix.apply(Update::Slice(SliceMeta {
        name: "web0-abc".into(),
        namespace: "shop".into(),
        service: Some("web0".into()),
        endpoints: vec![(loopback, Some("web0-5d4f8b7c9-x7k2p".into()))],
    }));
    ix
}

/// One pass over the recording, shifted to round `round` (new connection
/// generations, later kernel times) so that passes follow each other like
/// new traffic.
fn replay(p: &mut Pipeline, arena: &mut Arena, records: &[&[u8]], round: u64, span_ns: u64, next_tick: &mut u64) {
    let shift = round * span_ns;
    let mut batch: Vec<Event> = Vec::with_capacity(BATCH);
    for chunk in records.chunks(BATCH) {
        for r in chunk {
            // Payloads are copied as the capture task copies them.
            let Ok(mut ev) = Event::decode_in(r, arena) else {
                continue;
            };
            ev.ktime_ns += shift;
            ev.conn.conn_id += round << 40;
            batch.push(ev);
        }
        let last = batch.last().map_or(0, |e| e.ktime_ns);
        p.events(batch.drain(..));
        if last >= *next_tick {
            p.tick(last);
            *next_tick = last + TICK_NS;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let path = args.first().map_or(DEFAULT_RECORDING, String::as_str);
    let seconds: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let records = record::records(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
    let times: Vec<u64> = records
        .iter()
        .filter_map(|r| Event::decode(r).ok())
        .map(|e| e.ktime_ns)
        .collect();
    let first = times.iter().min().copied().unwrap_or(0);
    let last = times.iter().max().copied().unwrap_or(0);
    // Each pass starts a second after the previous one ended: idle
    // connections and link waits of a pass are settled by the next.
    let span_ns = last - first + 1_000_000_000;

    let (mut p, c, stats) = pipeline();
    if std::env::args().any(|a| a == "--k8s") {
        let cgroups: std::collections::BTreeSet<u64> = records
            .iter()
            .filter_map(|r| Event::decode(r).ok())
            .map(|e| e.cgroup_id)
            .collect();
        p.router.k8s = Some(kubernetes(&cgroups));
    }
    let mut next_tick = 0;
    let mut arena = Arena::default();
    // Warm-up pass: tables and buffers reach their steady size.
    replay(&mut p, &mut arena, &records, 1, span_ns, &mut next_tick);
    let (spans0, servers0) = (c.spans.load(Relaxed), c.servers.load(Relaxed));
    let allocs0 = ALLOCS.load(Relaxed);
    let (cpu0, wall0) = (thread_cpu(), Instant::now());
    let mut rounds = 0;
    while (thread_cpu() - cpu0).as_secs_f64() < seconds {
        rounds += 1;
        replay(&mut p, &mut arena, &records, 1 + rounds, span_ns, &mut next_tick);
    }
    let (cpu, wall) = (thread_cpu() - cpu0, wall0.elapsed());
    let allocs = ALLOCS.load(Relaxed) - allocs0;
    let spans = c.spans.load(Relaxed) - spans0;
    let requests = c.servers.load(Relaxed) - servers0;
    let events = rounds * records.len() as u64;
    let per_s = |n: u64| n as f64 / cpu.as_secs_f64();
    println!("recording        {path}: {} records", records.len());
    if p.router.k8s.is_some() {
        println!("kubernetes       every process in a pod, the peers pods behind a Service (--k8s)");
    }
    println!(
        "rounds           {rounds} ({:.2} s CPU, {:.2} s wall)",
        cpu.as_secs_f64(),
        wall.as_secs_f64()
    );
    println!("events/s/core    {:.0}", per_s(events));
    println!("spans/s/core     {:.0}", per_s(spans));
    println!(
        "requests/s/core  {:.0} (server spans; each also has a client span)",
        per_s(requests)
    );
    println!(
        "µs/request       {:.2}",
        cpu.as_secs_f64() * 1e6 / requests.max(1) as f64
    );
    println!("allocs/request   {:.1}", allocs as f64 / requests.max(1) as f64);
    println!("allocs/span      {:.1}", allocs as f64 / spans.max(1) as f64);
    println!(
        "OTLP bytes/span  {:.0}",
        c.bytes.load(Relaxed) as f64 / c.spans.load(Relaxed).max(1) as f64
    );
    let snap = stats.snapshot();
    let get = |k: &str| snap.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
    println!(
        "spans_created    {} (unanswered {}, malformed {})",
        get("spans_created"),
        get("spans_unanswered"),
        get("http_malformed")
    );
}
