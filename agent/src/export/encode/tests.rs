use std::collections::HashMap;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value::Value as Any, AnyValue},
};
use prost::Message;

use super::*;
use crate::{
    span::{Process, Span, SpanKind},
    trace_context::{SpanId, TraceId},
};

pub(crate) fn span(pid: u32, path: &str) -> Span {
    Span {
        trace_id: TraceId([1; 16]),
        span_id: SpanId([2; 8]),
        parent_span_id: Some(SpanId([3; 8])),
        sampled: true,
        parent_is_remote: true,
        trace_state: Some("vendor=x".into()),
        kind: SpanKind::Server,
        start_unix_nano: 1_800_000_000_000_000_000,
        end_unix_nano: 1_800_000_000_001_000_000,
        method: "GET".into(),
        request: crate::span::RequestText::new(path, Some("curl/8")),
        status_code: Some(503),
        protocol_version: "1.1",
        tls: false,
        rpc: None,
        client: Some("10.0.0.1:40000".parse().expect("addr")),
        server: Some("[::1]:8080".parse().expect("addr")),
        process: Process {
            pid,
            tid: pid + 1,
            name: "server".into(),
            executable: "server-bin".into(),
            thread: "worker".into(),
            cgroup_id: 1,
        },
        peer_comm: None,
        peer_process: None,
        resolved_server: None,
        k8s: None,
        peer_k8s: None,
        request_headers: vec![("x-id".into(), "7".into())],
        response_headers: Vec::new(),
        truncated: false,
        unanswered: None,
    }
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::ArrayValue(a)) => format!(
            "{:?}",
            a.values.iter().map(|v| text(&Some(v.clone()))).collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

fn encoder() -> Encoder {
    Encoder::new(
        Resources::new(
            vec![("deployment.environment.name".into(), "test".into())],
            Default::default(),
            None,
        ),
        attributes::Options::default(),
    )
}

/// A request's resource attributes as text, by key.
fn resource_attributes(rs: &opentelemetry_proto::tonic::trace::v1::ResourceSpans) -> HashMap<String, String> {
    rs.resource
        .as_ref()
        .expect("resource")
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

fn decode_all(enc: &mut Encoder, spans: &[Span], max: usize) -> (Vec<ExportTraceServiceRequest>, Vec<u32>) {
    let mut requests = Vec::new();
    let oversize = enc.encode(spans, max, |bytes, members| {
        let req = ExportTraceServiceRequest::decode(bytes).expect("valid protobuf");
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(n, members.len());
        assert!(bytes.len() <= max);
        requests.push(req);
    });
    (requests, oversize)
}

#[test]
fn a_span_decodes_with_the_official_protobufs_carrying_every_field() {
    let (requests, oversize) = decode_all(&mut encoder(), &[span(40, "/users/42?q=1")], usize::MAX);
    assert!(oversize.is_empty());
    let [req] = &requests[..] else {
        panic!("one request: {requests:?}")
    };
    let rs = &req.resource_spans[0];
    let res = resource_attributes(rs);
    assert_eq!(res["service.name"], "server");
    assert_eq!(res["process.pid"], "40");
    assert_eq!(res["process.executable.name"], "server-bin");
    assert_eq!(res["deployment.environment.name"], "test");
    assert_eq!(res["telemetry.distro.name"], "meshless");
    let scope = &rs.scope_spans[0];
    assert_eq!(scope.scope.as_ref().map(|s| s.name.as_str()), Some("meshless"));
    let s = &scope.spans[0];
    assert_eq!(s.trace_id, vec![1; 16]);
    assert_eq!(s.span_id, vec![2; 8]);
    assert_eq!(s.parent_span_id, vec![3; 8]);
    assert_eq!(s.trace_state, "vendor=x");
    assert_eq!(s.name, "GET /users/*");
    assert_eq!(s.kind, 2);
    assert_eq!(s.flags, 0x301);
    assert_eq!(
        (s.start_time_unix_nano, s.end_time_unix_nano),
        (1_800_000_000_000_000_000, 1_800_000_000_001_000_000)
    );
    let status = s.status.as_ref().expect("status");
    assert_eq!((status.code, status.message.as_str()), (2, "HTTP 503"));
    let attrs: HashMap<_, _> = s
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect();
    assert_eq!(attrs["http.request.method"], "GET");
    assert_eq!(attrs["url.path"], "/users/42");
    assert!(!attrs.contains_key("url.query"));
    assert_eq!(attrs["http.response.status_code"], "503");
    assert_eq!(attrs["server.address"], "::1");
    assert_eq!(attrs["server.port"], "8080");
    assert_eq!(attrs["client.address"], "10.0.0.1");
    assert_eq!(attrs["network.peer.port"], "40000");
    assert_eq!(attrs["user_agent.original"], "curl/8");
    assert_eq!(attrs["error.type"], "503");
    assert_eq!(attrs["thread.name"], "worker");
    assert_eq!(attrs["thread.id"], "41");
    assert_eq!(attrs["http.request.header.x-id"], "[\"7\"]");
    assert_eq!(attrs.len(), s.attributes.len(), "no attribute twice");
}

#[test]
fn one_request_carries_every_workload_each_under_its_own_resource() {
    let spans: Vec<Span> = (0..30).map(|i| span(100 + i % 3, &format!("/p/{i}"))).collect();
    let (requests, _) = decode_all(&mut encoder(), &spans, usize::MAX);
    assert_eq!(requests.len(), 1);
    let mut pids: Vec<String> = requests[0]
        .resource_spans
        .iter()
        .map(|rs| {
            assert_eq!(rs.scope_spans[0].spans.len(), 10);
            let attrs = &rs.resource.as_ref().expect("resource").attributes;
            text(&attrs.iter().find(|kv| kv.key == "process.pid").expect("pid").value)
        })
        .collect();
    pids.sort();
    assert_eq!(pids, ["100", "101", "102"]);
}

#[test]
fn requests_are_split_under_the_limit_and_an_oversized_span_is_refused() {
    let mut spans: Vec<Span> = (0..40).map(|i| span(7, &format!("/p/{i}"))).collect();
    spans[5].request_headers = vec![("x-big".into(), "b".repeat(5000))];
    let (requests, oversize) = decode_all(&mut encoder(), &spans, 4000);
    assert_eq!(oversize, vec![5]);
    assert!(requests.len() > 1);
    let n: usize = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    assert_eq!(n, 39);
}

/// Attribute lengths across the one- to two-byte length boundaries (the
/// key/value's, the value's, the string's) decode to what was written.
#[test]
fn attributes_on_either_side_of_a_one_byte_length_decode_whole() {
    for n in 100..=140 {
        let path = format!("/{}", "p".repeat(n));
        let (requests, _) = decode_all(&mut encoder(), &[span(40, &path)], usize::MAX);
        let s = &requests[0].resource_spans[0].scope_spans[0].spans[0];
        let attrs: HashMap<_, _> = s
            .attributes
            .iter()
            .map(|kv| (kv.key.clone(), text(&kv.value)))
            .collect();
        assert_eq!(attrs["url.path"], path, "path of {} bytes", path.len());
        assert_eq!(attrs["http.request.method"], "GET");
    }
}

/// Attributes of an encoded span as (key, text) pairs, sorted.
fn decoded_attributes(s: &opentelemetry_proto::tonic::trace::v1::Span) -> Vec<(String, String)> {
    let mut a: Vec<_> = s
        .attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect();
    a.sort();
    a
}

/// What `attributes::of` says of a span, as the encoder's text.
fn expected_attributes(span: &Span) -> Vec<(String, String)> {
    let mut a: Vec<_> = attributes::of(span, attributes::Options::default())
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                attributes::Value::Str(s) => s,
                attributes::Value::Int(i) => i.to_string(),
                attributes::Value::Bool(b) => b.to_string(),
                attributes::Value::StrArray(a) => format!("{a:?}"),
            };
            (k.into_owned(), v)
        })
        .collect();
    a.sort();
    a
}

