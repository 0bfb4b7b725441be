//! The OpenTelemetry resource of each traced workload. One agent exports
//! spans for many services, so each span carries its own process's
//! resource, never the agent's.
use std::{collections::HashMap, sync::Arc};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use super::attributes::Value;
use crate::span::{Process, Span};

/// Names the workloads: `service.name` and the resource attributes.
#[derive(Debug)]
pub struct Resources {
    host_name: String,
    extra: Vec<(String, String)>,
    service_names: HashMap<String, String>,
    node_name: Option<String>,
}

/// Identifies a workload for grouping spans by resource: (pid, process
/// name, executable, pod uid).
pub type WorkloadKey = (u32, Arc<str>, Arc<str>, String);

/// The resource key of a span.
pub fn key_of(span: &Span) -> WorkloadKey {
    let uid = span.k8s.as_ref().map(|k| k.pod.uid.clone()).unwrap_or_default();
    let p = &span.process;
    (p.pid, p.name.clone(), p.executable.clone(), uid)
}

/// Whether `span` belongs to workload `key` (no copies made).
pub fn is_of(key: &WorkloadKey, span: &Span) -> bool {
    let p = &span.process;
    let uid = span.k8s.as_ref().map_or("", |k| k.pod.uid.as_str());
    // The process name and executable are shared: the same `Arc` compares
    // without a memcmp.
    let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || **a == **b;
    key.0 == p.pid && same(&key.1, &p.name) && same(&key.2, &p.executable) && key.3 == uid
}

/// A hash of [`key_of`] computed without copies.
pub fn hash_of(span: &Span, hasher: &impl std::hash::BuildHasher) -> u64 {
    let p = &span.process;
    let uid = span.k8s.as_ref().map_or("", |k| k.pod.uid.as_str());
    hasher.hash_one((p.pid, &*p.name, &*p.executable, uid))
}

impl Resources {
    pub fn new(
        extra: Vec<(String, String)>,
        service_names: HashMap<String, String>,
        node_name: Option<String>,
    ) -> Self {
        Self {
            host_name: host_name(),
            extra,
            service_names,
            node_name,
        }
    }

    /// `service.name` of a process by its name: a configured rename, else
    /// the name itself.
    pub fn service_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.service_names.get(name).map_or(name, String::as_str)
    }

    /// `service.name` of a span's workload: a configured rename of the
    /// process (by name, else by executable), else the pod's app label /
    /// workload, else the process's name. Borrowed: named for every span.
    pub fn service_of<'a>(&'a self, span: &'a Span) -> &'a str {
        let p = &span.process;
        let renamed = self
            .service_names
            .get(&*p.name)
            .or_else(|| self.service_names.get(&*p.executable));
        if let Some(name) = renamed {
            return name;
        }
        match &span.k8s {
            // As `PodMeta::service_name`: app label, else workload, else pod name.
            Some(k) => {
                let pod = &k.pod;
                pod.app_label
                    .as_deref()
                    .or_else(|| pod.workload.as_ref().map(|(_, n)| n.as_str()))
                    .unwrap_or(&pod.name)
            }
            None => &p.name,
        }
    }

    /// The resource attributes of a span's workload.
    pub fn attributes_of(&self, span: &Span) -> Vec<(String, Value)> {
        let p: &Process = &span.process;
        let s = |k: &str, v: String| (k.to_owned(), Value::Str(v));
        let mut attrs = vec![
            s("service.name", self.service_of(span).to_owned()),
            s("host.name", self.host_name.clone()),
            ("process.pid".to_owned(), Value::Int(i64::from(p.pid))),
            s("process.executable.name", p.executable.to_string()),
        ];
        if let Some(k) = &span.k8s {
            let pod = &k.pod;
            attrs.push(s("service.namespace", pod.namespace.clone()));
            attrs.push(s("k8s.namespace.name", pod.namespace.clone()));
            attrs.push(s("k8s.pod.name", pod.name.clone()));
            attrs.push(s("k8s.pod.uid", pod.uid.clone()));
            if let Some(c) = &k.container {
                attrs.push(s("k8s.container.name", c.to_string()));
            }
            if let Some((kind, name)) = &pod.workload {
                attrs.push(s(kind.attribute(), name.clone()));
            }
            let node = if pod.node.is_empty() {
                self.node_name.clone()
            } else {
                Some(pod.node.clone())
            };
            if let Some(node) = node {
                attrs.push(s("k8s.node.name", node));
            }
        }
        attrs.extend(SDK_ATTRIBUTES.iter().map(|(k, v)| s(k, (*v).to_owned())));
        attrs.extend(self.extra.iter().map(|(k, v)| s(k, v.clone())));
        attrs
    }
}

/// `telemetry.sdk.*` and the agent that produced the data.
const SDK_ATTRIBUTES: [(&str, &str); 5] = [
    ("telemetry.sdk.name", "opentelemetry"),
    ("telemetry.sdk.language", "rust"),
    ("telemetry.sdk.version", "0.33"),
    ("telemetry.distro.name", "meshless"),
    ("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
];

/// `telemetry.sdk.*` and the agent that produced the data.
pub fn sdk_attributes() -> Vec<KeyValue> {
    SDK_ATTRIBUTES.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect()
}

/// The agent's own resource (self-metrics).
pub fn agent(service_name: &str, extra: &[(String, String)]) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.name", service_name.to_owned()),
        KeyValue::new("host.name", host_name()),
        KeyValue::new("process.pid", i64::from(std::process::id())),
    ];
    attrs.extend(sdk_attributes());
    attrs.extend(extra.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
    Resource::builder_empty().with_attributes(attrs).build()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
