//! gRPC on a real kernel: Python grpcio server and client (h2c), unary
//! calls that succeed, fail with a status, and run past their deadline.
mod support;

use std::time::Duration;

use support::*;

const PORT: u16 = 50051;

const SERVER: &str = r#"
import sys, time, grpc
from concurrent import futures
def say(req, ctx):
    if req == b"missing":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if req == b"slow":
        time.sleep(1.0)
    return b"hello " + req
handler = grpc.method_handlers_generic_handler(
    "helloworld.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"#;

const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)
say = channel.unary_unary("/helloworld.Greeter/SayHello")
assert say(b"world", timeout=5) == b"hello world"
try:
    say(b"missing", timeout=5)
    raise SystemExit("expected NOT_FOUND")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
try:
    say(b"slow", timeout=0.2)
    raise SystemExit("expected DEADLINE_EXCEEDED")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
channel.close()
"#;

fn grpc_attr(span: &serde_json::Value) -> Option<u64> {
    attr(span, "rpc.grpc.status_code").as_u64()
}

#[test]
fn python_grpc_unary_calls_give_span_pairs_with_service_method_and_status() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let addr = format!("{}:{PORT}", pods.ip_b);
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args(["-c", SERVER, &addr]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, PORT);
    let mut client = PodPair::cmd(&pods.a, "python3");
    client.args(["-c", CLIENT, &addr]);
    run(client);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 5, Duration::from_secs(10));
    let named: Vec<_> = spans
        .iter()
        .filter(|s| s["name"] == "helloworld.Greeter/SayHello")
        .collect();
    let summary: Vec<_> = named
        .iter()
        .map(|s| (kind(s).to_owned(), grpc_attr(s), attr(s, "error.type").clone()))
        .collect();
    // The server answers the slow call after the client gave up: its span
    // may end with the client's RST_STREAM instead of a status.
    let with = |k: &str, code: u64| {
        named
            .iter()
            .filter(|s| kind(s) == k && grpc_attr(s) == Some(code))
            .count()
    };
    assert_eq!(with("CLIENT", 0), 1, "{summary:?}");
    assert_eq!(with("SERVER", 0), 1, "{summary:?}");
    assert_eq!(with("CLIENT", 5), 1, "NOT_FOUND on the client: {summary:?}");
    assert_eq!(with("SERVER", 5), 1, "NOT_FOUND on the server: {summary:?}");
    for s in &named {
        assert_eq!(attr_str(s, "rpc.system"), "grpc");
        assert_eq!(attr_str(s, "rpc.service"), "helloworld.Greeter");
        assert_eq!(attr_str(s, "rpc.method"), "SayHello");
        assert_eq!(attr_str(s, "network.protocol.version"), "2");
    }
    let not_found = named
        .iter()
        .find(|s| kind(s) == "CLIENT" && grpc_attr(s) == Some(5))
        .expect("client NOT_FOUND span");
    assert_eq!(not_found["status"]["code"], "ERROR");
    let deadline = named
        .iter()
        .filter(|s| kind(s) == "CLIENT" && grpc_attr(s) != Some(0) && grpc_attr(s) != Some(5))
        .count();
    assert_eq!(deadline, 1, "the call past its deadline has a span too: {summary:?}");
}
