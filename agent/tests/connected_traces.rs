//! Issue 9, connected traces: every hop and every service of a request in
//! one trace — in-process (a service's outbound call is a child of the
//! request it serves), across simulated nodes with one agent each, and
//! through DNATed Service IPs — without the apps forwarding anything.
//! Ground truth comes from the request ids the fixtures carry along.
mod support;

use std::time::Duration;

use support::{chain::*, nodes::*, otlp, spans::*, *};

const REQUESTS: usize = 20;

/// Runs the chain with `placement` under one agent per node (scoped with
/// `--cgroup` when there are several) and checks the trace shape.
fn chain_gives_one_trace_of_six_linked_spans_per_request(nodes: usize, placement: Placement) {
    let _serial = serial();
    let mut cluster = Cluster::new(nodes);
    let receiver;
    let agents: Vec<Agent>;
    let source: &dyn SpanSource;
    if nodes == 1 {
        agents = vec![Agent::start()];
        source = &agents[0];
    } else {
        receiver = otlp::Receiver::start(otlp::Transport::Grpc);
        // One agent per node, started side by side (loading takes a while).
        let args: Vec<Vec<String>> = (0..nodes)
            .map(|n| {
                // Node a names its cgroup absolutely, node b relative to the
                // cgroup2 mount: `--cgroup` takes both.
                let cgroup = if n == 0 {
                    cluster.node_cgroup(n).display().to_string()
                } else {
                    cluster.node_cgroup_relative(n)
                };
                ["--cgroup", &cgroup, "--traces-exporter", "otlp"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(["--otlp-endpoint".to_owned(), receiver.endpoint()])
                    .chain(["--metrics-exporter".to_owned(), "none".to_owned()])
                    .collect()
            })
            .collect();
        agents = std::thread::scope(|scope| {
            let started: Vec<_> = args
                .iter()
                .map(|a| scope.spawn(move || Agent::start_with(&a.iter().map(String::as_str).collect::<Vec<_>>())))
                .collect();
            started
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        source = &receiver;
    }
    let chain = Chain::start(&mut cluster, &placement);
    chain.send(REQUESTS, &[]);
    let spans = gather(source, chain.filter(), 6 * REQUESTS, Duration::from_secs(20));
    assert_unique_span_ids(&spans);
    if let Err(report) = chain.check(&spans, REQUESTS) {
        let logs: Vec<String> = agents
            .iter()
            .flat_map(|a| a.stderr())
            .filter(|l| !l.contains(" INFO "))
            .collect();
        panic!("curl → python → go → java, {REQUESTS} requests:\n{report}\nagent warnings: {logs:#?}");
    }
    if placement.service_ips {
        let dialled: Vec<&SpanView> = spans
            .iter()
            .filter(|s| s.is_client() && !chain.hops.iter().any(|h| s.server() == h.dialled))
            .collect();
        assert!(
            dialled.is_empty(),
            "CLIENT spans keep server.address = the Service IP the client dialled: {dialled:#?}"
        );
        if nodes == 1 {
            // Both ends on this node: the client span also says which pod
            // the Service IP led to.
            let unresolved: Vec<&SpanView> = spans
                .iter()
                .filter(|s| s.is_client())
                .filter(|s| {
                    let hop = chain.hops.iter().find(|h| s.server() == h.dialled);
                    let real = format!(
                        "{}:{}",
                        s.attr("meshless.server.resolved.address"),
                        s.attr("meshless.server.resolved.port")
                    );
                    hop.is_some_and(|h| h.dialled != h.pod_addr && real != h.pod_addr)
                })
                .collect();
            assert!(
                unresolved.is_empty(),
                "CLIENT spans through a Service IP name the pod it reached: {unresolved:#?}"
            );
        }
    }
}

#[test]
fn chain_on_one_node_gives_twenty_traces_of_six_linked_spans() {
    chain_gives_one_trace_of_six_linked_spans_per_request(
        1,
        Placement {
            nodes: [0; 4],
            service_ips: false,
        },
    );
}

#[test]
fn chain_through_dnated_service_ips_gives_twenty_traces_of_six_linked_spans() {
    chain_gives_one_trace_of_six_linked_spans_per_request(
        1,
        Placement {
            nodes: [0; 4],
            service_ips: true,
        },
    );
}

#[test]
fn chain_across_two_nodes_with_one_scoped_agent_each_gives_twenty_traces_of_six_linked_spans() {
    // python (node a) → go (node b) → java (node a): both directions cross.
    chain_gives_one_trace_of_six_linked_spans_per_request(
        2,
        Placement {
            nodes: [0, 0, 1, 0],
            service_ips: false,
        },
    );
}

#[test]
fn chain_across_two_nodes_through_service_ips_gives_twenty_traces_of_six_linked_spans() {
    chain_gives_one_trace_of_six_linked_spans_per_request(
        2,
        Placement {
            nodes: [0, 0, 1, 0],
            service_ips: true,
        },
    );
}

/// The runtimes whose in-process linking is measured: each serves
/// `/r/<id>` and calls the leaf once while serving it.
#[derive(Debug, Clone, Copy)]
enum Runtime {
    /// ThreadingHTTPServer + urllib (thread per request).
    Python,
    /// net/http + http.Get (goroutines moving between threads).
    Go,
    /// Go whose handler calls from a goroutine it spawned.
    GoSpawning,
    /// Go built with `-ldflags=-s -w` (no symbols: no uprobes).
    GoStripped,
    /// com.sun.net.httpserver on a pool + HttpURLConnection.
    Java,
    /// One event loop, downstream calls on shared keep-alive sockets.
    Node,
    /// One nginx worker (an event loop) proxying `/r/…` to the leaf.
    Nginx,
}

impl Runtime {
    fn start(self, svc: &Pod, port: u16, leaf: &Pod, leaf_port: u16) -> Proc {
        let downstream = format!("http://{}:{leaf_port}", leaf.ip);
        match self {
            Runtime::Python => python_service(svc, port, Some(&downstream)),
            Runtime::Go => go_service_on(&go_service(), svc, port, Some(&downstream)),
            Runtime::GoSpawning => {
                let (bin, addr) = (go_service(), format!("{}:{port}", svc.ip));
                spawn(svc.cmd(bin.to_str().expect("utf-8 path"), &[&addr, &downstream, "spawn"]))
            }
            Runtime::GoStripped => go_service_on(&go_service_stripped(), svc, port, Some(&downstream)),
            Runtime::Java => java_service(&java_classes(), svc, port, Some(&downstream)),
            Runtime::Node => node_keepalive_service(svc, port, &leaf.ip, leaf_port),
            Runtime::Nginx => {
                let dir = std::env::temp_dir().join(format!("meshless-nginx-{}-{port}", std::process::id()));
                safety::nginx(svc, port, &dir, &downstream)
            }
        }
    }

    /// The path of the downstream call made for inbound `/r/<id>`.
    fn outbound_path(self, id: &str) -> String {
        match self {
            Runtime::Node => format!("/d/{id}"),
            _ => format!("/r/{id}"),
        }
    }
}

/// `concurrency` keep-alive clients send `/r/<id>` to a `runtime` service
/// that calls a Go leaf for each. Returns (requests, linked, wrong parent)
/// for the service's outbound CLIENT spans, judged against the SERVER span
/// of the same id, and prints the rates.
fn linking_rates(runtime: Runtime, concurrency: usize, per_client: usize) -> Rates {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let agent = Agent::start();
    let (client, svc, leaf) = (
        cluster.pod(0, "load"),
        cluster.pod(0, "service"),
        cluster.pod(0, "leaf"),
    );
    let go = go_service();
    let _leaf = go_service_on(&go, &leaf, 8090, None);
    svc.wait_port(&leaf.ip, 8090);
    let _svc = runtime.start(&svc, 8091, &leaf, 8090);
    client.wait_port(&svc.ip, 8091);
    let script = format!(
        r#"
import http.client, threading
errors = []
def worker(t):
    try:
        c = http.client.HTTPConnection("{ip}", 8091, timeout=30)
        for j in range({per_client}):
            c.request("GET", f"/r/k{concurrency}-{{t}}-{{j}}")
            r = c.getresponse()
            r.read()
            assert r.status == 200, r.status
        c.close()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(t,)) for t in range({concurrency})]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
"#,
        ip = svc.ip
    );
    run(client.cmd("python3", &["-c", &script]));
    let n = concurrency * per_client;
    let (svc_addr, leaf_addr) = (format!("{}:8091", svc.ip), format!("{}:8090", leaf.ip));
    let mine = |s: &SpanView| s.server() == svc_addr || s.server() == leaf_addr;
    let spans = gather(&agent, mine, 4 * n, Duration::from_secs(20));
    assert_unique_span_ids(&spans);
    let find = |kind: &str, addr: &str, path: &str| {
        spans
            .iter()
            .find(|s| s.kind == kind && s.server() == addr && s.path() == path)
    };
    let (mut linked, mut wrong, mut missing, mut hop_unlinked) = (0, 0, Vec::new(), 0);
    let mut wrong_kinds = std::collections::BTreeMap::new();
    for t in 0..concurrency {
        for j in 0..per_client {
            let id = format!("k{concurrency}-{t}-{j}");
            let inbound = find("SERVER", &svc_addr, &format!("/r/{id}"));
            let outbound = find("CLIENT", &leaf_addr, &runtime.outbound_path(&id));
            let downstream = find("SERVER", &leaf_addr, &runtime.outbound_path(&id));
            let (Some(inbound), Some(outbound), Some(downstream)) = (inbound, outbound, downstream) else {
                missing.push(id);
                continue;
            };
            match Parentage::of(outbound, Some(inbound), &spans) {
                Parentage::Linked => linked += 1,
                Parentage::Root => {}
                p => {
                    wrong += 1;
                    *wrong_kinds.entry(format!("{p:?}")).or_insert(0) += 1;
                }
            }
            if !downstream.is_child_of(outbound) {
                hop_unlinked += 1;
            }
        }
    }
    if let Some(line) = agent.stderr().iter().rev().find(|l| l.contains("go linking counters")) {
        println!("{runtime:?}, {concurrency} in flight: {line}");
    }
    let pct = |x: usize| 100.0 * x as f64 / n as f64;
    println!(
        "{runtime:?} service, concurrency {concurrency}: {n} requests, linked {linked} ({:.1}%), wrong parent {wrong} ({:.1}%) {wrong_kinds:?}, unlinked {}, leaf SERVER not under its CLIENT {hop_unlinked}",
        pct(linked),
        pct(wrong),
        n - linked - wrong - missing.len()
    );
    assert!(
        missing.is_empty(),
        "requests without their {runtime:?} SERVER, {runtime:?} CLIENT and go SERVER spans: {missing:?}\n{}",
        dump(&spans)
    );
    Rates {
        n,
        linked,
        wrong,
        hop_unlinked,
        report: dump(&spans),
    }
}

/// What [`linking_rates`] measured.
struct Rates {
    n: usize,
    linked: usize,
    wrong: usize,
    /// Leaf SERVER spans not the child of the service's CLIENT span of the same id.
    hop_unlinked: usize,
    report: String,
}

impl Rates {
    /// The hop to the leaf (same node, keep-alive) links every call.
    fn assert_hop_linked(&self, runtime: Runtime) {
        assert_eq!(
            self.hop_unlinked, 0,
            "the leaf's SERVER span is the child of the {runtime:?} CLIENT span of the same id (same-node hop)\n{}",
            self.report
        );
    }
}

#[test]
fn node_keepalive_service_never_links_a_downstream_call_to_the_wrong_request_at_concurrency_1() {
    let r = linking_rates(Runtime::Node, 1, 30);
    assert_eq!(
        r.wrong, 0,
        "{} of {} downstream calls under the wrong request ({} linked right)\n{}",
        r.wrong, r.n, r.linked, r.report
    );
    r.assert_hop_linked(Runtime::Node);
}

#[test]
fn node_keepalive_service_never_links_a_downstream_call_to_the_wrong_request_at_concurrency_16() {
    let r = linking_rates(Runtime::Node, 16, 10);
    assert_eq!(
        r.wrong, 0,
        "no link is better than a wrong link: {} of {} downstream calls under the wrong request ({} linked right)\n{}",
        r.wrong, r.n, r.linked, r.report
    );
    r.assert_hop_linked(Runtime::Node);
}

/// Thread-per-request runtimes link every outbound call to the request it
/// serves, also with several requests in flight.
fn links_every_call_under_concurrency(runtime: Runtime) {
    let r = linking_rates(runtime, 8, 10);
    assert!(
        (r.linked, r.wrong) == (r.n, 0),
        "{runtime:?}: {} of {} outbound calls linked to their request, {} to a wrong one\n{}",
        r.linked,
        r.n,
        r.wrong,
        r.report
    );
    r.assert_hop_linked(runtime);
}

#[test]
fn python_threaded_service_links_every_downstream_call_to_its_request_at_concurrency_8() {
    links_every_call_under_concurrency(Runtime::Python);
}

/// Go moves goroutines between threads; meshless follows goroutines with
/// uprobes (README, "How traces connect"): the goroutine that reads a
/// request serves it, http.Transport's write loop writes the calls of the
/// goroutine that made them, and a reused goroutine forgets what it served.
fn go_links_at_least_95_percent_and_none_wrongly(runtime: Runtime, concurrency: usize) {
    let r = linking_rates(runtime, concurrency, 10);
    eprintln!(
        "{runtime:?}, {concurrency} in flight: {} of {} linked ({:.1}%), {} wrongly",
        r.linked,
        r.n,
        100.0 * r.linked as f64 / r.n as f64,
        r.wrong
    );
    assert_eq!(
        r.wrong, 0,
        "{runtime:?}, {concurrency} in flight: {} of {} outbound calls under the wrong request\n{}",
        r.wrong, r.n, r.report
    );
    assert!(
        r.linked * 100 >= r.n * 95,
        "{runtime:?}, {concurrency} in flight: only {} of {} outbound calls linked to their request\n{}",
        r.linked,
        r.n,
        r.report
    );
    r.assert_hop_linked(runtime);
}

#[test]
fn go_service_links_at_least_95_percent_of_calls_and_none_wrongly_at_concurrency_8() {
    go_links_at_least_95_percent_and_none_wrongly(Runtime::Go, 8);
}

#[test]
fn go_service_links_at_least_95_percent_of_calls_and_none_wrongly_at_concurrency_16() {
    go_links_at_least_95_percent_and_none_wrongly(Runtime::Go, 16);
}

/// A call made from a goroutine the handler started is not made by the
/// goroutine serving the request: it may stay unlinked, never misplaced.
#[test]
fn go_handler_calling_from_a_spawned_goroutine_never_links_to_a_wrong_request() {
    let r = linking_rates(Runtime::GoSpawning, 8, 10);
    eprintln!(
        "Go spawning a goroutine per call, 8 in flight: {} of {} linked, {} wrongly",
        r.linked, r.n, r.wrong
    );
    assert_eq!(
        r.wrong, 0,
        "calls from spawned goroutines: {} of {} under the wrong request\n{}",
        r.wrong, r.n, r.report
    );
}

/// Without a symbol table there are no uprobes: a stripped Go binary links
/// per process (while one request is in flight), never wrongly.
#[test]
fn stripped_go_binary_falls_back_to_per_process_linking_without_wrong_parents() {
    let r = linking_rates(Runtime::GoStripped, 8, 10);
    eprintln!(
        "stripped Go, 8 in flight: {} of {} linked ({:.1}%), {} wrongly",
        r.linked,
        r.n,
        100.0 * r.linked as f64 / r.n as f64,
        r.wrong
    );
    assert_eq!(
        r.wrong, 0,
        "stripped Go: {} of {} outbound calls under the wrong request\n{}",
        r.wrong, r.n, r.report
    );
}

/// A thread serving request A while it reads request B byte by byte (so
/// the kernel never sees B's request line start) must not link B's
/// outbound call to A; once both are answered, the next request's call
/// links again (the unseen request was counted and released).
#[test]
fn a_request_read_byte_by_byte_beside_another_never_links_its_call_to_the_other() {
    const ROUNDS: usize = 5;
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let agent = Agent::start();
    let (client, py, leaf) = (cluster.pod(0, "app"), cluster.pod(0, "python"), cluster.pod(0, "leaf"));
    let go = go_service();
    let _leaf = go_service_on(&go, &leaf, 8090, None);
    py.wait_port(&leaf.ip, 8090);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chain/interleaved.py");
    let (port, downstream, rounds) = ("8091", format!("http://{}:8090", leaf.ip), ROUNDS.to_string());
    let _py = spawn(py.cmd(
        "python3",
        &[script.to_str().expect("utf-8 path"), &py.ip, port, &downstream, &rounds],
    ));
    let url = |i: usize, side: &str| format!("http://{}:{port}/r/ilv{i}{side}", py.ip);
    // Give the server a moment to listen; A retries while it is not yet.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..ROUNDS {
        let mut a = spawn(client.cmd(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "--retry",
                "20",
                "--retry-connrefused",
                "--retry-delay",
                "1",
                &url(i, "a"),
            ],
        ));
        std::thread::sleep(Duration::from_millis(400));
        let code = run(client.cmd("curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url(i, "b")]));
        assert_eq!(code, "200", "request B of round {i} answered");
        a.0.wait().expect("curl A ends");
        let code = run(client.cmd("curl", &["-s", "-o", "/dev/null", "-w", "%{http_code}", &url(i, "c")]));
        assert_eq!(code, "200", "request C of round {i} answered");
    }
    let (py_addr, leaf_addr) = (format!("{}:{port}", py.ip), format!("{}:8090", leaf.ip));
    let mine = |s: &SpanView| s.path().starts_with("/r/ilv") && (s.server() == py_addr || s.server() == leaf_addr);
    // Per round: 3 curl CLIENT + 3 python SERVER spans, and CLIENT + SERVER of python's 3 calls.
    let spans = gather(&agent, mine, 12 * ROUNDS, Duration::from_secs(20));
    let report = dump(&spans);
    let one = |kind: &str, addr: &str, path: String| -> &SpanView {
        let found: Vec<&SpanView> = spans
            .iter()
            .filter(|s| s.kind == kind && s.server() == addr && s.path() == path)
            .collect();
        assert_eq!(found.len(), 1, "one {kind} span for {path} at {addr}\n{report}");
        found[0]
    };
    let (mut wrong, mut c_linked) = (0, 0);
    for i in 0..ROUNDS {
        let server = |side: &str| one("SERVER", &py_addr, format!("/r/ilv{i}{side}"));
        let call = |side: &str| one("CLIENT", &leaf_addr, format!("/r/ilv{i}{side}-call"));
        let (a, b) = (server("a"), server("b"));
        wrong += usize::from(call("b").is_child_of(a));
        wrong += usize::from(call("a").is_child_of(b));
        c_linked += usize::from(call("c").is_child_of(server("c")));
    }
    assert_eq!(
        wrong, 0,
        "calls for byte-by-byte requests linked to the other request\n{report}"
    );
    assert!(
        c_linked == ROUNDS,
        "the call of the one request in flight afterwards links to it: {c_linked} of {ROUNDS}\n{report}"
    );
}

/// An nginx worker serves many connections on one thread: its proxied
/// call links while it has one request in flight, and never wrongly.
#[test]
fn nginx_proxy_links_its_upstream_call_one_at_a_time_and_never_wrongly_at_8() {
    let one = linking_rates(Runtime::Nginx, 1, 20);
    assert!(
        (one.linked, one.wrong) == (one.n, 0),
        "nginx, one request at a time: {} of {} upstream calls linked, {} wrongly\n{}",
        one.linked,
        one.n,
        one.wrong,
        one.report
    );
    one.assert_hop_linked(Runtime::Nginx);
    let eight = linking_rates(Runtime::Nginx, 8, 10);
    assert_eq!(
        eight.wrong, 0,
        "nginx, 8 in flight: {} of {} upstream calls under the wrong request\n{}",
        eight.wrong, eight.n, eight.report
    );
}

#[test]
fn java_service_links_every_downstream_call_to_its_request_at_concurrency_8() {
    links_every_call_under_concurrency(Runtime::Java);
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[test]
fn app_sent_traceparent_is_the_parent_of_the_server_span_and_no_span_id_repeats() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let agent = Agent::start();
    let (client, py, leaf) = (cluster.pod(0, "app"), cluster.pod(0, "python"), cluster.pod(0, "leaf"));
    let go = go_service();
    let _leaf = go_service_on(&go, &leaf, 8090, None);
    py.wait_port(&leaf.ip, 8090);
    let _py = python_service(&py, 8091, Some(&format!("http://{}:8090", leaf.ip)));
    client.wait_port(&py.ip, 8091);
    let parents = ["00f067aa0ba902b7", "b7ad6b7169203331", "0123456789abcdef"];
    for (i, parent) in parents.iter().enumerate() {
        let header = format!("traceparent: 00-{TRACE}-{parent}-01");
        let url = format!("http://{}:8091/r/tp{i}", py.ip);
        let code = run(client.cmd(
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &header, &url],
        ));
        assert_eq!(code, "200", "python → go works");
    }
    let (py_addr, leaf_addr) = (format!("{}:8091", py.ip), format!("{}:8090", leaf.ip));
    let mine = |s: &SpanView| s.path().starts_with("/r/tp") && (s.server() == py_addr || s.server() == leaf_addr);
    let spans = gather(&agent, mine, 4 * parents.len(), Duration::from_secs(20));
    assert_unique_span_ids(&spans);
    let report = dump(&spans);
    for (i, parent) in parents.iter().enumerate() {
        let path = format!("/r/tp{i}");
        let one = |kind: &str, addr: &str| -> &SpanView {
            let found: Vec<&SpanView> = spans
                .iter()
                .filter(|s| s.kind == kind && s.server() == addr && s.path() == path)
                .collect();
            assert_eq!(found.len(), 1, "one {kind} span for {path} at {addr}\n{report}");
            found[0]
        };
        let (app, server) = (one("CLIENT", &py_addr), one("SERVER", &py_addr));
        let (outbound, downstream) = (one("CLIENT", &leaf_addr), one("SERVER", &leaf_addr));
        assert_eq!(
            (server.trace_id.as_str(), server.parent.as_deref()),
            (TRACE, Some(*parent)),
            "python SERVER continues the app's trace as the child of the header's span\n{report}"
        );
        assert!(
            app.trace_id == TRACE && app.parent.as_deref() == Some(*parent) && app.span_id != *parent,
            "the app's CLIENT span has its own id, parent = the header's span, in that trace\n{report}"
        );
        assert!(
            outbound.is_child_of(server),
            "python CLIENT under python SERVER\n{report}"
        );
        assert!(
            downstream.is_child_of(outbound),
            "go SERVER under python CLIENT\n{report}"
        );
    }
}

