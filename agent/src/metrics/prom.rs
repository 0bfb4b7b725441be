//! Prometheus series (text exposition via prometheus-client).
use std::{
    hash::BuildHasher,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, gauge::ConstGauge, histogram::Histogram, MetricType},
    registry::{Registry, Unit},
};

use super::{
    bounded::{Bounded, BoundedPair, SeriesLimits},
    duration_secs, PeerSources, Peers, ISTIO_BUCKETS, SEMCONV_BUCKETS, UNKNOWN,
};
use crate::{
    k8s::{PeerK8s, PodMeta},
    span::{ErrorType, Span, SpanKind},
    stats::Stats,
    text::{StackText, Text},
};

/// All Prometheus series of the agent; every traffic-labelled family is
/// [`Bounded`] (series cap with an overflow series, stale series expire).
#[derive(Debug)]
pub struct Prometheus {
    registry: Registry,
    server_duration: Bounded<Histogram>,
    client_duration: Bounded<Histogram>,
    /// Istio's request count and duration: the same 25 labels, one lookup.
    istio: BoundedPair<Counter, Histogram>,
    /// Their series by what the labels are made from (see [`Memo`]).
    istio_memo: Mutex<Memo<MemoEntry>>,
    /// The semconv duration series likewise (see [`SemconvKey`]).
    semconv_memo: Mutex<Memo<SemconvEntry>>,
    /// For the overflow count of writes the cache serves.
    stats: Arc<Stats>,
    /// Series times are seconds since this (see [`Bounded::with_at`]).
    epoch: std::time::Instant,
}

fn semconv_hist() -> Histogram {
    Histogram::new(SEMCONV_BUCKETS)
}

fn istio_hist() -> Histogram {
    Histogram::new(ISTIO_BUCKETS)
}

