//! Spans → OTLP `ExportTraceServiceRequest` protobuf, written straight
//! into one reused buffer: one request per batch with every workload's
//! resource in it, split only to stay under the size a collector accepts.
//! Each workload's resource is encoded once and cached.
use foldhash::HashMap;

use super::{
    attributes::{self, Attr, ConnectionKey},
    proto::{varint_len, Writer},
    resource::{self, Resources, WorkloadKey},
};
use crate::{
    span::{Span, SpanKind},
    text::Text,
};

/// Encoded resources kept at most; the cache starts over past it.
const MAX_CACHED: usize = 4096;
/// Slots of the cache of encoded connection attributes (a power of two):
/// a slot holds one connection's key and bytes (~250 bytes), so the cache
/// stays under ~400 KB whatever the traffic.
const CONNECTION_SLOTS: usize = 1024;

/// Field numbers of the OTLP messages written here.
mod field {
    pub const REQUEST_RESOURCE_SPANS: u32 = 1;
    pub const RESOURCE_SPANS_RESOURCE: u32 = 1;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u32 = 2;
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    pub const SCOPE_SPANS_SCOPE: u32 = 1;
    pub const SCOPE_SPANS_SPANS: u32 = 2;
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
    pub const STRING_VALUE: u32 = 1;
    pub const BOOL_VALUE: u32 = 2;
    pub const INT_VALUE: u32 = 3;
    pub const ARRAY_VALUE: u32 = 5;
    pub const ARRAY_VALUES: u32 = 1;
}

/// OTLP `SpanKind` and `Status.code` values, and `SpanFlags` bits.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// A connection's key and its encoded attributes (empty: never used).
type ConnectionSlot = Option<(ConnectionKey, Vec<u8>)>;

/// Builds export requests from spans.
pub struct Encoder {
    resources: Resources,
    opts: attributes::Options,
    /// Encoded `Resource` attributes by workload (keyed by a hash of the
    /// workload, verified against the stored key).
    cache: HashMap<u64, (WorkloadKey, Vec<u8>)>,
    hasher: foldhash::fast::RandomState,
    /// (workload hash, span index) of the batch, sorted to group workloads.
    order: Vec<(u64, u32)>,
    members: Vec<u32>,
    /// Encoded [`attributes::visit_connection`] attributes by connection,
    /// direct-mapped by the key's hash: a span on a connection (and
    /// thread) seen before copies them instead of formatting addresses and
    /// encoding ten key/values again. A miss overwrites its slot, reusing
    /// its buffer.
    connections: Box<[ConnectionSlot]>,
    /// The workloads of the last spans, told by identity, and their cache
    /// keys: a batch's spans come from few workloads, so most find theirs
    /// here without hashing their names or touching the cache.
    recent: [Option<Recent>; RECENT],
    next_recent: usize,
    w: Writer,
}

/// Workloads remembered in [`Encoder::recent`].
const RECENT: usize = 4;

/// A workload by the objects a span names it with (each held, so its
/// address is no other object's while remembered), and its cache key.
struct Recent {
    pid: u32,
    name: std::sync::Arc<str>,
    executable: std::sync::Arc<str>,
    pod: Option<std::sync::Arc<crate::k8s::PodMeta>>,
    hash: u64,
}

impl Recent {
    fn of(span: &Span, hash: u64) -> Self {
        Self {
            pid: span.process.pid,
            name: span.process.name.clone(),
            executable: span.process.executable.clone(),
            pod: span.k8s.as_ref().map(|k| k.pod.clone()),
            hash,
        }
    }

    fn is_of(&self, span: &Span) -> bool {
        use std::sync::Arc;
        let p = &span.process;
        let same_pod = match (&self.pod, &span.k8s) {
            (None, None) => true,
            (Some(a), Some(k)) => Arc::ptr_eq(a, &k.pod),
            _ => false,
        };
        self.pid == p.pid
            && Arc::ptr_eq(&self.name, &p.name)
            && Arc::ptr_eq(&self.executable, &p.executable)
            && same_pod
    }
}

impl Encoder {
    pub fn new(resources: Resources, opts: attributes::Options) -> Self {
        Self {
            resources,
            opts,
            cache: HashMap::default(),
            hasher: foldhash::fast::RandomState::default(),
            order: Vec::new(),
            members: Vec::new(),
            connections: (0..CONNECTION_SLOTS).map(|_| None).collect(),
            recent: Default::default(),
            next_recent: 0,
            w: Writer::default(),
        }
    }