#[test]
fn proxy_forwarding_a_traceparent_unchanged_does_not_make_two_spans_share_an_id() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let scratch = Scratch::new("chain-proxy");
    let agent = Agent::start();
    let (client, proxy, leaf) = (cluster.pod(0, "app"), cluster.pod(0, "nginx"), cluster.pod(0, "leaf"));
    let go = go_service();
    let _leaf = go_service_on(&go, &leaf, 8090, None);
    proxy.wait_port(&leaf.ip, 8090);
    let upstream = format!("http://{}:8090", leaf.ip);
    let _nginx = safety::nginx(&proxy, 8092, &scratch.0, &upstream);
    client.wait_port(&proxy.ip, 8092);
    let parent = "00f067aa0ba902b7";
    let header = format!("traceparent: 00-{TRACE}-{parent}-01");
    for i in 0..3 {
        let url = format!("http://{}:8092/proxy/r/px{i}", proxy.ip);
        let code = run(client.cmd(
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &header, &url],
        ));
        assert_eq!(code, "200", "nginx → go works");
    }
    let (proxy_addr, leaf_addr) = (format!("{}:8092", proxy.ip), format!("{}:8090", leaf.ip));
    let mine = |s: &SpanView| s.path().contains("/r/px") && (s.server() == proxy_addr || s.server() == leaf_addr);
    let spans = gather(&agent, mine, 12, Duration::from_secs(20));
    let report = dump(&spans);
    assert_eq!(
        spans.len(),
        12,
        "client, nginx SERVER, nginx CLIENT, go SERVER per request\n{report}"
    );
    assert_unique_span_ids(&spans);
    assert!(
        spans.iter().all(|s| s.trace_id == TRACE),
        "everything stays in the app's trace\n{report}"
    );
    let nginx_servers = spans.iter().filter(|s| s.is_server() && s.server() == proxy_addr);
    assert!(
        nginx_servers.clone().count() == 3 && nginx_servers.clone().all(|s| s.parent.as_deref() == Some(parent)),
        "nginx SERVER is the child of the header's span\n{report}"
    );
}