impl Prometheus {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self::with_limits(stats, SeriesLimits::default())
    }

    pub fn with_limits(stats: Arc<Stats>, limits: SeriesLimits) -> Self {
        let mut registry = Registry::default();
        let server_duration = Bounded::new(semconv_hist as fn() -> Histogram, limits, stats.clone());
        let client_duration = Bounded::new(semconv_hist as fn() -> Histogram, limits, stats.clone());
        let istio = BoundedPair::pair(
            Counter::default as fn() -> Counter,
            istio_hist as fn() -> Histogram,
            limits,
            stats.clone(),
        );
        let (istio_requests, istio_duration) = istio.families();
        registry.register_with_unit(
            "http_server_request_duration",
            "Duration of HTTP server requests (OTel http.server.request.duration)",
            Unit::Seconds,
            server_duration.family(),
        );
        registry.register_with_unit(
            "http_client_request_duration",
            "Duration of HTTP client requests (OTel http.client.request.duration)",
            Unit::Seconds,
            client_duration.family(),
        );
        registry.register("istio_requests", "Requests, Istio standard metric", istio_requests);
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, Istio standard metric",
            istio_duration,
        );
        registry.register_collector(Box::new(SelfMetrics(stats.clone())));
        Self {
            registry,
            server_duration,
            client_duration,
            istio,
            istio_memo: Mutex::default(),
            semconv_memo: Mutex::default(),
            stats,
            epoch: std::time::Instant::now(),
        }
    }

    /// The second of [`Self::epoch`] it is now: read once per batch of
    /// spans and given to [`Self::record_at`] (a clock read per span was
    /// a vDSO call each).
    pub fn second(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Records one request at second `now_secs` of [`Self::epoch`]
    /// ([`Self::second`]; tests drive time). Label values are borrowed or
    /// formatted on the stack: an existing series is written without
    /// allocating. Of `peers`, only its sources are read (the Istio labels
    /// are made from them, see [`IstioKey`]).
    pub fn record_at(&self, span: &Span, service_name: &str, peers: &Peers, now_secs: u64) {
        let secs = duration_secs(span);
        self.record_semconv(span, service_name, secs, now_secs);
        debug_assert_eq!(peers.sources.kind, span.kind, "peers of another span");
        let key = IstioKey {
            sources: peers.sources,
            outcome: Outcome {
                status: span.status_code,
                grpc_status: span.grpc_status(),
                flags: span.unanswered.map_or("-", |u| u.response_flags(span.kind)),
                grpc: span.rpc.is_some(),
            },
        };
        let ms = secs * 1000.0;
        let mut memo = self.istio_memo.lock().unwrap_or_else(|e| e.into_inner());
        let hash = key.hash(&memo.hasher);
        let known = memo.get_mut(hash, |e| key.is(e));
        if let Some(entry) = known.as_ref().filter(|e| e.second == now_secs) {
            entry.requests.inc();
            entry.duration.observe(ms);
            if entry.overflow {
                // Counted per write, as the family counts the ones it takes.
                Stats::inc(&self.stats.metric_series_overflow);
            }
            return;
        }
        // New, or last looked up in an earlier second: through the family,
        // which refreshes the series' expiry (and may have replaced it).
        // Istio reports "0" for requests that got no response.
        let status = StackText::<8>::number(u64::from(span.status_code.unwrap_or(0)));
        let grpc_status = match key.outcome.grpc_status {
            Some(code) => StackText::<12>::number(u64::from(code)),
            None => StackText::default(),
        };
        let labels = istio_labels(&key, status.as_str(), grpc_status.as_str());
        let mut handles = None;
        let overflow = self.istio.with_at(&labels, now_secs, |(requests, duration)| {
            requests.inc();
            duration.observe(ms);
            handles = Some((requests.clone(), duration.clone()));
        });
        let Some((requests, duration)) = handles else {
            return;
        };
        match known {
            Some(entry) => {
                (entry.requests, entry.duration, entry.second) = (requests, duration, now_secs);
                entry.overflow = overflow;
            }
            None => memo.insert(hash, MemoEntry::new(&key, (requests, duration, overflow), now_secs)),
        }
    }

    /// The semconv request duration (`http.{server,client}.request.duration`)
    /// of one request: through [`Self::semconv_memo`] within the second
    /// its series was last looked up, else through the family (as the
    /// Istio series, see [`Memo`]).
    fn record_semconv(&self, span: &Span, service_name: &str, secs: f64, now_secs: u64) {
        let key = SemconvKey::of(span, service_name);
        let mut memo = self.semconv_memo.lock().unwrap_or_else(|e| e.into_inner());
        let hash = memo.hasher.hash_one(key);
        let known = memo.get_mut(hash, |e| key.is(e));
        if let Some(entry) = known.as_ref().filter(|e| e.second == now_secs) {
            entry.histogram.observe(secs);
            if entry.overflow {
                Stats::inc(&self.stats.metric_series_overflow);
            }
            return;
        }
        // Istio reports "0" for requests that got no response; so does this.
        let status = StackText::<8>::number(u64::from(key.status.unwrap_or(0)));
        let port = match key.port {
            Some(p) => StackText::<8>::number(u64::from(p)),
            None => StackText::default(),
        };
        let ip;
        let server_address = match key.server {
            ServerAddress::Host(host) => host,
            ServerAddress::Ip(addr) => {
                ip = Text::ip(addr);
                ip.as_str()
            }
            ServerAddress::Unknown => "",
        };
        let error_type = match key.error {
            Some(e) => StackText::<32>::of(e),
            None => StackText::default(),
        };
        let labels = [
            ("service_name", key.service_name),
            ("http_request_method", key.method),
            ("http_response_status_code", status.as_str()),
            ("network_protocol_version", key.protocol_version),
            ("server_address", server_address),
            ("server_port", port.as_str()),
            ("error_type", error_type.as_str()),
        ];
        let durations = match key.kind {
            SpanKind::Server => &self.server_duration,
            SpanKind::Client => &self.client_duration,
        };
        let mut handle = None;
        let overflow = durations.with_at(&labels, now_secs, |h| {
            h.observe(secs);
            handle = Some(h.clone());
        });
        let Some(histogram) = handle else {
            return;
        };
        match known {
            Some(entry) => (entry.histogram, entry.overflow, entry.second) = (histogram, overflow, now_secs),
            None => memo.insert(hash, SemconvEntry::new(&key, histogram, overflow, now_secs)),
        }
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Most entries a [`Memo`] keeps; it starts over past it.
const MAX_MEMO: usize = 4096;

/// What a span's 25 Istio labels are made from: its peers' sources and its
/// own few values. Equal keys make equal labels ([`istio_labels`] reads
/// nothing else), so a span whose key is known skips building, hashing
/// and comparing them.
#[derive(Debug, Clone, Copy)]
struct IstioKey<'a> {
    sources: PeerSources<'a>,
    outcome: Outcome,
}

/// How a request ended, as far as Istio's labels tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Outcome {
    status: Option<u16>,
    grpc_status: Option<u32>,
    /// Istio's response flags (`-` when answered).
    flags: &'static str,
    grpc: bool,
}