#[test]
fn connection_attributes_reused_from_an_earlier_span_are_each_spans_own() {
    // Each span differs from the first in one thing the connection's
    // attributes depend on; encoded after it (twice over, so the second
    // round copies from the cache), none may carry the first one's.
    let base = span(40, "/a");
    let mut variants = vec![base.clone()];
    let mut vary = |f: &dyn Fn(&mut Span)| {
        let mut s = base.clone();
        f(&mut s);
        variants.push(s);
    };
    vary(&|s| s.client = Some("10.0.0.1:40001".parse().expect("addr")));
    vary(&|s| s.client = Some("10.0.0.2:40000".parse().expect("addr")));
    vary(&|s| s.server = Some("[::1]:8081".parse().expect("addr")));
    vary(&|s| s.server = None);
    vary(&|s| s.resolved_server = Some("10.0.0.9:80".parse().expect("addr")));
    vary(&|s| s.tls = true);
    vary(&|s| s.kind = SpanKind::Client);
    vary(&|s| s.protocol_version = "1.0");
    vary(&|s| s.process.tid = 99);
    vary(&|s| s.process.thread = "other".into());
    vary(&|s| s.process.pid = 41);
    vary(&|s| s.request = crate::span::RequestText::new("http://example.com:81/a", Some("curl/8")));
    vary(&|s| s.request = crate::span::RequestText::new("/b", Some("wget")));
    vary(&|s| s.status_code = Some(200));
    for fqdn in ["web.default.svc.cluster.local", "api.default.svc.cluster.local"] {
        let peer = std::sync::Arc::new(crate::k8s::PeerK8s {
            service_fqdn: Some(fqdn.into()),
            ..Default::default()
        });
        vary(&|s| {
            s.kind = SpanKind::Client;
            s.peer_k8s = Some(peer.clone());
        });
    }
    let mut enc = encoder();
    for round in 0..2 {
        for v in &variants {
            let (requests, _) = decode_all(&mut enc, std::slice::from_ref(v), usize::MAX);
            let s = &requests[0].resource_spans[0].scope_spans[0].spans[0];
            assert_eq!(decoded_attributes(s), expected_attributes(v), "round {round}: {v:?}");
        }
    }
}

