//! Stage 5: exporters. Each runs as its own task fed by a bounded channel.
pub mod attributes;
pub mod console;
pub mod encode;
mod gather;
pub mod otlp;
mod proto;
pub mod resource;
pub mod sampler;
mod transport;

/// The `User-Agent` of every export request the agent sends (tonic or the
/// HTTP client appends its own name after it).
pub const USER_AGENT: &str = concat!("meshless/", env!("CARGO_PKG_VERSION"));

/// A span of an export request sent by a meshless agent, seen where the
/// collector received it (or, with two agents on a node, where the other
/// agent sent it). Exporting it would make another export request, and so
/// on for ever: such spans are set aside, counted, and kept out of metrics.
pub fn is_own_export(span: &crate::span::Span) -> bool {
    span.user_agent().is_some_and(|ua| ua.starts_with("meshless/"))
}