impl IstioKey<'_> {
    /// Metadata by address (an entry keeps its objects alive, so an
    /// address is never another object's while the entry exists), names
    /// and values by content.
    fn hash(&self, hasher: &impl BuildHasher) -> u64 {
        let s = &self.sources;
        hasher.hash_one((
            s.kind,
            s.pod.map_or(0, |p| Arc::as_ptr(p) as usize),
            s.own_service.map_or(0, |p| Arc::as_ptr(p) as *const u8 as usize),
            s.peer.map_or(0, |p| Arc::as_ptr(p) as usize),
            s.service_name,
            s.peer_workload,
            self.outcome,
        ))
    }

    fn is(&self, e: &MemoEntry) -> bool {
        fn same<T: ?Sized>(a: Option<&Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        let s = &self.sources;
        s.kind == e.kind
            && same(s.pod, &e.pod)
            && same(s.own_service, &e.own_service)
            && same(s.peer, &e.peer)
            && *s.service_name == *e.service_name
            && *s.peer_workload == *e.peer_workload
            && self.outcome == e.outcome
    }
}

/// One [`IstioKey`], owned, with the handles of its series.
#[derive(Debug)]
struct MemoEntry {
    kind: SpanKind,
    pod: Option<Arc<PodMeta>>,
    own_service: Option<Arc<str>>,
    peer: Option<Arc<PeerK8s>>,
    service_name: Box<str>,
    peer_workload: Box<str>,
    outcome: Outcome,
    requests: Counter,
    duration: Histogram,
    /// The handles are the overflow series'.
    overflow: bool,
    /// The second (of [`Prometheus::epoch`]) the handles were looked up
    /// through the family; they are used only within it.
    second: u64,
}

impl MemoEntry {
    fn new(key: &IstioKey<'_>, (requests, duration, overflow): (Counter, Histogram, bool), second: u64) -> Self {
        let s = &key.sources;
        Self {
            kind: s.kind,
            pod: s.pod.cloned(),
            own_service: s.own_service.cloned(),
            peer: s.peer.cloned(),
            service_name: s.service_name.into(),
            peer_workload: s.peer_workload.into(),
            outcome: key.outcome,
            requests,
            duration,
            overflow,
            second,
        }
    }
}

/// Series handles by what their labels are made from ([`IstioKey`],
/// [`SemconvKey`]). A hit skips the family's label lookup only within the
/// second the entry was last looked up through the family: the first write
/// of each second goes through it, so a series in use never expires, and a
/// series that was replaced (expired, or the family went over its cap) is
/// found again. Bounded by [`MAX_MEMO`].
#[derive(Debug)]
struct Memo<E> {
    /// By key hash; a bucket holds more than one entry only on a collision.
    entries: foldhash::HashMap<u64, Vec<E>>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<E> Default for Memo<E> {
    fn default() -> Self {
        Self {
            entries: Default::default(),
            len: 0,
            hasher: Default::default(),
        }
    }
}

impl<E> Memo<E> {
    fn get_mut(&mut self, hash: u64, is: impl Fn(&E) -> bool) -> Option<&mut E> {
        self.entries.get_mut(&hash)?.iter_mut().find(|e| is(e))
    }

    fn insert(&mut self, hash: u64, entry: E) {
        if self.len >= MAX_MEMO {
            self.entries.clear();
            self.len = 0;
        }
        self.entries.entry(hash).or_default().push(entry);
        self.len += 1;
    }
}

/// What a span's semconv duration labels are made from, as values (no
/// text is formatted for a span whose key is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SemconvKey<'a> {
    kind: SpanKind,
    service_name: &'a str,
    method: &'a str,
    status: Option<u16>,
    protocol_version: &'static str,
    /// Of a client request (a server's is empty).
    server: ServerAddress<'a>,
    port: Option<u16>,
    error: Option<ErrorType>,
}

