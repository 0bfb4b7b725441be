//! Interop with a real OpenTelemetry collector: rotel (`pip install rotel`)
//! receives the agent's OTLP export and prints what it decoded.
mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::*;

fn rotel_agent() -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "rotel is installed by `cargo xtask setup` (pip install rotel)"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[test]
fn rotel_receives_both_spans_of_a_call() {
    let _serial = serial();
    let scratch = Scratch::new("rotel");
    let (grpc, http) = (free_port(), free_port());
    let log = scratch.0.join("rotel.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let _rotel = Proc(
        Command::new(rotel_agent())
            .args(["start", "--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .args([
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
            ])
            .stdout(log_file.try_clone().expect("clone"))
            .stderr(log_file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start rotel-agent"),
    );
    let pods = PodPair::new();
    let agent = Agent::start_with(&["--otlp-endpoint", &format!("http://127.0.0.1:{grpc}")]);
    let port = 8401;
    let mut server = PodPair::cmd(&pods.b, "python3");
    server
        .args(["-m", "http.server", &port.to_string(), "--bind", &pods.ip_b])
        .current_dir("/etc");
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.args([
        "-s",
        "-o",
        "/dev/null",
        &format!("http://{}:{port}/rotel-interop", pods.ip_b),
    ]);
    run(curl);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let blocks: Vec<&str> = text.split("Span #").filter(|b| b.contains("/rotel-interop")).collect();
        let server = blocks.iter().find(|b| b.contains("SPAN_KIND_SERVER"));
        let client = blocks.iter().find(|b| b.contains("SPAN_KIND_CLIENT"));
        if let (Some(server), Some(client)) = (server, client) {
            let id = |b: &str, field: &str| {
                b.lines()
                    .find(|l| l.trim_start().starts_with(field))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_owned())
            };
            assert_eq!(id(server, "Trace ID"), id(client, "Trace ID"));
            assert_eq!(id(server, "Parent ID"), id(client, "ID"));
            assert!(server.contains("http.response.status_code: Int(404)"), "{server}");
            break;
        }
        assert!(Instant::now() < deadline, "rotel did not print both spans:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(agent);
}