/// What the wire and the agent looked like while rawbytes.py ran.
struct WireReport {
    /// TCP segments seen, and option kind → segments carrying it.
    segments: usize,
    option_kinds: std::collections::BTreeMap<u8, usize>,
    /// BPF program and map types the agent held.
    prog_types: Vec<u32>,
    map_types: Vec<u32>,
    /// Other meshless agents that were running (their programs touch our pods too).
    other_agents: Vec<u32>,
}

/// Every case of fixtures/chain/rawbytes.py reaches the server exactly as
/// sent, and the agent did trace them (so the check is not vacuous).
fn request_bytes_arrive_unchanged(agent_args: &[&str]) -> WireReport {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let scratch = Scratch::new("chain-rawbytes");
    let agent = Agent::start_with(agent_args);
    let (client, server) = (cluster.pod(0, "client"), cluster.pod(0, "server"));
    let sniffer = safety::OptionSniffer::start(&server, 8093, &scratch.0);
    let cases = safety::raw_bytes(&server, &client, 8093, &scratch.0);
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), 8, "all rawbytes.py cases ran: {names:?}");
    for case in &cases {
        assert!(
            case.sent == case.received,
            "{}: the server received other bytes than the client sent (agent {agent_args:?})\nsent:     {:?}\nreceived: {:?}",
            case.name,
            String::from_utf8_lossy(&case.sent),
            String::from_utf8_lossy(&case.received)
        );
    }
    let addr = format!("{}:8093", server.ip);
    let spans = gather(
        &agent,
        |s| s.server() == addr && s.path() == "/plain",
        2,
        Duration::from_secs(10),
    );
    assert_eq!(
        spans.len(),
        2,
        "the agent traced the traffic it must not change\n{}",
        dump(&spans)
    );
    assert_unique_span_ids(&spans);
    let (segments, option_kinds) = sniffer.kinds();
    let (prog_types, map_types) = safety::bpf_objects(agent.pid());
    let other_agents = safety::other_agents(agent.pid());
    println!("agent {agent_args:?}: {segments} TCP segments, option kind -> segments {option_kinds:?}; agent holds prog types {prog_types:?}, map types {map_types:?}; other agents running: {other_agents:?}");
    WireReport {
        segments,
        option_kinds,
        prog_types,
        map_types,
        other_agents,
    }
}

