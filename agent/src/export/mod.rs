//! Stage 5: exporters. Each runs as its own task fed by a bounded channel.
pub mod attributes;
pub mod console;
pub mod encode;
pub mod otlp;
mod proto;
pub mod resource;
pub mod sampler;
mod transport;
