//! Trace-context decisions: which ids a span gets, from the kernel's
//! choice and the headers its request carries.
use crate::{
    http::Head,
    span::SpanKind,
    trace_context::{KernelCtx, ParentOrigin, SpanId, TraceId, TraceParent, B3},
};

/// Ids of a span, decided when its request is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    /// The ids are authoritative (a header, the caller's TCP option, or the
    /// in-process parent): a same-node link must not replace them.
    pub fixed: bool,
    /// The parent lives in another process (header or TCP option).
    pub remote_parent: bool,
    /// The kernel's trace id for this request when a header we honour here
    /// (but the kernel could not) names another trace: spans that inherited
    /// the kernel's id are moved to the header's trace.
    pub alias: Option<(TraceId, TraceId)>,
}

/// The trace a request's headers name: `traceparent`, else B3.
fn header_parent(head: &Head) -> Option<(TraceId, SpanId, bool)> {
    if let Some(tp) = head.header("traceparent").and_then(TraceParent::parse) {
        return Some((tp.trace_id, tp.parent_id, tp.sampled));
    }
    let b3 = head.header("b3").and_then(B3::parse_single).or_else(|| {
        B3::parse_multi(
            head.header("x-b3-traceid")?,
            head.header("x-b3-spanid")?,
            head.header("x-b3-sampled"),
        )
    })?;
    Some((b3.trace_id, b3.span_id, b3.sampled))
}

impl SpanContext {
    /// Decides a span's ids. The kernel's ids (`kernel`) are used whenever
    /// it saw the request start; a header the kernel did not see (B3, or a
    /// `traceparent` past the capture) only changes the trace and parent.
    /// Client spans always get an id of their own: a `traceparent` the app
    /// wrote names the app's span, which becomes the parent.
    pub fn for_request(kind: SpanKind, head: &Head, kernel: Option<KernelCtx>) -> Self {
        let header = header_parent(head);
        let own_id = kernel.map_or_else(SpanId::random, |k| k.span_id);
        let mut ctx = Self {
            trace_id: kernel.map_or_else(TraceId::random, |k| k.trace_id),
            span_id: own_id,
            parent: kernel.and_then(|k| k.parent),
            sampled: kernel.is_none_or(|k| k.sampled),
            fixed: kernel.is_some_and(|k| k.parent.is_some()),
            // A parent meshless chose on another node (TCP option) whose
            // trace nobody upstream decided to drop is sampled like a root:
            // the trace-id ratio gives the same answer on every node. A
            // header, or an option carrying "not sampled", decides for us.
            remote_parent: kernel.is_some_and(|k| match k.origin {
                ParentOrigin::Header => true,
                ParentOrigin::TcpOption => !k.sampled,
                _ => false,
            }),
            alias: None,
        };
        let Some((trace, parent, sampled)) = header else {
            return ctx;
        };
        let kernel_decided = kernel.is_some_and(|k| match kind {
            // The kernel weighs a `traceparent` it saw against the option
            // (same trace: the option, a nearer parent, wins). Headers it
            // did not see (B3, past the capture) get the same rule here.
            SpanKind::Server => {
                k.origin == ParentOrigin::Header || (k.origin == ParentOrigin::TcpOption && k.trace_id == trace)
            }
            // A proxy forwarding the header it received: the in-process
            // parent is nearer and in the same trace.
            SpanKind::Client => k.origin == ParentOrigin::InProcess && k.trace_id == trace,
        });
        if kernel_decided {
            return ctx;
        }
        if let Some(k) = kernel {
            if k.trace_id != trace {
                ctx.alias = Some((k.trace_id, trace));
            }
        }
        ctx.trace_id = trace;
        ctx.parent = Some(parent);
        ctx.sampled = sampled;
        ctx.fixed = true;
        ctx.remote_parent = kind == SpanKind::Server;
        ctx
    }
}