#[test]
fn requests_reach_the_server_byte_for_byte_with_default_propagation() {
    let wire = request_bytes_arrive_unchanged(&[]);
    assert!(wire.segments > 0, "the sniffer saw the traffic");
}

#[test]
fn propagation_off_leaves_request_bytes_tcp_options_and_sockets_untouched() {
    let wire = request_bytes_arrive_unchanged(&["--propagation", "off"]);
    assert!(wire.segments > 0, "the sniffer saw the traffic");
    let socket_progs = [
        safety::BPF_PROG_TYPE_SK_MSG,
        safety::BPF_PROG_TYPE_SK_SKB,
        safety::BPF_PROG_TYPE_SOCK_OPS,
    ];
    let socket_maps = [safety::BPF_MAP_TYPE_SOCKMAP, safety::BPF_MAP_TYPE_SOCKHASH];
    assert!(
        !wire.prog_types.iter().any(|t| socket_progs.contains(t))
            && !wire.map_types.iter().any(|t| socket_maps.contains(t)),
        "with --propagation off the agent holds no sk_msg/sk_skb/sock_ops program and no sockmap/sockhash (sockmaps break FIONREAD): progs {:?}, maps {:?}",
        wire.prog_types,
        wire.map_types
    );
    let foreign: Vec<&u8> = wire
        .option_kinds
        .keys()
        .filter(|k| !safety::STANDARD_TCP_OPTIONS.contains(k))
        .collect();
    // Another agent's programs on the cgroup2 root would write options on
    // our pods' segments too; the wire is only ours to judge when alone.
    if wire.other_agents.is_empty() {
        assert!(
            foreign.is_empty(),
            "with --propagation off only the stack's own TCP options cross the wire; also seen: {foreign:?} ({:?})",
            wire.option_kinds
        );
    } else {
        println!(
            "wire check not judged: other meshless agents {:?} were running; non-standard options seen: {foreign:?}",
            wire.other_agents
        );
    }
}

