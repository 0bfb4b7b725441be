//! meshless: eBPF capture of HTTP on every socket → OpenTelemetry spans.
//!
//! Pipeline (see docs/architecture.md):
//! `capture` (kernel ring buffer) → `http` (parsing) → `correlate` (spans)
//! → `export` (console). `app` wires the stages together; `pipeline` is
//! what runs after capture, drivable without the kernel.
pub mod admin;
pub mod app;
pub mod budget;
pub mod capture;
pub mod clock;
pub mod config;
pub mod correlate;
pub mod elf_symbols;
pub mod export;
pub mod golang;
pub mod health;
pub mod http;
pub mod http2;
pub mod k8s;
pub mod metrics;
pub mod pipeline;
pub mod privacy;
pub mod propagation;
pub mod resident;
pub mod ringbuf;
pub mod route;
pub mod sockets;
pub mod span;
pub mod stats;
pub mod text;
pub mod tls;
pub mod trace_context;
pub mod ui;
pub mod uprobe;
