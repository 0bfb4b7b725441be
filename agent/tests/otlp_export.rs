//! OTLP export of real kernel-captured traffic to an in-test receiver built
//! on the official protobufs; Prometheus metrics scraped and parsed.
mod support;

use std::{process::Command, time::Duration};

use support::{otlp::*, *};

/// Starts `python3 -m http.server` in pod b.
fn python_server(pods: &PodPair, port: u16) -> Proc {
    let mut server = PodPair::cmd(&pods.b, "python3");
    server
        .args(["-m", "http.server", &port.to_string(), "--bind", &pods.ip_b])
        .current_dir("/etc");
    let p = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    p
}

fn curl(pods: &PodPair, url: &str, headers: &[&str]) {
    let mut c = PodPair::cmd(&pods.a, "curl");
    c.args(["-s", "-o", "/dev/null"]);
    for h in headers {
        c.args(["-H", h]);
    }
    c.arg(url);
    run(c);
}

fn to_port(port: u16) -> impl Fn(&Received) -> bool {
    move |s| s.attr("server.port").as_deref() == Some(port.to_string().as_str())
}

/// `--otlp-protocol` for a receiver's transport.
fn protocol(transport: Transport) -> &'static str {
    if transport == Transport::Grpc {
        "grpc"
    } else {
        "http/protobuf"
    }
}

fn export_round_trip(transport: Transport) {
    let _serial = serial();
    let receiver = Receiver::start(transport);
    let pods = PodPair::new();
    let protocol = protocol(transport);
    let _agent = Agent::start_with(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--otlp-protocol",
        protocol,
        "--metric-export-interval-ms",
        "500",
        "--resource-attributes",
        "deployment.environment.name=test",
    ]);
    let port = 8301;
    let _server = python_server(&pods, port);
    let url = format!("http://{}:{port}/hostname?user=42", pods.ip_b);
    curl(&pods, &url, &["User-Agent: otlp-test/1.0"]);
    let spans = receiver.wait_spans(to_port(port), 2, Duration::from_secs(15));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans.iter().find(|s| s.span.kind == 2).expect("SERVER span (kind 2)");
    let client = spans.iter().find(|s| s.span.kind == 3).expect("CLIENT span (kind 3)");
    assert_eq!(server.trace_id(), client.trace_id());
    assert_eq!(server.parent_span_id(), client.span_id());
    assert!(client.span.parent_span_id.is_empty());
    for s in [server, client] {
        assert_eq!(s.span.name, "GET /hostname");
        assert_eq!(s.attr("http.request.method").as_deref(), Some("GET"));
        assert_eq!(s.attr("url.path").as_deref(), Some("/hostname"));
        assert_eq!(s.attr("url.scheme").as_deref(), Some("http"));
        assert_eq!(s.attr("url.query"), None, "query strings are dropped by default");
        assert_eq!(s.attr("http.response.status_code").as_deref(), Some("200"));
        assert_eq!(s.attr("server.address"), Some(pods.ip_b.clone()));
        assert_eq!(s.attr("client.address"), Some(pods.ip_a.clone()));
        assert_eq!(s.attr("network.protocol.version").as_deref(), Some("1.1"));
        assert_eq!(s.attr("user_agent.original").as_deref(), Some("otlp-test/1.0"));
        assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
        assert!(s.span.start_time_unix_nano > 1_700_000_000_000_000_000);
        assert_eq!(
            s.resource.get("deployment.environment.name").map(String::as_str),
            Some("test")
        );
        assert_eq!(
            s.resource.get("telemetry.sdk.language").map(String::as_str),
            Some("rust")
        );
        assert!(s.resource.contains_key("host.name"));
    }
    assert_eq!(server.resource.get("service.name").map(String::as_str), Some("python3"));
    assert_eq!(client.resource.get("service.name").map(String::as_str), Some("curl"));
    assert_ne!(server.resource.get("process.pid"), client.resource.get("process.pid"));

    // RED metrics over OTLP.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let names = loop {
        let names: Vec<String> = receiver
            .metric_requests()
            .iter()
            .flat_map(|r| r.resource_metrics.iter())
            .flat_map(|rm| rm.scope_metrics.iter())
            .flat_map(|sm| sm.metrics.iter().map(|m| m.name.clone()))
            .collect();
        if names.iter().any(|n| n == "http.client.request.duration") || std::time::Instant::now() > deadline {
            break names;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(names.iter().any(|n| n == "http.server.request.duration"), "{names:?}");
    assert!(names.iter().any(|n| n == "http.client.request.duration"), "{names:?}");
}