#[test]
fn large_nginx_responses_arrive_complete_over_http_and_tls_to_curl_node_java_and_a_fionread_client_with_default_propagation(
) {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let scratch = Scratch::new("chain-big");
    let agent = Agent::start();
    let (client, server) = (cluster.pod(0, "client"), cluster.pod(0, "nginx"));
    std::fs::create_dir_all(scratch.0.join("www")).expect("www");
    let mut want = std::collections::BTreeMap::new();
    for (name, size) in [("big1m", 1 << 20), ("big10m", 10 << 20)] {
        let sha = safety::big_file(&scratch.0, name, size);
        want.insert(format!("/{name}"), (size, sha.clone()));
        want.insert(format!("/proxy/{name}"), (size, sha));
    }
    let upstream = format!("http://{}:8094", server.ip);
    safety::self_signed_cert(&scratch.0);
    let _nginx = safety::nginx(&server, 8094, &scratch.0, &upstream);
    client.wait_port(&server.ip, 8094);
    let tls_port = 8094 + safety::TLS_PORT_OFFSET;
    client.wait_port(&server.ip, tls_port);
    let plain_paths: Vec<&str> = want
        .keys()
        .filter(|p| !p.starts_with("/proxy/"))
        .map(String::as_str)
        .collect();
    let paths: Vec<&str> = want.keys().map(String::as_str).collect();
    let ip = server.ip.clone();
    let results = [
        ("curl", safety::curl_client(&client, &ip, 8094, &paths, &scratch.0), 1),
        ("node", safety::node_client(&client, &ip, 8094, &paths), 2),
        (
            "python FIONREAD",
            safety::fionread_client(&client, &ip, 8094, &paths),
            2,
        ),
        ("java HttpClient", safety::java_client(&client, &ip, 8094, &paths), 2),
        (
            "curl over TLS",
            safety::curl_tls_client(&client, &ip, tls_port, &plain_paths, &scratch.0),
            1,
        ),
    ];
    for (who, out, times) in &results {
        let got = safety::received(out);
        for (path, (size, sha)) in &want {
            if *who == "curl over TLS" && path.starts_with("/proxy/") {
                continue;
            }
            let expected = vec![(*size, sha.clone()); *times];
            assert_eq!(
                got.get(path),
                Some(&expected),
                "{who} got {path} incomplete or changed (length, sha256); full output:\n{out}"
            );
        }
    }
    let addr = format!("{}:8094", server.ip);
    let spans = gather(
        &agent,
        |s| s.is_server() && s.server() == addr && s.path() == "/big10m",
        14,
        Duration::from_secs(10),
    );
    // 7 fetches of /big10m, and 7 more through /proxy/ (nginx proxies to itself).
    assert_eq!(spans.len(), 14, "the agent traced the transfers\n{}", dump(&spans));
    assert_unique_span_ids(&spans);
}

