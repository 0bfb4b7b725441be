//! The OTLP export stage driven directly with synthetic spans (no kernel
//! capture) against the in-test receiver built on the official protobufs:
//! retries, a collector that stays down (counted drops, bounded memory),
//! stopping with spans queued, requests split under the gRPC size limit,
//! and TLS trust.
mod support;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use meshless::{
    budget::{self, Charged, Reason, Share},
    config::otel::{OtlpTarget, Protocol},
    export::{
        otlp::{self, OtlpTraces},
        resource::Resources,
    },
    health::Health,
    span::{Process, Span, SpanKind},
    stats::Stats,
    trace_context::{SpanId, TraceId},
};

use support::otlp::*;

/// A server span whose path carries its number, with `header_bytes`
/// of allow-listed header values to make it as large as wanted.
pub fn span(i: usize, header_bytes: usize) -> Span {
    let headers = (0..header_bytes.div_ceil(2048))
        .map(|h| (format!("x-big-{h}"), "b".repeat(2048.min(header_bytes - h * 2048))))
        .collect();
    Span {
        trace_id: TraceId::random(),
        span_id: SpanId::random(),
        parent_span_id: None,
        sampled: true,
        parent_is_remote: false,
        trace_state: None,
        kind: SpanKind::Server,
        start_unix_nano: 1_800_000_000_000_000_000,
        end_unix_nano: 1_800_000_000_001_000_000,
        method: "GET".into(),
        request: meshless::span::RequestText::new(&format!("/direct/{i}"), None),
        status_code: Some(200),
        protocol_version: "1.1",
        tls: false,
        rpc: None,
        client: Some("127.0.0.1:40000".parse().expect("addr")),
        server: Some("127.0.0.1:8080".parse().expect("addr")),
        process: Process {
            pid: 4242,
            tid: 4242,
            name: "direct-test".into(),
            executable: "direct-test".into(),
            thread: Default::default(),
            cgroup_id: 1,
        },
        peer_comm: None,
        peer_process: None,
        resolved_server: None,
        k8s: None,
        peer_k8s: None,
        request_headers: headers,
        response_headers: Vec::new(),
        truncated: false,
        unanswered: None,
    }
}

/// Runs the OTLP stage against `receiver` until every batch is sent and
/// the stage has flushed; returns how long that took.
pub fn export(
    receiver: &Receiver,
    transport: Transport,
    timeout: Duration,
    stats: &Arc<Stats>,
    batches: Vec<Vec<Span>>,
) -> Duration {
    export_trusting(receiver, transport, None, timeout, stats, batches)
}

