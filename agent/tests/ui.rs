//! Issue 13, the live service map and trace view: its JSON endpoints on
//! their own (shapes, bounds, empty state, off switch), and a real headless
//! Chromium driven over the DevTools protocol through the page while real
//! traffic runs (curl → Python → Go, and a Go service that answers 500).
mod support;

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;
use support::{chain::*, nodes::*, spans::*, *};

/// GET on the agent's admin server: (status, content type, body).
fn get(agent: &Agent, path: &str) -> (u16, String, String) {
    let addr = agent.metrics_addr.as_deref().expect("admin server on");
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code} %{content_type}",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').expect("curl's status line");
    let (code, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().expect("status code"), ctype.to_owned(), body.to_owned())
}

fn json(agent: &Agent, path: &str) -> Value {
    let (code, ctype, body) = get(agent, path);
    assert_eq!((code, ctype.as_str()), (200, "application/json"), "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

#[test]
fn the_api_answers_empty_state_bounds_and_bad_queries_and_the_page_is_small() {
    let _serial = serial();
    let cluster = Cluster::new(1);
    // Scoped to a node with no pod: nothing is ever traced.
    let scope = cluster.node_cgroup(0).display().to_string();
    let agent = Agent::start_with(&["--ui", "on", "--cgroup", &scope]);
    let graph = json(&agent, "/api/graph?window=60");
    assert_eq!(
        graph,
        serde_json::json!({"window_secs": 60, "nodes": [], "edges": [], "overflow": 0}),
        "empty state"
    );
    assert_eq!(json(&agent, "/api/graph")["window_secs"], 300, "default window 5 m");
    assert_eq!(json(&agent, "/api/traces"), serde_json::json!([]));
    for bad in [
        "/api/graph?window=61",
        "/api/graph?window=x",
        "/api/traces?limit=0",
        "/api/traces?limit=201",
        "/api/traces/xyz",
    ] {
        assert_eq!(get(&agent, bad).0, 400, "{bad} is refused");
    }
    assert_eq!(get(&agent, &format!("/api/traces/{}", "ab".repeat(16))).0, 404);
    let (code, ctype, page) = get(&agent, "/");
    assert_eq!((code, ctype.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.len() < 300 * 1024, "page is {} bytes", page.len());
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
    assert_eq!(get(&agent, "/metrics").0, 200, "metrics still served beside it");

    let off = Agent::start_with(&["--ui", "off", "--cgroup", &scope]);
    assert_eq!(get(&off, "/").0, 404, "--ui off serves no page");
    assert_eq!(get(&off, "/api/graph").0, 404);
}

#[test]
fn a_headless_browser_shows_the_chain_on_the_map_with_its_error_and_a_waterfall_of_its_trace() {
    let _serial = serial();
    let mut cluster = Cluster::new(1);
    let scope = cluster.node_cgroup(0).display().to_string();
    let agent = Agent::start_with(&["--ui", "on", "--cgroup", &scope]);
    let (client, py, leaf, broken) = (
        cluster.pod(0, "app"),
        cluster.pod(0, "python"),
        cluster.pod(0, "leaf"),
        cluster.pod(0, "broken"),
    );
    let go = go_service();
    let _leaf = go_service_on(&go, &leaf, 8090, None);
    // Its downstream is a closed port: every request gets a 500.
    let _broken = go_service_on(&go, &broken, 8093, Some("http://127.0.0.1:9"));
    py.wait_port(&leaf.ip, 8090);
    let _py = python_service(&py, 8091, Some(&format!("http://{}:8090", leaf.ip)));
    client.wait_port(&py.ip, 8091);
    client.wait_port(&broken.ip, 8093);
    for i in 0..10 {
        let ok = run(client.cmd(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}:8091/r/ui{i}", py.ip),
            ],
        ));
        assert_eq!(ok, "200");
        let bad = run(client.cmd(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}:8093/r/bad{i}", broken.ip),
            ],
        ));
        assert_eq!(bad, "500");
    }
    // A trace of the chain, as the exporters saw it: its four spans.
    let (py_addr, leaf_addr) = (format!("{}:8091", py.ip), format!("{}:8090", leaf.ip));
    let mine = |s: &SpanView| s.path() == "/r/ui9" && (s.server() == py_addr || s.server() == leaf_addr);
    let spans = gather(&agent, mine, 4, Duration::from_secs(20));
    let trace = spans
        .iter()
        .find(|s| s.is_server() && s.server() == leaf_addr)
        .expect("go SERVER span")
        .trace_id
        .clone();
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "the chain is one trace\n{}",
        dump(&spans)
    );

    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ui/browse.py");
    let addr = agent.metrics_addr.clone().expect("admin server");
    let out = Command::new("python3")
        // No __pycache__ left in the source tree (cdp.py is imported).
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args([
            script.to_str().expect("utf-8"),
            &format!("http://{addr}/"),
            &trace,
            shots.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run browse.py");
    assert!(
        out.status.success(),
        "browser run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("browse.py's JSON");
    eprintln!("screenshots: {}", seen["screenshots"]);
    eprintln!(
        "first map {:.0} ms, frames {}",
        seen["first_map_ms"].as_f64().unwrap_or(-1.0),
        seen["frame_ms"]
    );

    let nodes: Vec<&str> = seen["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    for name in ["curl", "python3", "chain-go-servic"] {
        assert!(nodes.contains(&name), "node {name} on the map: {nodes:?}");
    }
    let edge = |source: &str, target: &str| -> &Value {
        seen["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .find(|e| e["source"] == source && e["target"] == target)
            .unwrap_or_else(|| panic!("edge {source} → {target}: {}", seen["edges"]))
    };
    for (s, t) in [("curl", "python3"), ("python3", "chain-go-servic")] {
        let e = edge(s, t);
        assert!(e["rps"].as_f64().unwrap_or(0.0) > 0.0, "{s} → {t} has a rate: {e}");
        assert_eq!(e["error_rate"].as_f64(), Some(0.0), "{s} → {t} healthy: {e}");
    }
    // curl calls both python and the broken Go service; the latter's 500s
    // make that edge (and only that one) an error edge, drawn red.
    let bad = edge("curl", "chain-go-servic");
    assert_eq!(bad["error_rate"].as_f64(), Some(1.0), "{bad}");
    assert_eq!(bad["stroke"], "var(--bad)", "an error edge is red");

    let rows = seen["waterfall"].as_array().expect("waterfall rows");
    let mut got: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or("").to_owned(),
                r["service"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    got.sort();
    let want = [
        ("CLIENT", "curl"),
        ("CLIENT", "python3"),
        ("SERVER", "chain-go-servic"),
        ("SERVER", "python3"),
    ];
    assert_eq!(
        got,
        want.map(|(k, s)| (k.to_owned(), s.to_owned())).to_vec(),
        "both sides of both hops in the waterfall"
    );
    assert!(
        rows.iter().all(|r| r["name"] == "GET /r/ui9" && r["error"] == false),
        "{rows:?}"
    );
    let attrs: Vec<&str> = seen["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        attrs.contains(&"url.path") && attrs.contains(&"http.response.status_code"),
        "{attrs:?}"
    );
}
