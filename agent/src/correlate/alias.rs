//! Trace ids the kernel chose that a header (seen only in userspace)
//! replaced: B3 headers, or a `traceparent` past the kernel's capture. A
//! span that inherited the kernel's trace id (an in-process child, or a
//! same-node hop through the TCP option) is moved to the header's trace.
use foldhash::HashMap;

use crate::{span::Span, trace_context::TraceId};

/// How long an alias is kept after it was made.
const ALIAS_TTL_NS: u64 = 60 * 1_000_000_000;
/// Most aliases kept; beyond it the table starts over (spans then keep the
/// kernel's trace id: a broken trace, never a wrong parent).
const MAX_ALIASES: usize = 65_536;

#[derive(Debug, Default)]
pub struct Aliases {
    to: HashMap<TraceId, (TraceId, u64)>,
}

impl Aliases {
    pub fn insert(&mut self, from: TraceId, to: TraceId, ktime_ns: u64) {
        if self.to.len() >= MAX_ALIASES {
            self.to.clear();
        }
        // Chains (a -> b, b -> c) resolve at insert time.
        let to = self.to.get(&to).map_or(to, |(t, _)| *t);
        self.to.insert(from, (to, ktime_ns));
    }

    pub fn apply(&self, span: &mut Span) {
        if let Some((to, _)) = self.to.get(&span.trace_id) {
            span.trace_id = *to;
        }
    }

    pub fn purge(&mut self, now_ns: u64) {
        let cutoff = now_ns.saturating_sub(ALIAS_TTL_NS);
        self.to.retain(|_, (_, t)| *t >= cutoff);
    }
}
