//! gRPC on a real kernel with the three common stacks (h2c): Python
//! grpcio, Node @grpc/grpc-js and Go google.golang.org/grpc, as clients
//! and servers of one service (tests/fixtures/grpc). Every call gives a
//! CLIENT and a SERVER span, linked (both pods are on the agent's node).
//!
//! The status each side's span carries: the `grpc-status` on the wire
//! (trailers, or the only header block of a trailers-only response); for
//! the call past its deadline, whose stream the client resets (CANCEL) with
//! no status on the wire, DEADLINE_EXCEEDED (4) on both sides: the reset
//! came at the request's `grpc-timeout`, which the server enforces too.
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;
use support::{chain::go_echo, *};

const PORT: u16 = 50051;
const SERVICE: &str = "meshless.test.Echo";
/// The fixtures' calls in order, with the status both spans must carry.
const CALLS: [(&str, u64); 4] = [("Say", 0), ("Find", 5), ("Slow", 4), ("Count", 0)];
const GRPC_JS: &str = "@grpc/grpc-js@1.14.7";

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/grpc")
        .join(name)
        .display()
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// node_modules with @grpc/grpc-js, installed under target/ on first use.
fn grpc_js_modules() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmp("grpc-node");
        let modules = dir.join("node_modules");
        if !modules.join("@grpc/grpc-js/package.json").exists() {
            std::fs::create_dir_all(&dir).expect("grpc-node dir");
            let mut npm = Command::new("npm");
            npm.args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&dir)
                .arg(GRPC_JS);
            run(npm);
        }
        modules
    })
}

fn python_server(pods: &PodPair, addr: &str) -> Proc {
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args([&fixture("server.py"), addr]);
    spawn(server)
}

fn go_server(pods: &PodPair, addr: &str) -> Proc {
    let mut server = PodPair::cmd(&pods.b, &go_echo().display().to_string());
    server.args(["server", addr]);
    spawn(server)
}

fn node_server(pods: &PodPair, addr: &str) -> Proc {
    let mut server = PodPair::cmd(&pods.b, "node");
    server
        .env("NODE_PATH", grpc_js_modules())
        .args([&fixture("server.js"), addr]);
    spawn(server)
}

fn grpc_status(span: &Value) -> Option<u64> {
    attr(span, "rpc.grpc.status_code").as_u64()
}

fn summary(spans: &[Value]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "\n  {} {} status={:?} error={} trace={} span={} parent={}",
                kind(s),
                s["name"],
                grpc_status(s),
                attr(s, "error.type"),
                s["trace_id"],
                s["span_id"],
                s["parent_span_id"],
            )
        })
        .collect()
}

/// Every call of the fixtures has exactly one CLIENT and one SERVER span
/// named `Service/Method` with the RPC attributes and the expected status,
/// and the server's span is the child of the client's.
fn check_calls(spans: &[Value]) -> Result<(), String> {
    for (method, status) in CALLS {
        let name = format!("{SERVICE}/{method}");
        let side = |k: &str| -> Result<&Value, String> {
            let found: Vec<&Value> = spans.iter().filter(|s| s["name"] == name && kind(s) == k).collect();
            match found[..] {
                [one] => Ok(one),
                _ => Err(format!("{} {k} spans of {name}", found.len())),
            }
        };
        let (client, server) = (side("CLIENT")?, side("SERVER")?);
        for s in [client, server] {
            let facts = (
                attr_str(s, "rpc.system"),
                attr_str(s, "rpc.service"),
                attr_str(s, "rpc.method"),
                grpc_status(s),
                attr_str(s, "network.protocol.version"),
            );
            if facts != ("grpc", SERVICE, method, Some(status), "2") {
                return Err(format!("{} {name}: {facts:?}, want status {status}", kind(s)));
            }
        }
        if status != 0 && client["status"]["code"] != "ERROR" {
            return Err(format!("client {name} with status {status} is not an error"));
        }
        if server["trace_id"] != client["trace_id"] || server["parent_span_id"] != client["span_id"] {
            return Err(format!("{name}: server span not the client span's child"));
        }
    }
    Ok(())
}

/// Runs `client` against the server at `addr` and checks the spans.
fn calls_give_linked_span_pairs(agent: &Agent, pods: &PodPair, client: Command) -> Vec<Value> {
    wait_port(&pods.a, &pods.ip_b, PORT);
    let out = run(client);
    assert!(out.contains("ok"), "client said {out:?}");
    let spans = agent.collect(to_server(&pods.ip_b, PORT), 2 * CALLS.len(), Duration::from_secs(15));
    if let Err(e) = check_calls(&spans) {
        panic!("{e}; spans:{}", summary(&spans));
    }
    spans
}

#[test]
fn python_grpcio_calls_give_linked_span_pairs_with_service_method_and_status() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let _server = python_server(&pods, &addr);
    let mut client = PodPair::cmd(&pods.a, "python3");
    client.args([&fixture("client.py"), &addr]);
    calls_give_linked_span_pairs(&agent, &pods, client);

    // RED metrics in Istio's names say gRPC and carry the status.
    let scrape = scrape(&agent);
    for (status, at_least) in [("0", 2.0), ("5", 1.0), ("4", 1.0)] {
        for reporter in ["source", "destination"] {
            let labels = [
                ("reporter", reporter),
                ("request_protocol", "grpc"),
                ("grpc_response_status", status),
            ];
            let n = metric_sum(&scrape, "istio_requests_total", &labels);
            assert!(n >= at_least, "{labels:?}: {n}");
        }
    }
}

#[test]
fn node_grpc_js_client_calls_to_a_python_server_give_linked_span_pairs() {
    let _serial = serial();
    let modules = grpc_js_modules();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let _server = python_server(&pods, &addr);
    let mut client = PodPair::cmd(&pods.a, "node");
    client.env("NODE_PATH", modules).args([&fixture("client.js"), &addr]);
    calls_give_linked_span_pairs(&agent, &pods, client);
}

#[test]
fn go_grpc_client_and_server_calls_give_linked_span_pairs() {
    let _serial = serial();
    let bin = go_echo().display().to_string();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let _server = go_server(&pods, &addr);
    let mut client = PodPair::cmd(&pods.a, &bin);
    client.args(["client", &addr]);
    calls_give_linked_span_pairs(&agent, &pods, client);
}

#[test]
fn python_grpcio_client_calls_to_a_go_server_give_linked_span_pairs() {
    let _serial = serial();
    go_echo();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let _server = go_server(&pods, &addr);
    let mut client = PodPair::cmd(&pods.a, "python3");
    client.args([&fixture("client.py"), &addr]);
    calls_give_linked_span_pairs(&agent, &pods, client);
}

#[test]
fn go_grpc_client_calls_to_a_node_grpc_js_server_give_linked_span_pairs() {
    let _serial = serial();
    let bin = go_echo().display().to_string();
    grpc_js_modules();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let _server = node_server(&pods, &addr);
    let mut client = PodPair::cmd(&pods.a, &bin);
    client.args(["client", &addr]);
    calls_give_linked_span_pairs(&agent, &pods, client);
}