#[test]
fn grpc_export_carries_kernel_spans_with_their_workload_resource_and_parent_ids() {
    export_round_trip(Transport::Grpc);
}

#[test]
fn http_protobuf_export_carries_the_same_spans() {
    export_round_trip(Transport::Http);
}

/// The collector here is this test process, which the agent traces (it
/// watches the whole machine): every export request the agent sends is
/// also an HTTP request into a traced process. Exported as a span, it
/// would be exported again, for ever, one more request per batch.
fn own_exports_do_not_come_back_as_spans(transport: Transport, export_path: &str) {
    let _serial = serial();
    let receiver = Receiver::start(transport);
    let pods = PodPair::new();
    let protocol = protocol(transport);
    let agent = Agent::start_with(&["--otlp-endpoint", &receiver.endpoint(), "--otlp-protocol", protocol]);
    let port = 8305;
    let _server = python_server(&pods, port);
    for i in 0..3 {
        curl(&pods, &format!("http://{}:{port}/round-{i}", pods.ip_b), &[]);
        // Several export requests, each a chance to feed back.
        receiver.wait_spans(to_port(port), 2 * (i + 1), Duration::from_secs(15));
    }
    // Long enough for spans of the last export requests to be exported.
    std::thread::sleep(Duration::from_secs(3));
    let own: Vec<_> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.attr("url.path").is_some_and(|p| p == export_path))
        .collect();
    assert!(own.is_empty(), "the agent's own export requests came back: {own:#?}");
    assert_eq!(receiver.spans().iter().filter(|s| to_port(port)(s)).count(), 6);
    // The collector's side of those requests was seen and set aside (so
    // the check above is not vacuous: the receiver is traced).
    let seen = metric_sum(&scrape(&agent), "meshless_spans_own_exports_total", &[]);
    assert!(seen >= 1.0, "the collector's side of the exports was not seen: {seen}");
}

#[test]
fn the_agents_own_grpc_export_requests_are_not_traced_back_to_the_collector() {
    own_exports_do_not_come_back_as_spans(
        Transport::Grpc,
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
}

#[test]
fn the_agents_own_http_export_requests_are_not_traced_back_to_the_collector() {
    own_exports_do_not_come_back_as_spans(Transport::Http, "/v1/traces");
}

#[test]
fn authorization_and_cookie_values_never_leave_the_node() {
    let _serial = serial();
    let receiver = Receiver::start(Transport::Grpc);
    let pods = PodPair::new();
    let agent = Agent::start_with(&[
        "--traces-exporter",
        "console,otlp",
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--capture-request-headers",
        "authorization,cookie,x-tenant",
        "--capture-response-headers",
        "set-cookie,content-type",
    ]);
    let port = 8302;
    let _server = python_server(&pods, port);
    let url = format!("http://{}:{port}/hostname", pods.ip_b);
    curl(
        &pods,
        &url,
        &[
            "Authorization: Bearer s3cr3t-t0ken",
            "Cookie: session=c00kie-value",
            "X-Tenant: acme",
        ],
    );
    let spans = receiver.wait_spans(to_port(port), 2, Duration::from_secs(15));
    assert_eq!(spans.len(), 2);
    for s in &spans {
        assert_eq!(s.attr("http.request.header.authorization").as_deref(), Some("REDACTED"));
        assert_eq!(s.attr("http.request.header.cookie").as_deref(), Some("REDACTED"));
        assert_eq!(s.attr("http.request.header.x-tenant").as_deref(), Some("acme"));
        assert!(s.attr("http.response.header.content-type").is_some());
    }
    let console = agent.collect(to_server(&pods.ip_b, port), 2, Duration::from_secs(5));
    assert_eq!(console.len(), 2);
    let everything: Vec<u8> = receiver.raw().concat();
    let console_text = serde_json::to_string(&console).expect("json");
    for secret in ["s3cr3t-t0ken", "c00kie-value"] {
        assert!(
            !everything.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} leaked over OTLP"
        );
        assert!(!console_text.contains(secret), "{secret} leaked on the console");
    }
}

