//! The OpenTelemetry resource of each traced workload. One agent exports
//! spans for many services, so each span carries its own process's
//! resource, never the agent's.
use std::{collections::HashMap, sync::Arc};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::span::{Process, Span};

/// Resources kept at most; the cache is cleared past it (rebuilt on demand).
const MAX_CACHED: usize = 4096;

/// Builds and caches per-process resources.
#[derive(Debug)]
pub struct Resources {
    host_name: String,
    extra: Vec<(String, String)>,
    service_names: HashMap<String, String>,
    cache: HashMap<WorkloadKey, Resource>,
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
            cache: HashMap::new(),
            node_name,
        }
    }

    /// `service.name` of a process by its name: a configured rename, else
    /// the name itself.
    pub fn service_name(&self, name: &str) -> String {
        self.service_names.get(name).cloned().unwrap_or_else(|| name.to_owned())
    }

    /// `service.name` of a span's workload: a configured rename of the
    /// process (by name, else by executable), else the pod's app label /
    /// workload, else the process's name.
    pub fn service_of(&self, span: &Span) -> String {
        let p = &span.process;
        let renamed = self
            .service_names
            .get(&*p.name)
            .or_else(|| self.service_names.get(&*p.executable));
        if let Some(name) = renamed {
            return name.clone();
        }
        span.k8s
            .as_ref()
            .map_or_else(|| p.name.to_string(), |k| k.pod.service_name())
    }

    pub fn get(&mut self, span: &Span) -> Resource {
        let key = key_of(span);
        if let Some(r) = self.cache.get(&key) {
            return r.clone();
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        let p: &Process = &span.process;
        let mut attrs = vec![
            KeyValue::new("service.name", self.service_of(span)),
            KeyValue::new("host.name", self.host_name.clone()),
            KeyValue::new("process.pid", i64::from(p.pid)),
            KeyValue::new("process.executable.name", p.executable.to_string()),
        ];
        if let Some(k) = &span.k8s {
            let pod = &k.pod;
            attrs.push(KeyValue::new("service.namespace", pod.namespace.clone()));
            attrs.push(KeyValue::new("k8s.namespace.name", pod.namespace.clone()));
            attrs.push(KeyValue::new("k8s.pod.name", pod.name.clone()));
            attrs.push(KeyValue::new("k8s.pod.uid", pod.uid.clone()));
            if let Some(c) = &k.container {
                attrs.push(KeyValue::new("k8s.container.name", c.clone()));
            }
            if let Some((kind, name)) = &pod.workload {
                attrs.push(KeyValue::new(kind.attribute(), name.clone()));
            }
            let node = if pod.node.is_empty() {
                self.node_name.clone()
            } else {
                Some(pod.node.clone())
            };
            if let Some(node) = node {
                attrs.push(KeyValue::new("k8s.node.name", node));
            }
        }
        attrs.extend(sdk_attributes());
        attrs.extend(self.extra.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())));
        let r = Resource::builder_empty().with_attributes(attrs).build();
        self.cache.insert(key, r.clone());
        r
    }
}

/// `telemetry.sdk.*` and the agent that produced the data.
pub fn sdk_attributes() -> Vec<KeyValue> {
    vec![
        KeyValue::new("telemetry.sdk.name", "opentelemetry"),
        KeyValue::new("telemetry.sdk.language", "rust"),
        KeyValue::new("telemetry.sdk.version", "0.33"),
        KeyValue::new("telemetry.distro.name", "meshless"),
        KeyValue::new("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ]
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