/// The chain check itself: it accepts a correct set of traces and names
/// the hop whose parent is wrong (no kernel needed).
#[test]
fn chain_check_accepts_correct_traces_and_reports_a_wrong_parent_by_runtime() {
    let chain = Chain::described([
        ("10.1.0.2:8081", "10.96.0.1:80"),
        ("10.1.0.3:8082", "10.96.0.2:80"),
        ("10.1.0.4:8083", "10.96.0.3:80"),
    ]);
    let span = |role: usize, req: usize, parent: Option<usize>| {
        let (addr, port) = chain.hops[role / 2].dialled.split_once(':').expect("ip:port");
        let attrs = [("server.address", addr), ("server.port", port)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain([("url.path".to_owned(), format!("/r/c{req}"))])
            .collect();
        SpanView {
            kind: if role.is_multiple_of(2) { "CLIENT" } else { "SERVER" }.to_owned(),
            trace_id: format!("{req:032x}"),
            span_id: format!("{:016x}", req * 10 + role + 1),
            parent: parent.map(|p| format!("{:016x}", req * 10 + p + 1)),
            attrs,
        }
    };
    let correct: Vec<SpanView> = (0..2)
        .flat_map(|req| (0..6).map(move |role| (req, role)))
        .map(|(req, role)| span(role, req, role.checked_sub(1)))
        .collect();
    assert_eq!(chain.check(&correct, 2), Ok(()));
    assert_unique_span_ids(&correct);

    let mut wrong = correct.clone();
    wrong[3] = span(3, 0, Some(0)); // go SERVER under curl CLIENT
    let report = chain.check(&wrong, 2).expect_err("a wrong parent fails");
    assert!(
        report.contains("go SERVER      spans   2/2  linked   1  wrong parent   1"),
        "{report}"
    );

    let mut split = correct.clone();
    split[5].trace_id = "f".repeat(32); // java SERVER in a trace of its own
    let report = chain.check(&split, 2).expect_err("a split trace fails");
    assert!(report.contains("request /r/c0 is split over 2 traces"), "{report}");
}
