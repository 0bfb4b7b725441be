//! Spans name the process, not the thread that happened to make the
//! syscall: runtimes name their threads (grpcio `event_engine`, Java
//! `http-nio-8080-exec-1`), and those names must not become service or
//! executable names. The thread's own name is kept as `thread.name`.
mod support;

use std::{process::Command, time::Duration};

use support::{otlp::*, *};

/// A threading HTTP server whose handler threads rename themselves
/// (prctl PR_SET_NAME, as pthread_setname_np does) before reading the request.
const SERVER: &str = r#"
import ctypes, http.server, sys
libc = ctypes.CDLL(None)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    def process_request_thread(self, request, client_address):
        libc.prctl(15, b"handler-thread", 0, 0, 0)
        super().process_request_thread(request, client_address)
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"#;

/// A client whose requests are made by a renamed thread; it stays alive
/// afterwards so that the agent finds it in /proc (an exited process is
/// named from the kernel's comm, which is covered by unit tests).
const CLIENT: &str = r#"
import ctypes, http.client, sys, threading, time
libc = ctypes.CDLL(None)
def work():
    libc.prctl(15, b"caller-thread", 0, 0, 0)
    for i in range(3):
        c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
        c.request("GET", "/named/%d" % i)
        c.getresponse().read()
        c.close()
t = threading.Thread(target=work)
t.start()
t.join()
time.sleep(60)
"#;

/// Base name of the executable behind `python3` (e.g. `python3.11`).
fn python_executable() -> String {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import os, sys; print(os.path.basename(os.path.realpath(sys.executable)))",
    ]);
    run(c).trim().to_owned()
}

#[test]
fn spans_of_renamed_threads_carry_the_process_name_and_the_thread_name() {
    let _serial = serial();
    let receiver = Receiver::start(Transport::Grpc);
    let pods = PodPair::new();
    let agent = Agent::start_with(&[
        "--otlp-endpoint",
        &receiver.endpoint(),
        "--traces-exporter",
        "otlp,console",
    ]);
    let port = 8461;
    let mut server = PodPair::cmd(&pods.b, "python3");
    server.args(["-c", SERVER, &pods.ip_b, &port.to_string()]);
    let _server = spawn(server);
    wait_port(&pods.a, &pods.ip_b, port);
    let mut client = PodPair::cmd(&pods.a, "python3");
    client.args(["-c", CLIENT, &pods.ip_b, &port.to_string()]);
    let _client = spawn(client);

    let to_port = |s: &Received| s.attr("server.port").as_deref() == Some(port.to_string().as_str());
    let spans = receiver.wait_spans(to_port, 6, Duration::from_secs(15));
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let exe = python_executable();
    for s in &spans {
        let (kind, thread) = match s.span.kind {
            2 => ("SERVER", "handler-thread"),
            _ => ("CLIENT", "caller-thread"),
        };
        let resource = |k: &str| s.resource.get(k).map(String::as_str);
        assert_eq!(resource("service.name"), Some("python3"), "{kind}: {s:#?}");
        assert_eq!(resource("process.executable.name"), Some(exe.as_str()), "{kind}");
        assert_eq!(s.attr("thread.name").as_deref(), Some(thread), "{kind}");
        assert!(s.attr("thread.id").is_some(), "{kind}");
    }
    assert_eq!(spans.iter().filter(|s| s.span.kind == 2).count(), 3);

    // The console names the process too (human line `name[pid]`, JSON
    // attributes).
    let console = agent.collect(to_server(&pods.ip_b, port), 6, Duration::from_secs(10));
    assert_eq!(console.len(), 6, "{console:#?}");
    for s in &console {
        assert_eq!(attr_str(s, "process.executable.name"), exe);
        let thread = if kind(s) == "SERVER" {
            "handler-thread"
        } else {
            "caller-thread"
        };
        assert_eq!(attr_str(s, "thread.name"), thread);
    }
}