/// [`export`], trusting the collector's certificate if signed by `ca_file`.
pub fn export_trusting(
    receiver: &Receiver,
    transport: Transport,
    ca_file: Option<std::path::PathBuf>,
    timeout: Duration,
    stats: &Arc<Stats>,
    batches: Vec<Vec<Span>>,
) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    let health = Health::default();
    rt.block_on(async {
        let (protocol, endpoint) = match transport {
            Transport::Grpc => (Protocol::Grpc, receiver.endpoint()),
            Transport::Http => (Protocol::HttpProtobuf, format!("{}/v1/traces", receiver.endpoint())),
        };
        let target = OtlpTarget {
            endpoint,
            protocol,
            headers: Vec::new(),
            timeout,
            insecure: false,
            ca_file,
        };
        let exporter = otlp::build_span_exporter(&target).expect("exporter");
        let resources = Resources::new(Vec::new(), HashMap::new(), None);
        let stage = OtlpTraces::new(
            exporter,
            target.endpoint.clone(),
            resources,
            false,
            16_384,
            stats.clone(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let run = tokio::spawn(stage.run(rx, health.stage("export-otlp")));
        for batch in batches {
            let bytes = batch.iter().map(budget::span_bytes).sum();
            match stats.budget.charge(Share::Spans, bytes) {
                Some(charge) => tx.send(Charged::new(vec![batch], charge)).await.expect("stage alive"),
                None => stats.budget.shed(Reason::SpanBudget, batch.len() as u64),
            }
        }
        drop(tx);
        run.await.expect("stage ran");
    });
    assert!(health.problems().is_empty(), "{:?}", health.problems());
    started.elapsed()
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn retries_until_the_collector_accepts(transport: Transport) {
    let receiver = Receiver::start(transport);
    receiver.refuse_next(2);
    let stats = Arc::new(Stats::default());
    let spans: Vec<Span> = (0..10).map(|i| span(i, 0)).collect();
    export(&receiver, transport, Duration::from_secs(10), &stats, vec![spans]);
    assert_eq!(receiver.refused(), 2);
    let got = receiver.wait_spans(
        |s| s.attr("url.path").is_some_and(|p| p.starts_with("/direct/")),
        10,
        Duration::from_secs(5),
    );
    assert_eq!(got.len(), 10);
    assert_eq!(load(&stats.otlp_spans_exported), 10);
    assert_eq!(load(&stats.otlp_spans_dropped), 0);
    assert_eq!(stats.budget.used(Share::Export), 0, "bytes given back");
}

#[test]
fn grpc_unavailable_twice_is_retried_and_the_spans_arrive() {
    retries_until_the_collector_accepts(Transport::Grpc);
}

#[test]
fn http_503_twice_is_retried_and_the_spans_arrive() {
    retries_until_the_collector_accepts(Transport::Http);
}

#[test]
fn a_collector_down_past_the_retry_budget_costs_counted_drops_and_bounded_memory() {
    let mut receiver = Receiver::start(Transport::Grpc);
    receiver.pause();
    let stats = Arc::new(Stats::default());
    stats.budget.set_limit(2 << 20);
    let cap = stats.budget.limit_of(Share::Export);
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stats, peak, done) = (stats.clone(), peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(stats.budget.used(Share::Export), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let n = 2000;
    let batches = (0..n / 50)
        .map(|b| (0..50).map(|i| span(b * 50 + i, 2048)).collect())
        .collect();
    let took = export(&receiver, Transport::Grpc, Duration::from_millis(500), &stats, batches);
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let shed_or_failed = stats.budget.dropped(Reason::ExportFailed)
        + stats.budget.dropped(Reason::ExportShutdown)
        + stats.budget.dropped(Reason::ExportBudget)
        + stats.budget.dropped(Reason::SpanBudget);
    assert_eq!(shed_or_failed, n as u64, "every span is accounted for");
    assert!(
        stats.budget.dropped(Reason::ExportFailed) > 0,
        "retries ran out and were counted"
    );
    assert!(
        stats.budget.dropped(Reason::ExportBudget) + stats.budget.dropped(Reason::SpanBudget) > 0,
        "the queues shed at their shares"
    );
    assert_eq!(load(&stats.otlp_spans_exported), 0);
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak > 0 && peak <= cap, "export queue peaked at {peak} of {cap} bytes");
    assert_eq!(stats.budget.used(Share::Export), 0);
    assert!(took < Duration::from_secs(30), "gave up in bounded time: {took:?}");
}

#[test]
fn stopping_with_the_collector_down_drops_what_is_queued_at_once_counted() {
    let mut receiver = Receiver::start(Transport::Grpc);
    receiver.pause();
    let stats = Arc::new(Stats::default());
    let n = 6000;
    let batches = (0..n / 500)
        .map(|b| (0..500).map(|i| span(b * 500 + i, 2048)).collect())
        .collect();
    // The input closes while the first request is still being retried:
    // without a final-flush rule each queued request would then wait
    // out its own retries (about five more of these two seconds).
    let timeout = Duration::from_secs(2);
    let took = export(&receiver, Transport::Grpc, timeout, &stats, batches);
    let at_stop = stats.budget.dropped(Reason::ExportShutdown);
    let accounted = stats.budget.dropped(Reason::ExportFailed)
        + at_stop
        + stats.budget.dropped(Reason::ExportBudget)
        + stats.budget.dropped(Reason::SpanBudget);
    assert_eq!(accounted, n as u64, "every span is accounted for");
    assert!(at_stop > 0, "the queue left at the stop was dropped, counted");
    assert_eq!(
        load(&stats.otlp_export_errors),
        1,
        "one request failed, no other was tried"
    );
    assert_eq!(load(&stats.otlp_spans_exported), 0);
    assert_eq!(stats.budget.used(Share::Export), 0, "bytes given back");
    assert!(took < 3 * timeout, "stopped in {took:?}");
}

#[test]
fn large_batches_are_split_into_requests_under_the_4_mib_grpc_limit() {
    let receiver = Receiver::start(Transport::Grpc);
    let stats = Arc::new(Stats::default());
    // 256 spans of ~32 KiB: 8 MiB in one flush, twice what a gRPC
    // server accepts per request by default.
    let spans: Vec<Span> = (0..256).map(|i| span(i, 32 * 1024)).collect();
    export(&receiver, Transport::Grpc, Duration::from_secs(10), &stats, vec![spans]);
    let got = receiver.wait_spans(
        |s| s.attr("url.path").is_some_and(|p| p.starts_with("/direct/")),
        256,
        Duration::from_secs(5),
    );
    assert_eq!(got.len(), 256, "dropped: {}", load(&stats.otlp_spans_dropped));
    let raw = receiver.raw();
    let total: usize = raw.iter().map(Vec::len).sum();
    assert!(
        total > 4 << 20,
        "the spans needed more than one request ({total} bytes)"
    );
    for r in &raw {
        assert!(r.len() < 4 << 20, "a request of {} bytes", r.len());
    }
}

/// A CA (its PEM file) and a `localhost` certificate it signed, with
/// its key (PEM), made in `dir`.
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(dir).expect("certificate dir");
    support::pki::ca_and_server_cert(dir, "DNS:localhost,IP:127.0.0.1");
    let read = |f: &str| std::fs::read(dir.join(f)).expect("read PEM");
    (dir.join("ca.crt"), read("server.crt"), read("server.key"))
}

/// gRPC export over TLS, through the exporter's own connector (writes
/// gathered under TLS): every span arrives when the collector's
/// certificate is signed by `--otlp-certificate`'s CA, none when not.
#[test]
fn grpc_over_tls_trusts_the_given_ca_and_no_other() {
    let dir = std::env::temp_dir().join(format!("meshless-otlp-tls-{}", std::process::id()));
    let (ca, cert, key) = certificates(&dir.join("good"));
    let (other_ca, _, _) = certificates(&dir.join("other"));
    let receiver = Receiver::start_tls(cert, key);
    assert!(receiver.endpoint().starts_with("https://localhost:"));
    let is_direct = |s: &Received| s.attr("url.path").is_some_and(|p| p.starts_with("/direct/"));

    let untrusted = Arc::new(Stats::default());
    // 100 spans of 4 KiB: each request is many HTTP/2 frames.
    let spans: Vec<Span> = (0..100).map(|i| span(i, 4096)).collect();
    export_trusting(
        &receiver,
        Transport::Grpc,
        Some(other_ca),
        Duration::from_secs(2),
        &untrusted,
        vec![spans],
    );
    assert_eq!(receiver.spans().len(), 0, "a collector the CA did not sign got spans");
    assert_eq!(load(&untrusted.otlp_spans_dropped), 100, "what was not sent is counted");

    let stats = Arc::new(Stats::default());
    let batches: Vec<Vec<Span>> = (0..3)
        .map(|b| (0..100).map(|i| span(b * 100 + i, 4096)).collect())
        .collect();
    export_trusting(
        &receiver,
        Transport::Grpc,
        Some(ca),
        Duration::from_secs(10),
        &stats,
        batches,
    );
    let got = receiver.wait_spans(is_direct, 300, Duration::from_secs(5));
    assert_eq!(got.len(), 300, "dropped: {}", load(&stats.otlp_spans_dropped));
    let mut paths: Vec<String> = got.iter().filter_map(|s| s.attr("url.path")).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), 300, "every span once");
    let _ = std::fs::remove_dir_all(&dir);
}