    /// Encodes `spans` as requests of at most `max` bytes, handing each
    /// to `out` with the indices of the spans in it; returns the indices
    /// of spans too large for any request (not sent).
    pub fn encode<S: std::borrow::Borrow<Span>>(
        &mut self,
        spans: &[S],
        max: usize,
        mut out: impl FnMut(&[u8], &[u32]),
    ) -> Vec<u32> {
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
            self.recent = Default::default();
        }
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        for (i, span) in spans.iter().enumerate() {
            order.push((self.resource(span.borrow()), i as u32));
        }
        order.sort_unstable();
        let mut oversize = Vec::new();
        self.w.clear();
        self.members.clear();
        let mut group = None;
        for &(h, i) in &order {
            let span = spans[i as usize].borrow();
            if group != Some(h) {
                if group.is_some() {
                    self.close_group();
                }
                self.open_group(h);
                group = Some(h);
            }
            if self.push_span(span, max) {
                self.members.push(i);
                continue;
            }
            if self.members.is_empty() {
                oversize.push(i);
                continue;
            }
            // The request is full: send it and start the next one here.
            self.close_group();
            out(&self.w.buf, &self.members);
            self.w.clear();
            self.members.clear();
            self.open_group(h);
            if self.push_span(span, max) {
                self.members.push(i);
            } else {
                oversize.push(i);
            }
        }
        if group.is_some() {
            self.close_group();
        }
        if !self.members.is_empty() {
            out(&self.w.buf, &self.members);
        }
        self.order = order;
        oversize
    }

    /// Encodes and drops the bytes; returns how many there were (benchmarks).
    pub fn encode_discard(&mut self, spans: &[Span]) -> usize {
        let mut bytes = 0;
        self.encode(spans, super::otlp::MAX_REQUEST_BYTES, |b, _| bytes += b.len());
        bytes
    }

    /// The cache key of a span's resource, encoding the resource if new.
    fn resource(&mut self, span: &Span) -> u64 {
        if let Some(recent) = self.recent.iter().flatten().find(|r| r.is_of(span)) {
            return recent.hash;
        }
        let h = resource::hash_of(span, &self.hasher);
        if self.cache.get(&h).is_some_and(|(key, _)| resource::is_of(key, span)) {
            self.remember(span, h);
            return h;
        }
        // The entry of `h` changes: what `recent` says of it may be stale.
        self.recent = Default::default();
        // A different workload with the same 64-bit hash replaces the
        // entry (a collision this unlikely is not worth a second probe).
        let mut w = Writer::default();
        for (k, v) in self.resources.attributes_of(span) {
            let v = match &v {
                attributes::Value::Str(s) => Attr::Str(s),
                attributes::Value::Int(i) => Attr::Int(*i),
                attributes::Value::Bool(b) => Attr::Bool(*b),
                attributes::Value::StrArray(a) => Attr::Str(a.first().map_or("", String::as_str)),
            };
            key_value(&mut w, field::RESOURCE_ATTRIBUTES, "", &k, v);
        }
        self.cache.insert(h, (resource::key_of(span), w.buf));
        self.remember(span, h);
        h
    }

    /// Remembers `span`'s workload as having cache key `h`.
    fn remember(&mut self, span: &Span, h: u64) {
        self.recent[self.next_recent] = Some(Recent::of(span, h));
        self.next_recent = (self.next_recent + 1) % RECENT;
    }

    fn open_group(&mut self, h: u64) {
        let w = &mut self.w;
        w.begin(field::REQUEST_RESOURCE_SPANS, 3);
        w.begin(field::RESOURCE_SPANS_RESOURCE, 2);
        if let Some((_, attrs)) = self.cache.get(&h) {
            w.raw(attrs);
        }
        w.end();
        w.begin(field::RESOURCE_SPANS_SCOPE_SPANS, 3);
        w.begin(field::SCOPE_SPANS_SCOPE, 1);
        w.string(field::SCOPE_NAME, "meshless");
        w.string(field::SCOPE_VERSION, env!("CARGO_PKG_VERSION"));
        w.end();
    }

    fn close_group(&mut self) {
        self.w.end(); // ScopeSpans
        self.w.end(); // ResourceSpans
    }

    /// Appends a span if the request stays within `max` bytes.
    fn push_span(&mut self, span: &Span, max: usize) -> bool {
        let mark = self.w.written();
        self.w.begin(field::SCOPE_SPANS_SPANS, 2);
        write_span(&mut self.w, span, self.opts, |w, names_server| {
            connection_attributes(w, span, self.opts, names_server, &mut self.connections, &self.hasher)
        });
        self.w.end();
        // Room for the lengths of the enclosing messages to grow.
        if self.w.written() + 16 > max {
            self.w.truncate(mark);
            return false;
        }
        true
    }
}

