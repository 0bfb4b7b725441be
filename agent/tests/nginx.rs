//! curl and Python clients → nginx: keep-alive, error statuses, pipelining
//! and many concurrent connections.
mod support;

use std::{collections::HashSet, time::Duration};

use support::*;

const PORT: u16 = 8080;

#[test]
fn keepalive_connection_to_nginx_gives_a_span_pair_per_request_with_404_and_500() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-ka");
    let agent = Agent::start();
    let _nginx = start_nginx(&pods.b, &pods.ip_b, PORT, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    // One curl process, ten URLs: curl reuses one keep-alive connection.
    let base = format!("http://{}:{PORT}", pods.ip_b);
    let mut urls: Vec<String> = (0..8).map(|_| format!("{base}/ok")).collect();
    urls.push(format!("{base}/nope"));
    urls.push(format!("{base}/fail"));
    let mut curl = PodPair::cmd(&pods.a, "curl");
    curl.arg("-s");
    for u in &urls {
        curl.args(["-o", "/dev/null", u]);
    }
    run(curl);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 20, Duration::from_secs(10));
    assert_eq!(spans.len(), 20, "{spans:#?}");
    let servers: Vec<_> = spans.iter().filter(|s| kind(s) == "SERVER").collect();
    let clients: Vec<_> = spans.iter().filter(|s| kind(s) == "CLIENT").collect();
    assert_eq!((servers.len(), clients.len()), (10, 10));
    assert!(servers
        .iter()
        .all(|s| attr_str(s, "process.executable.name") == "nginx"));
    let ports: HashSet<u64> = clients.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(ports.len(), 1, "all requests on one keep-alive connection");
    let statuses = |v: &[&serde_json::Value]| {
        let mut s: Vec<u64> = v.iter().map(|s| attr_u64(s, "http.response.status_code")).collect();
        s.sort_unstable();
        s
    };
    let expected = [200, 200, 200, 200, 200, 200, 200, 200, 404, 500];
    assert_eq!(statuses(&servers), expected);
    assert_eq!(statuses(&clients), expected);
    let fail = servers
        .iter()
        .find(|s| attr_u64(s, "http.response.status_code") == 500)
        .expect("500 span");
    assert_eq!(fail["status"]["code"], "ERROR");
    let missing = servers
        .iter()
        .find(|s| attr_u64(s, "http.response.status_code") == 404)
        .expect("404 span");
    assert_eq!(
        missing["status"]["code"], "UNSET",
        "4xx is not an error on the server side"
    );
    for s in &servers {
        let parent = s["parent_span_id"].as_str().expect("linked to curl's span");
        assert!(clients
            .iter()
            .any(|c| c["span_id"] == parent && c["trace_id"] == s["trace_id"]));
    }
}

#[test]
fn three_pipelined_requests_in_one_write_are_matched_in_order() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-pipe");
    let agent = Agent::start();
    let _nginx = start_nginx(&pods.b, &pods.ip_b, PORT, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let script = format!(
        r#"
import socket
s = socket.create_connection(("{ip}", {PORT}))
s.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\nGET /fail HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
assert data.count(b"HTTP/1.1 ") == 3, data
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &script]);
    run(py);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}");
    for k in ["CLIENT", "SERVER"] {
        let mut side: Vec<_> = spans.iter().filter(|s| kind(s) == k).collect();
        side.sort_by_key(|s| s["start_time_unix_nano"].as_u64());
        let got: Vec<(String, u64)> = side
            .iter()
            .map(|s| {
                (
                    attr_str(s, "url.path").to_owned(),
                    attr_u64(s, "http.response.status_code"),
                )
            })
            .collect();
        let want = [
            ("/ok".to_owned(), 200),
            ("/nope".to_owned(), 404),
            ("/fail".to_owned(), 500),
        ];
        if k == "CLIENT" {
            // All three left in one write: same start, matched in FIFO order.
            let mut got_sorted = got.clone();
            got_sorted.sort();
            let mut want_sorted = want.to_vec();
            want_sorted.sort();
            assert_eq!(got_sorted, want_sorted, "{k}");
        } else {
            assert_eq!(got, want, "{k}");
        }
    }
}

#[test]
fn hundred_concurrent_connections_times_twenty_requests_give_exactly_one_span_pair_each() {
    let _serial = serial();
    let pods = PodPair::new();
    let scratch = Scratch::new("nginx-conc");
    let agent = Agent::start();
    let _nginx = start_nginx(&pods.b, &pods.ip_b, PORT, &scratch.0);
    wait_port(&pods.a, &pods.ip_b, PORT);

    let script = format!(
        r#"
import http.client, threading
errors = []
def worker(i):
    try:
        c = http.client.HTTPConnection("{ip}", {PORT}, timeout=30)
        for j in range(20):
            c.request("GET", f"/ok?c={{i}}&r={{j}}")
            r = c.getresponse()
            r.read()
            assert r.status == 200
        c.close()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not errors, errors
"#,
        ip = pods.ip_b
    );
    let mut py = PodPair::cmd(&pods.a, "python3");
    py.args(["-c", &script]);
    run(py);

    let spans = agent.collect(to_server(&pods.ip_b, PORT), 4000, Duration::from_secs(20));
    let servers = spans.iter().filter(|s| kind(s) == "SERVER").count();
    let clients = spans.iter().filter(|s| kind(s) == "CLIENT").count();
    assert_eq!((servers, clients), (2000, 2000), "stderr: {:?}", agent.stderr());
    let conns: HashSet<u64> = spans.iter().map(|s| attr_u64(s, "client.port")).collect();
    assert_eq!(conns.len(), 100);
    let linked = spans
        .iter()
        .filter(|s| kind(s) == "SERVER" && s["parent_span_id"].is_string())
        .count();
    assert_eq!(linked, 2000, "every server span is linked to its client span");
}
