//! curl → `python3 -m http.server`, each in its own network namespace.
mod support;

use std::time::Duration;

use support::*;

#[test]
fn curl_to_python_gives_one_client_and_one_server_span_per_request_in_one_trace() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8000;
    let scratch = Scratch::new("pyroot");
    std::fs::write(scratch.0.join("hello.txt"), "hello\n").expect("write file");
    let mut server = PodPair::cmd(&pods.b, "python3");
    server
        .args(["-m", "http.server", &port.to_string(), "--bind", &pods.ip_b])
        .current_dir(&scratch.0);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);

    let paths = ["/hello.txt", "/missing", "/"];
    for path in paths {
        let url = format!("http://{}:{port}{path}", pods.ip_b);
        run({
            let mut c = PodPair::cmd(&pods.a, "curl");
            c.args(["-s", "-o", "/dev/null", &url]);
            c
        });
    }
    let spans = agent.collect(to_server(&pods.ip_b, port), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "spans: {spans:#?}");
    for (path, status) in paths.iter().zip([200, 404, 200]) {
        let of_path: Vec<_> = spans.iter().filter(|s| attr_str(s, "url.path") == *path).collect();
        let client: Vec<_> = of_path.iter().filter(|s| kind(s) == "CLIENT").collect();
        let server: Vec<_> = of_path.iter().filter(|s| kind(s) == "SERVER").collect();
        assert_eq!((client.len(), server.len()), (1, 1), "{path}: {of_path:#?}");
        let (c, s) = (client[0], server[0]);
        assert_eq!(attr_str(c, "process.executable.name"), "curl");
        // semconv: the base name of /proc/<pid>/exe (python3 -> python3.11).
        assert!(attr_str(s, "process.executable.name").starts_with("python3"), "{s}");
        assert_eq!(c["trace_id"], s["trace_id"], "same trace for both sides of {path}");
        assert_eq!(
            s["parent_span_id"], c["span_id"],
            "server span is the client span's child"
        );
        for span in [c, s] {
            assert_eq!(attr_str(span, "http.request.method"), "GET");
            assert_eq!(attr_u64(span, "http.response.status_code"), status);
            assert_eq!(attr_str(span, "client.address"), pods.ip_a);
            assert_eq!(attr_str(span, "server.address"), pods.ip_b);
            assert!(attr_u64(span, "client.port") > 0);
            let (start, end) = (
                span["start_time_unix_nano"].as_u64().unwrap_or(0),
                span["end_time_unix_nano"].as_u64().unwrap_or(0),
            );
            assert!(
                start > 1_700_000_000_000_000_000 && end >= start,
                "wall-clock times: {span}"
            );
        }
        assert_eq!(attr_u64(c, "client.port"), attr_u64(s, "client.port"));
        assert!(
            c["start_time_unix_nano"].as_u64() <= s["start_time_unix_nano"].as_u64(),
            "client starts first"
        );
    }
    let (status, stderr) = agent.stop();
    assert!(status.success(), "agent exits cleanly on SIGINT: {stderr:?}");
}