impl<'a> SemconvKey<'a> {
    fn of(span: &'a Span, service_name: &'a str) -> Self {
        Self {
            kind: span.kind,
            service_name,
            method: span.method_label(),
            status: span.status_code,
            protocol_version: span.protocol_version,
            server: match span.kind {
                SpanKind::Client => client_server_address(span),
                SpanKind::Server => ServerAddress::Unknown,
            },
            port: span.server.map(|s| s.port()),
            error: span.error_kind(),
        }
    }

    fn is(&self, e: &SemconvEntry) -> bool {
        let server = match (&e.server, self.server) {
            (OwnedServerAddress::Host(a), ServerAddress::Host(b)) => **a == *b,
            (OwnedServerAddress::Ip(a), ServerAddress::Ip(b)) => *a == b,
            (OwnedServerAddress::Unknown, ServerAddress::Unknown) => true,
            _ => false,
        };
        server
            && self.kind == e.kind
            && self.status == e.status
            && self.port == e.port
            && self.error == e.error
            && self.protocol_version == e.protocol_version
            && self.method == &*e.method
            && self.service_name == &*e.service_name
    }
}

/// [`ServerAddress`], owned.
#[derive(Debug)]
enum OwnedServerAddress {
    Host(Box<str>),
    Ip(std::net::IpAddr),
    Unknown,
}

/// One [`SemconvKey`], owned, with the handle of its series.
#[derive(Debug)]
struct SemconvEntry {
    kind: SpanKind,
    service_name: Box<str>,
    method: Box<str>,
    status: Option<u16>,
    protocol_version: &'static str,
    server: OwnedServerAddress,
    port: Option<u16>,
    error: Option<ErrorType>,
    histogram: Histogram,
    /// The handle is the overflow series'.
    overflow: bool,
    /// As [`MemoEntry::second`].
    second: u64,
}

impl SemconvEntry {
    fn new(key: &SemconvKey<'_>, histogram: Histogram, overflow: bool, second: u64) -> Self {
        Self {
            kind: key.kind,
            service_name: key.service_name.into(),
            method: key.method.into(),
            status: key.status,
            protocol_version: key.protocol_version,
            server: match key.server {
                ServerAddress::Host(h) => OwnedServerAddress::Host(h.into()),
                ServerAddress::Ip(ip) => OwnedServerAddress::Ip(ip),
                ServerAddress::Unknown => OwnedServerAddress::Unknown,
            },
            port: key.port,
            error: key.error,
            histogram,
            overflow,
            second,
        }
    }
}

/// Istio's standard label set, in its order and with its placeholders (no
/// mTLS identity here: principals are unknown, and the destination reports
/// its connection security policy as none). Made from `key` alone (the
/// peers from its sources, not the caller's), so that equal keys make equal
/// labels; `status` and `grpc_status` are its codes as text.
fn istio_labels<'a>(key: &IstioKey<'a>, status: &'a str, grpc_status: &'a str) -> [(&'static str, &'a str); 25] {
    let kind = key.sources.kind;
    let peers = Peers::from_sources(key.sources);
    let (src, dst) = (&peers.source, &peers.destination);
    [
        (
            "reporter",
            match kind {
                SpanKind::Server => "destination",
                SpanKind::Client => "source",
            },
        ),
        ("source_workload", peers.source_workload),
        ("source_workload_namespace", peers.source_namespace),
        ("source_principal", UNKNOWN),
        ("source_app", src.app),
        ("source_version", src.version),
        ("source_cluster", src.cluster),
        ("source_canonical_service", src.canonical_service),
        ("source_canonical_revision", src.canonical_revision),
        ("destination_workload", peers.destination_workload),
        ("destination_workload_namespace", peers.destination_namespace),
        ("destination_principal", UNKNOWN),
        ("destination_app", dst.app),
        ("destination_version", dst.version),
        ("destination_service", peers.destination_service),
        ("destination_service_name", peers.destination_service_name),
        ("destination_service_namespace", peers.destination_service_namespace),
        ("destination_cluster", dst.cluster),
        ("destination_canonical_service", dst.canonical_service),
        ("destination_canonical_revision", dst.canonical_revision),
        ("request_protocol", if key.outcome.grpc { "grpc" } else { "http" }),
        ("response_code", status),
        ("grpc_response_status", grpc_status),
        ("response_flags", key.outcome.flags),
        (
            "connection_security_policy",
            match kind {
                SpanKind::Server => "none",
                SpanKind::Client => UNKNOWN,
            },
        ),
    ]
}

