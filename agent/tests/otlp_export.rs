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
