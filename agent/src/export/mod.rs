//! Stage 5: exporters. Each runs as its own task fed by a bounded channel.
pub mod console;
