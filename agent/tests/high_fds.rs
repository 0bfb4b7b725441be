//! Connections on fds past the kernel's bounded sweeps (fd >= 2000) end
//! when their process exits or closes them with close_range, not only at
//! the idle timeout: the agent's userspace expiry notices, clears the
//! kernel entries and closes them in the correlator, so their unanswered
//! requests become spans within seconds.
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// A server in pod b that reads requests and never answers.
fn silent_server(pods: &PodPair, port: u16) -> Proc {
    let serve = r#"
def serve(c):
    while c.recv(65536):
        pass
"#;
    python_conn_server(pods, port, serve)
}

/// A client in pod a: three connections moved to fds 2000..2002, one
/// request each (never answered), then `ending` (Python) with the
/// connections still open.
fn high_fd_client(pods: &PodPair, port: u16, tag: &str, ending: &str) -> Proc {
    let script = format!(
        r#"
import os, socket, time
for k in range(3):
    s = socket.create_connection(("{ip}", {port}))
    fd = 2000 + k
    os.dup2(s.fileno(), fd)
    s.close()
    os.write(fd, b"GET /{tag}/%d HTTP/1.1\r\nHost: x\r\n\r\n" % k)
time.sleep(1)
{ending}
"#,
        ip = pods.ip_b
    );
    let mut cmd = PodPair::cmd(&pods.a, "python3");
    cmd.args(["-c", &script]);
    spawn(cmd)
}

fn unanswered_spans(agent: &Agent, pods: &PodPair, port: u16, tag: &str) -> Vec<Value> {
    let to = to_server(&pods.ip_b, port);
    let prefix = format!("/{tag}/");
    let prefix = prefix.as_str();
    agent.collect(
        move |s| to(s) && kind(s) == "CLIENT" && attr_str(s, "url.path").starts_with(prefix),
        3,
        Duration::from_secs(20),
    )
}

fn check(spans: &[Value], tag: &str) {
    assert_eq!(spans.len(), 3, "{tag}: {spans:#?}");
    for s in spans {
        assert_eq!(attr_str(s, "error.type"), "connection_closed", "{s:#?}");
    }
}

#[test]
fn connections_on_fds_past_2000_end_when_their_process_exits() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8461;
    let _server = silent_server(&pods, port);
    let expired_before = metric_sum(&scrape(&agent), "meshless_kernel_entries_expired_total", &[]);
    // os._exit: no close() on the way out, the fds end with the process.
    let _client = high_fd_client(&pods, port, "exit", "os._exit(0)");
    let spans = unanswered_spans(&agent, &pods, port, "exit");
    check(&spans, "exit");
    let expired = metric_sum(&scrape(&agent), "meshless_kernel_entries_expired_total", &[]) - expired_before;
    eprintln!(
        "process exit with fds 2000..2002 open: {} spans, {expired} kernel entries expired",
        spans.len()
    );
    assert!(expired >= 3.0, "kernel entries expired: {expired}");
}

#[test]
fn connections_on_fds_past_2000_end_when_close_range_closes_them() {
    let _serial = serial();
    let pods = PodPair::new();
    let agent = Agent::start();
    let port = 8462;
    let _server = silent_server(&pods, port);
    // A range wider than the kernel's sweep (it forgets 1024 fds from the
    // start of the range); the process lives on.
    let client = high_fd_client(&pods, port, "range", "os.closerange(3, 4000)\ntime.sleep(30)");
    let spans = unanswered_spans(&agent, &pods, port, "range");
    check(&spans, "close_range");
    drop(client);
}