/// Writes [`attributes::visit_connection`]'s attributes of `span`: copied
/// from its connection's slot when the slot holds this span's key, else
/// encoded and kept there.
fn connection_attributes(
    w: &mut Writer,
    span: &Span,
    opts: attributes::Options,
    names_server: bool,
    slots: &mut [ConnectionSlot],
    hasher: &foldhash::fast::RandomState,
) {
    let h = ConnectionKey::hash_of(span, names_server, hasher);
    let slot = &mut slots[h as usize % slots.len()];
    if let Some((key, bytes)) = slot.as_ref() {
        if key.is_of(span, names_server) {
            w.raw(bytes);
            return;
        }
    }
    let mark = w.written();
    attributes::visit_connection(span, opts, names_server, |prefix, key, v| {
        key_value(w, field::ATTRIBUTES, prefix, key, v)
    });
    let encoded = &w.buf[mark..];
    match slot {
        Some((key, bytes)) => {
            *key = ConnectionKey::of(span, names_server);
            bytes.clear();
            bytes.extend_from_slice(encoded);
        }
        None => *slot = Some((ConnectionKey::of(span, names_server), encoded.to_vec())),
    }
}

/// Writes a span; `connection(w, names_server)` writes the attributes of
/// its connection ([`attributes::visit_connection`]).
fn write_span(w: &mut Writer, span: &Span, opts: attributes::Options, connection: impl FnOnce(&mut Writer, bool)) {
    use std::fmt::Write as _;
    w.bytes(field::TRACE_ID, &span.trace_id.0);
    w.bytes(field::SPAN_ID, &span.span_id.0);
    if let Some(state) = span.trace_state.as_deref() {
        // As the SDK did: a tracestate that does not parse is left out.
        if let Ok(state) = state.parse::<opentelemetry::trace::TraceState>() {
            w.string(field::TRACE_STATE, &state.header());
        }
    }
    if let Some(parent) = span.parent_span_id {
        w.bytes(field::PARENT_SPAN_ID, &parent.0);
    }
    w.begin(field::NAME, 1);
    match span.rpc.as_ref().filter(|r| !r.service.is_empty()) {
        Some(rpc) => {
            let _ = write!(w, "{}/{}", rpc.service, rpc.method);
        }
        None => {
            let _ = w.write_str(span.method_label());
            if let Some(path) = crate::span::Target::parse(span.target()).path {
                let _ = w.write_str(" ");
                let _ = crate::route::write_template(path, w);
            }
        }
    }
    w.end();
    w.varint(
        field::KIND,
        match span.kind {
            SpanKind::Server => KIND_SERVER,
            SpanKind::Client => KIND_CLIENT,
        },
    );
    w.fixed64(field::START, span.start_unix_nano);
    w.fixed64(field::END, span.end_unix_nano);
    let names_server = attributes::visit_request(span, opts, |prefix, key, v| {
        key_value(w, field::ATTRIBUTES, prefix, key, v)
    });
    connection(w, names_server);
    attributes::visit_headers(span, |prefix, key, v| key_value(w, field::ATTRIBUTES, prefix, key, v));
    w.begin(field::STATUS, 1);
    if span.is_error() {
        match span.status_code {
            Some(code) => w.string(field::STATUS_MESSAGE, Text::of(format_args!("HTTP {code}")).as_str()),
            None => w.string(field::STATUS_MESSAGE, "no response"),
        }
        w.varint(field::STATUS_CODE, STATUS_ERROR);
    }
    w.end();
    let mut flags = FLAG_HAS_IS_REMOTE;
    if span.sampled {
        flags |= FLAG_SAMPLED;
    }
    if span.parent_is_remote {
        flags |= FLAG_IS_REMOTE;
    }
    w.fixed32(field::FLAGS, flags);
}

/// Length of a length-delimited field holding `n` bytes.
fn delimited(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

/// A `KeyValue` as field `field`, its lengths computed up front (no
/// moving of bytes: attributes are most of a span).
fn key_value(w: &mut Writer, field: u32, prefix: &str, key: &str, v: Attr<'_>) {
    let key_len = prefix.len() + key.len();
    let any_len = match v {
        Attr::Str(s) => delimited(s.len()),
        Attr::Int(i) => 1 + varint_len(i as u64),
        Attr::Bool(_) => 2,
        Attr::StrArray1(s) => delimited(delimited(delimited(s.len()))),
    };
    w.len_prefixes(field, delimited(key_len) + delimited(any_len), field::KEY, key_len);
    if !prefix.is_empty() {
        // Only header attributes have one: no empty copy for the rest.
        w.raw(prefix.as_bytes());
    }
    w.raw(key.as_bytes());
    match v {
        Attr::Str(s) => {
            w.len_prefixes(field::VALUE, any_len, field::STRING_VALUE, s.len());
            w.raw(s.as_bytes());
        }
        Attr::Int(i) => {
            w.len_prefix(field::VALUE, any_len);
            w.varint(field::INT_VALUE, i as u64);
        }
        Attr::Bool(b) => {
            w.len_prefix(field::VALUE, any_len);
            w.varint(field::BOOL_VALUE, u64::from(b));
        }
        Attr::StrArray1(s) => {
            w.len_prefixes(field::VALUE, any_len, field::ARRAY_VALUE, delimited(delimited(s.len())));
            w.len_prefixes(field::ARRAY_VALUES, delimited(s.len()), field::STRING_VALUE, s.len());
            w.raw(s.as_bytes());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