/// `server.address` of a client request: the host its target names
/// (absolute or authority form), else the peer's IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ServerAddress<'a> {
    Host(&'a str),
    Ip(std::net::IpAddr),
    Unknown,
}

impl std::fmt::Display for ServerAddress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddress::Host(h) => f.write_str(h),
            ServerAddress::Ip(ip) => write!(f, "{ip}"),
            ServerAddress::Unknown => Ok(()),
        }
    }
}

pub(super) fn client_server_address(span: &Span) -> ServerAddress<'_> {
    match span.target_authority() {
        Some((host, _)) => ServerAddress::Host(crate::http::cut(host, 256)),
        None => span
            .server
            .map_or(ServerAddress::Unknown, |s| ServerAddress::Ip(s.ip())),
    }
}

/// Each kernel program's runs and time (`--kernel-stats`; nothing without it).
fn encode_program_times(stats: &Stats, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let programs = stats.kernel_programs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if programs.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(
        "meshless_kernel_program_runs",
        "Runs of each kernel program (--kernel-stats; a tail-called program counts under its caller).",
        None,
        MetricType::Counter,
    )?;
    for p in &programs {
        ConstCounter::new(p.runs).encode(metric.encode_family(&[("program", p.program.as_str())])?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "meshless_kernel_program_seconds",
        "Time each kernel program took inside the traced applications' syscalls (--kernel-stats).",
        None,
        MetricType::Counter,
    )?;
    for p in &programs {
        let secs = p.nanos as f64 / 1e9;
        ConstCounter::new(secs).encode(metric.encode_family(&[("program", p.program.as_str())])?)?;
    }
    Ok(())
}

/// Self-metrics that are levels, not totals.
const GAUGES: [&str; 6] = [
    "correlator_state_bytes",
    "conns_tracked",
    "kernel_conn_entries",
    "kernel_addr_entries",
    "kernel_ringbuf_used_bytes",
    "kernel_ringbuf_size_bytes",
];

/// The agent's own counters, read from [`Stats`] at scrape time.
#[derive(Debug)]
struct SelfMetrics(Arc<Stats>);

impl Collector for SelfMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in self.0.described() {
            let full_name = format!("meshless_{name}");
            if GAUGES.contains(&name) {
                let gauge = ConstGauge::new(value as i64);
                let metric = encoder.encode_descriptor(&full_name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            } else {
                let counter = ConstCounter::new(value);
                let metric = encoder.encode_descriptor(&full_name, help, None, counter.metric_type())?;
                counter.encode(metric)?;
            }
        }
        encode_program_times(&self.0, &mut encoder)?;
        crate::budget::encode_prometheus(&self.0.budget, &mut encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{IstioLabels, WorkloadKind};

    fn pod(name: &str, app: Option<&str>) -> Arc<PodMeta> {
        Arc::new(PodMeta {
            uid: format!("uid-{name}"),
            name: format!("{name}-5d4f8b7c9-x7k2p"),
            namespace: "shop".into(),
            node: "node-a".into(),
            ips: vec![],
            app_label: None,
            workload: Some((WorkloadKind::Deployment, name.into())),
            containers: vec![],
            opted_out: false,
            istio: Box::new(IstioLabels {
                app: app.map(str::to_owned),
                ..Default::default()
            }),
        })
    }

    fn peer(workload: &str, service: Option<&str>) -> Arc<PeerK8s> {
        Arc::new(PeerK8s {
            namespace: Some("shop".into()),
            workload: Some(workload.into()),
            pod: None,
            service_fqdn: service.map(|s| crate::k8s::fqdn(s, "shop").into()),
            istio: None,
        })
    }

    /// The Istio series lines of an exposition, in a stable order.
    fn istio_lines(p: &Prometheus) -> Vec<String> {
        lines_of(p, "istio_")
    }

    /// The exposition's lines that start with `prefix`, sorted.
    fn lines_of(p: &Prometheus, prefix: &str) -> Vec<String> {
        let mut lines: Vec<String> = p
            .encode()
            .expect("encodes")
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    }

    /// Spans in every combination of the sources of an Istio label, with
    /// objects that are equal but not the same (two `Arc`s of one pod or
    /// peer), so that a key missing any source makes two spans share it.
    fn varied_spans() -> Vec<Span> {
        let (web, web_again, api) = (pod("web", Some("web")), pod("web", Some("web")), pod("api", None));
        // The same names, told apart only by what the cluster says of them.
        let mut web_v2 = (*web).clone();
        web_v2.istio.version = Some("v2".into());
        let web_v2 = Arc::new(web_v2);
        let (orders, orders_again, billing) = (
            peer("orders", Some("orders")),
            peer("orders", Some("orders")),
            peer("billing", None),
        );
        let mut orders_elsewhere = (*orders).clone();
        orders_elsewhere.namespace = Some("other".into());
        let orders_elsewhere = Arc::new(orders_elsewhere);
        let own_service: Arc<str> = crate::k8s::fqdn("web", "shop").into();
        let mut spans = Vec::new();
        for kind in [SpanKind::Server, SpanKind::Client] {
            for own in [None, Some(&web), Some(&web_again), Some(&web_v2), Some(&api)] {
                for served in [false, true] {
                    for peer in [
                        None,
                        Some(&orders),
                        Some(&orders_again),
                        Some(&orders_elsewhere),
                        Some(&billing),
                    ] {
                        for comm in [None, Some("curl")] {
                            for (status, unanswered) in [
                                (Some(200), None),
                                (Some(503), None),
                                (None, None),
                                (None, Some(crate::span::Unanswered::ConnectionClosed)),
                                (None, Some(crate::span::Unanswered::Timeout)),
                            ] {
                                for grpc in [None, Some(0), Some(14)] {
                                    let mut span = crate::export::encode::tests::span(7, "/");
                                    span.kind = kind;
                                    span.k8s = own.map(|pod| crate::k8s::SpanK8s {
                                        pod: pod.clone(),
                                        container: None,
                                        service_fqdn: served.then(|| own_service.clone()),
                                    });
                                    span.peer_k8s = peer.cloned();
                                    span.peer_comm = comm.map(Arc::from);
                                    span.status_code = status;
                                    span.unanswered = unanswered;
                                    span.rpc = grpc.map(|code| {
                                        Box::new(crate::span::Rpc {
                                            service: "shop.Orders".into(),
                                            method: "Get".into(),
                                            grpc_status: (code != 0 || status.is_some()).then_some(code),
                                        })
                                    });
                                    spans.push(span);
                                }
                            }
                        }
                    }
                }
            }
        }
        spans
    }

    /// Never expires within a test's seconds.
    fn prometheus() -> Prometheus {
        let limits = SeriesLimits {
            max_series: 100_000,
            expiry_secs: 1 << 40,
        };
        Prometheus::with_limits(Arc::new(Stats::default()), limits)
    }

    fn record_all(p: &Prometheus, spans: &[Span], second_of: impl Fn(usize) -> u64) {
        let names = crate::export::resource::Resources::new(Vec::new(), Default::default(), None);
        for (i, span) in spans.iter().enumerate() {
            let service = if i % 4 == 0 { "renamed" } else { names.service_of(span) };
            let peers = Peers::of(span, service, |comm| names.service_name(comm));
            p.record_at(span, service, &peers, second_of(i));
        }
    }

    #[test]
    fn cached_istio_series_are_the_ones_the_labels_name() {
        let spans = varied_spans();
        // Three rounds in one second: most writes take the cached series.
        let cached = prometheus();
        let entries = |p: &Prometheus| p.istio_memo.lock().expect("memo").len;
        record_all(&cached, &spans, |_| 5);
        let first_round = entries(&cached);
        for _ in 0..2 {
            record_all(&cached, &spans, |_| 5);
        }
        assert_eq!(entries(&cached), first_round, "later rounds hit the cache");
        // Each write in a second of its own: every one looks its labels up.
        let looked_up = prometheus();
        for round in 0..3u64 {
            record_all(&looked_up, &spans, |i| round * 10_000 + i as u64);
        }
        let lines = istio_lines(&looked_up);
        assert!(lines.len() > 200, "the spans make many series: {}", lines.len());
        assert_eq!(
            istio_lines(&cached),
            lines,
            "cached writes land where looked-up ones do"
        );
    }

    /// The semconv duration series lines of an exposition, sorted.
    fn semconv_lines(p: &Prometheus) -> Vec<String> {
        lines_of(p, "http_")
    }

    #[test]
    fn cached_semconv_series_are_the_ones_the_labels_name() {
        // Istio's varied spans, and each of a few of them changed in one
        // semconv label at a time.
        let mut spans = varied_spans();
        let bases: Vec<Span> = spans.iter().step_by(97).cloned().collect();
        for base in bases {
            let mut vary = |f: &dyn Fn(&mut Span)| {
                let mut s = base.clone();
                f(&mut s);
                spans.push(s);
            };
            vary(&|s| s.method = "POST".into());
            vary(&|s| s.method = "PURGE".into());
            vary(&|s| s.method = "BREW".into());
            vary(&|s| s.protocol_version = "1.0");
            vary(&|s| s.server = Some("[::1]:9090".parse().expect("addr")));
            vary(&|s| s.server = Some("10.1.2.3:8080".parse().expect("addr")));
            vary(&|s| s.request = crate::span::RequestText::new("http://shop.example:81/x", None));
            vary(&|s| s.request = crate::span::RequestText::new("http://other.example:81/x", None));
        }
        let cached = prometheus();
        for _ in 0..3 {
            record_all(&cached, &spans, |_| 5);
        }
        let looked_up = prometheus();
        for round in 0..3u64 {
            record_all(&looked_up, &spans, |i| round * 100_000 + i as u64);
        }
        let lines = semconv_lines(&looked_up);
        assert!(lines.len() > 300, "the spans make many series: {}", lines.len());
        assert_eq!(
            semconv_lines(&cached),
            lines,
            "cached writes land where looked-up ones do"
        );
    }

    #[test]
    fn a_cached_series_that_expired_is_looked_up_again() {
        let p = Prometheus::with_limits(
            Arc::new(Stats::default()),
            SeriesLimits {
                max_series: 2000,
                expiry_secs: 60,
            },
        );
        let spans = &varied_spans()[..1];
        let count = |p: &Prometheus| {
            let lines: Vec<String> = istio_lines(p)
                .into_iter()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .collect();
            assert_eq!(lines.len(), 1, "{lines:#?}");
            lines[0].rsplit(' ').next().unwrap_or_default().to_owned()
        };
        record_all(&p, spans, |_| 0);
        record_all(&p, spans, |_| 0);
        assert_eq!(count(&p), "2");
        // Idle past the expiry: the family removes the series at this
        // write's lookup, and the write goes to a new one (not to the
        // removed one the cache still holds).
        record_all(&p, spans, |_| 100);
        assert_eq!(count(&p), "1");
    }

    #[test]
    fn past_the_cap_cached_writes_go_to_the_overflow_series() {
        let p = Prometheus::with_limits(
            Arc::new(Stats::default()),
            SeriesLimits {
                max_series: 1,
                expiry_secs: 600,
            },
        );
        let spans = varied_spans();
        for _ in 0..2 {
            record_all(&p, &spans[..2], |_| 0);
        }
        let overflow = istio_lines(&p)
            .into_iter()
            .find(|l| l.starts_with("istio_requests_total{otel_metric_overflow=\"true\"}"));
        assert_eq!(overflow.as_deref().and_then(|l| l.rsplit(' ').next()), Some("2"));
        // Both overflowed Istio writes are counted (the second one taken
        // from the cache), with the semconv family's two of its own.
        let counted = p
            .stats
            .metric_series_overflow
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(counted, 2 + 2, "Istio and semconv overflow writes");
    }
}