#[test]
fn spans_of_more_workloads_than_are_remembered_each_go_under_their_own_resource() {
    // Workloads told apart by pid, by name under one pid (an exec), and by
    // pod; more of them than `RECENT`, interleaved, over two batches.
    let pod = |uid: &str| {
        std::sync::Arc::new(crate::k8s::PodMeta {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            node: String::new(),
            ips: Vec::new(),
            app_label: None,
            workload: None,
            containers: Vec::new(),
            opted_out: false,
            istio: Default::default(),
        })
    };
    // Clones share their names' objects: only what differs tells them apart.
    let mut workloads: Vec<Span> = (0..5).map(|i| span(100 + i, "/")).collect();
    let mut exec = workloads[0].clone();
    exec.process.name = "renamed".into();
    workloads.push(exec);
    let mut other_pid = workloads[1].clone();
    other_pid.process.pid = 300;
    workloads.push(other_pid);
    let in_pod = span(200, "/");
    for uid in ["a", "b"] {
        let mut s = in_pod.clone();
        s.k8s = Some(crate::k8s::SpanK8s {
            pod: pod(uid),
            container: None,
            service_fqdn: None,
        });
        workloads.push(s);
    }
    let resource_of = |s: &Span| {
        let uid = s.k8s.as_ref().map_or("-", |k| k.pod.uid.as_str());
        format!("{} {} {}", s.process.pid, s.process.name, uid)
    };
    let mut enc = encoder();
    for batch in 0..2 {
        let spans: Vec<Span> = (0..40)
            .map(|i| workloads[(i * 5 + batch) % workloads.len()].clone())
            .collect();
        let (requests, _) = decode_all(&mut enc, &spans, usize::MAX);
        let mut seen = Vec::new();
        for rs in &requests[0].resource_spans {
            let attrs = resource_attributes(rs);
            let uid = attrs.get("k8s.pod.uid").map_or("-", String::as_str);
            let name = if attrs.contains_key("k8s.pod.uid") {
                // A pod's service is named by the pod, not the process.
                "server".to_owned()
            } else {
                attrs["service.name"].clone()
            };
            seen.push((
                format!("{} {} {}", attrs["process.pid"], name, uid),
                rs.scope_spans[0].spans.len(),
            ));
        }
        seen.sort();
        let mut want: Vec<(String, usize)> = workloads
            .iter()
            .map(|w| {
                (
                    resource_of(w),
                    spans.iter().filter(|s| resource_of(s) == resource_of(w)).count(),
                )
            })
            .collect();
        want.sort();
        assert_eq!(seen, want, "batch {batch}");
    }
}