#[test]
fn export_resumes_when_the_collector_comes_back_and_drops_are_counted() {
    let _serial = serial();
    let mut receiver = Receiver::start(Transport::Grpc);
    receiver.pause();
    let pods = PodPair::new();
    let agent = Agent::start_with(&["--otlp-endpoint", &receiver.endpoint(), "--otlp-timeout-ms", "1000"]);
    let port = 8303;
    let _server = python_server(&pods, port);
    for i in 0..5 {
        curl(&pods, &format!("http://{}:{port}/down-{i}", pods.ip_b), &[]);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = scrape(&agent);
        if metric_sum(&m, "meshless_otlp_spans_dropped_total", &[]) >= 10.0 {
            assert!(metric_sum(&m, "meshless_otlp_export_errors_total", &[]) >= 1.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drops while the collector is down must be counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    receiver.resume();
    for i in 0..3 {
        curl(&pods, &format!("http://{}:{port}/up-{i}", pods.ip_b), &[]);
    }
    let back = receiver.wait_spans(
        |s| s.attr("url.path").is_some_and(|p| p.starts_with("/up-")),
        6,
        Duration::from_secs(20),
    );
    assert_eq!(back.len(), 6, "export resumed after the collector came back");
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn metrics_count_every_request_even_when_sampling_drops_the_spans() {
    let _serial = serial();
    let receiver = Receiver::start(Transport::Grpc);
    let pods = PodPair::new();
    let agent = Agent::start_with(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--sampler",
        "parentbased_traceidratio",
        "--sampler-arg",
        "0",
    ]);
    let port = 8304;
    let _server = python_server(&pods, port);
    let n = 7;
    for i in 0..n {
        curl(&pods, &format!("http://{}:{port}/m{i}", pods.ip_b), &[]);
    }
    // A sampled incoming trace is still exported (parent-based).
    let tp = "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    curl(&pods, &format!("http://{}:{port}/sampled", pods.ip_b), &[tp]);
    let kept = receiver.wait_spans(to_port(port), 1, Duration::from_secs(10));
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert_eq!(kept[0].attr("url.path").as_deref(), Some("/sampled"));
    assert_eq!(kept[0].span.kind, 2);
    assert_eq!(kept[0].trace_id(), "0af7651916cd43dd8448eb211c80319c");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let total = (n + 1) as f64;
    loop {
        let m = scrape(&agent);
        let istio_dest = metric_sum(
            &m,
            "istio_requests_total",
            &[("reporter", "destination"), ("destination_workload", "python3")],
        );
        let istio_src = metric_sum(
            &m,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "curl"),
                ("destination_workload", "python3"),
            ],
        );
        let semconv = metric_sum(
            &m,
            "http_server_request_duration_seconds_count",
            &[("service_name", "python3")],
        );
        let istio_hist = metric_sum(
            &m,
            "istio_request_duration_milliseconds_count",
            &[("reporter", "destination"), ("destination_workload", "python3")],
        );
        if istio_dest >= total && istio_src >= total && semconv >= total {
            assert_eq!(
                (istio_dest, istio_src, semconv, istio_hist),
                (total, total, total, total)
            );
            let by_source = metric_sum(
                &m,
                "istio_requests_total",
                &[("reporter", "destination"), ("source_workload", "curl")],
            );
            assert_eq!(
                by_source,
                total,
                "{:#?}",
                m.samples
                    .iter()
                    .filter(|s| s.metric == "istio_requests_total")
                    .collect::<Vec<_>>()
            );
            assert!(metric_sum(&m, "meshless_spans_sampled_out_total", &[]) >= (2 * n) as f64);
            assert!(metric_sum(&m, "meshless_events_read_total", &[]) > 0.0);
            assert_eq!(
                metric_sum(&m, "meshless_kernel_ringbuf_size_bytes", &[]),
                8.0 * 1024.0 * 1024.0
            );
            assert!(
                m.samples
                    .iter()
                    .any(|s| s.metric == "meshless_kernel_ringbuf_used_bytes"),
                "ring-buffer usage exposed"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics: dest={istio_dest} src={istio_src} semconv={semconv}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let health = http_get(agent.metrics_addr.as_deref().expect("metrics"), "/healthz");
    assert_eq!(health.trim(), "ok");
}

#[test]
fn a_malformed_endpoint_or_sampler_fails_at_start_naming_the_setting() {
    for (args, needle) in [
        (vec!["--otlp-endpoint", "collector:4317"], "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            vec!["--traces-exporter", "otlp", "--otlp-protocol", "carrier-pigeon"],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            vec!["--sampler", "traceidratio", "--sampler-arg", "two"],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_meshless"))
            .args(&args)
            .output()
            .expect("run agent");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshless"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://nope")
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("OTEL_EXPORTER_OTLP_ENDPOINT"));
}

// --- The export stage driven directly with synthetic spans (no kernel). ---

mod direct {
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

    use super::support::otlp::*;

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
        super::support::pki::ca_and_server_cert(dir, "DNS:localhost,IP:127.0.0.1");
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
}
