//! The Kubernetes manifests, rendered by `kubectl kustomize` and parsed
//! into the real API types: least privilege, probes, limits, and exactly
//! the environment and mounts the agent reads.
use std::process::Command;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap, rbac::v1::ClusterRole};
use serde::Deserialize;

fn rendered() -> Vec<serde_yaml::Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes");
    let out = Command::new("kubectl")
        .args(["kustomize", dir])
        .output()
        .expect("kubectl is installed by `cargo xtask setup`");
    assert!(
        out.status.success(),
        "kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML document"))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(docs: &[serde_yaml::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"));
    serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind} does not parse as the API type: {e}"))
}

#[test]
fn the_daemonset_is_least_privileged_probed_limited_and_runs_everywhere() {
    let docs = rendered();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.host_pid, Some(true));
    assert!(pod
        .tolerations
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists")));
    let c = &pod.containers[0];
    let sc = c.security_context.clone().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "never privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "no privilege escalation");
    let seccomp = sc
        .seccomp_profile
        .clone()
        .or_else(|| pod.security_context.clone().and_then(|p| p.seccomp_profile))
        .expect("a seccomp profile");
    assert_eq!(
        seccomp.type_, "RuntimeDefault",
        "confined by the runtime's default profile"
    );
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    let mut added = caps.add.expect("added capabilities");
    added.sort();
    assert_eq!(
        added,
        [
            "BPF",
            "DAC_READ_SEARCH",
            "NET_ADMIN",
            "PERFMON",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ]
    );
    assert_eq!(
        c.liveness_probe.clone().and_then(|p| p.http_get).map(|h| h.path),
        Some(Some("/healthz".into()))
    );
    assert_eq!(
        c.readiness_probe.clone().and_then(|p| p.http_get).map(|h| h.path),
        Some(Some("/readyz".into()))
    );
    let res = c.resources.clone().expect("resources");
    for key in ["cpu", "memory"] {
        assert!(
            res.limits.as_ref().is_some_and(|l| l.contains_key(key)),
            "limit on {key}"
        );
        assert!(
            res.requests.as_ref().is_some_and(|r| r.contains_key(key)),
            "request for {key}"
        );
    }
    let node = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node.value_from.and_then(|v| v.field_ref).map(|f| f.field_path),
        Some("spec.nodeName".into())
    );
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    for path in ["/sys/fs/cgroup", "/sys/kernel/tracing", "/sys/kernel/btf"] {
        let m = mounts
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("{path} mounted"));
        assert_eq!(m.read_only, Some(true), "{path} read-only");
    }
}

/// Bytes of a Kubernetes quantity like `256Mi`, with the agent's own parser.
fn bytes(q: &str) -> u64 {
    meshless::config::parse_bytes(q).unwrap_or_else(|e| panic!("{q}: {e}"))
}

#[test]
fn the_memory_budget_leaves_headroom_under_the_container_limit() {
    let docs = rendered();
    let ds: DaemonSet = one(&docs, "DaemonSet");
    let c = ds.spec.template.spec.expect("pod spec").containers[0].clone();
    let limit = c
        .resources
        .and_then(|r| r.limits)
        .and_then(|l| l.get("memory").cloned())
        .expect("memory limit");
    let budget = c
        .env
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "MESHLESS_MEMORY_LIMIT")
        .and_then(|e| e.value)
        .expect("MESHLESS_MEMORY_LIMIT set next to the limit");
    let (budget, limit) = (bytes(&budget), bytes(&limit.0));
    assert!(
        budget * 2 <= limit,
        "budget {budget} must leave room for code, ring buffer and slack under {limit}"
    );
}

#[test]
fn the_cluster_role_only_reads_what_the_agent_watches() {
    let docs = rendered();
    let role: ClusterRole = one(&docs, "ClusterRole");
    let mut resources = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        for verb in &rule.verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "read-only, got {verb}"
            );
        }
        resources.extend(rule.resources.unwrap_or_default());
    }
    resources.sort();
    assert_eq!(resources, ["endpointslices", "pods", "services"]);
}

#[test]
fn every_configured_variable_is_one_the_agent_reads() {
    let docs = rendered();
    let cm: ConfigMap = one(&docs, "ConfigMap");
    let help = Command::new(env!("CARGO_BIN_EXE_meshless"))
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut names: Vec<String> = cm.data.unwrap_or_default().into_keys().collect();
    names.push("NODE_NAME".into());
    for name in names {
        assert!(
            help.contains(&format!("[env: {name}")),
            "the agent does not read {name}"
        );
    }
}
