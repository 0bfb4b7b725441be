//! Lost events never shift pairing, on the real kernel: a 1 MiB ring
//! buffer drained once a second overflows under pipelined keep-alive
//! load, and every span that still comes out carries its own request's
//! response (the server puts the request's number into the status code and
//! echoes the path in a header). The kernel numbers each connection
//! direction's events, so the agent sees each loss as a gap and restarts
//! pairing there (`meshless_event_sequence_gaps`).
mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// Status the server answers request `/p/<conn>/<i>` with: neighbouring
/// requests differ, and no shift shorter than 97 requests (more than a
/// connection ever has pending) maps one onto another.
fn status_for(i: u64) -> u64 {
    200 + i % 97
}

/// A raw HTTP/1.1 server in pod b: answers every complete request in what
/// it has read with one `sendall` (pipelined responses coalesce), status
/// from the request number, `X-Echo: <path>` and a 20-byte body (a batch
/// of responses fits in one capture: truncation is not what is tested).
fn echo_server(pods: &PodPair, port: u16) -> Proc {
    let serve = r#"
def serve(c):
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        buf += d
        out = b""
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            target = head.split(b"\r\n")[0].split(b" ")[1]
            status = 200 + int(target.rsplit(b"/", 1)[1]) % 97
            body = b"x" * 20
            out += b"HTTP/1.1 %d OK\r\nX-Echo: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, target, len(body), body)
        if out:
            try:
                c.sendall(out)
            except OSError:
                break
    c.close()
"#;
    python_conn_server(pods, port, serve)
}

/// `conns` keep-alive connections in pod a, each sending `batches` batches
/// of `depth` pipelined requests (one `sendall` each, small enough that a
/// batch fits in one capture) and reading all their responses before the next batch; stops
/// early after 20 s.
fn pipelined_load(pods: &PodPair, port: u16, conns: usize, batches: usize, depth: usize) {
    let script = format!(
        r#"
import socket, threading, time
PAD = b"p" * 10
deadline = time.time() + 20
def run(c):
    s = socket.create_connection(("{ip}", {port}))
    i = 0
    for _ in range({batches}):
        if time.time() > deadline:
            break
        req = b""
        for _ in range({depth}):
            req += b"GET /p/%d/%d HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (c, i, PAD)
            i += 1
        s.sendall(req)
        buf, pos, got = b"", 0, 0
        while got < {depth}:
            end = buf.find(b"\r\n\r\n", pos)
            if end >= 0 and len(buf) >= end + 4 + 20:
                pos = end + 4 + 20
                got += 1
                continue
            d = s.recv(65536)
            if not d:
                raise SystemExit("server closed")
            buf += d
    # Once every connection is done and the ring buffer has drained, one
    # more request each: a connection whose last events were lost shows
    # its gap only at its next event.
    done.wait()
    time.sleep(2.5)
    s.sendall(b"GET /p/%d/%d HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (c, i, PAD))
    buf = b""
    while buf.find(b"\r\n\r\n") < 0 or len(buf) < buf.find(b"\r\n\r\n") + 4 + 20:
        d = s.recv(65536)
        if not d:
            raise SystemExit("server closed")
        buf += d
    s.close()
done = threading.Barrier({conns})
ts = [threading.Thread(target=run, args=(c,)) for c in range({conns})]
for t in ts: t.start()
for t in ts: t.join()
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &script]);
    run(py);
}

/// The request number in a span's path `/p/<conn>/<i>`, if it is one of ours.
fn request_number(span: &Value) -> Option<u64> {
    attr_str(span, "url.path").rsplit('/').next()?.parse().ok()
}

#[test]
fn ring_buffer_loss_under_pipelined_load_never_pairs_a_span_with_another_request() {
    let _serial = serial();
    let agent = Agent::start_with(&[
        "--ringbuf-mib",
        "1",
        "--poll-interval-ms",
        "1000",
        "--wakeup-kib",
        "65536",
        "--capture-response-headers",
        "x-echo",
    ]);
    let pods = PodPair::new();
    let port = 18_471;
    let _server = echo_server(&pods, port);
    // The agent sees this connection's first exchange (the buffer is empty).
    pipelined_load(&pods, port, 1, 1, 1);
    let to = to_server(&pods.ip_b, port);
    let first = agent.wait_for(to, |s| !s.is_empty(), Duration::from_secs(10));
    assert!(!first.is_empty(), "no span for a plain request: {:?}", agent.stderr());
    pipelined_load(&pods, port, 8, 3000, 4);

    let spans = agent.wait_for(to, |_| false, Duration::from_secs(4));
    let mut checked = 0;
    for s in &spans {
        let Some(status) = attr(s, "http.response.status_code").as_u64() else {
            continue;
        };
        let path = attr_str(s, "url.path");
        let i = request_number(s).unwrap_or_else(|| panic!("span with a foreign path: {s}"));
        assert_eq!(
            status,
            status_for(i),
            "{} span paired with another request's status: {s}",
            kind(s)
        );
        let echo = attr(s, "http.response.header.x-echo");
        let echo = echo.as_str().or_else(|| echo[0].as_str()).unwrap_or(path);
        assert_eq!(
            echo,
            path,
            "{} span paired with another request's response: {s}",
            kind(s)
        );
        checked += 1;
    }
    let m = scrape(&agent);
    let ring_full = metric_sum(&m, "meshless_kernel_ringbuf_full_total", &[]);
    let gaps = metric_sum(&m, "meshless_event_sequence_gaps_total", &[]);
    let resyncs = metric_sum(&m, "meshless_http_pairing_resyncs_total", &[]);
    eprintln!(
        "spans {} (with a status: {checked}), ring buffer full {ring_full}, sequence gaps {gaps}, pairing resyncs {resyncs}",
        spans.len()
    );
    assert!(ring_full > 0.0, "the load did not overflow the ring buffer");
    assert!(gaps > 0.0, "ring-buffer loss was not seen as sequence gaps");
    assert!(checked > 0, "no span survived the loss to be checked");
}
