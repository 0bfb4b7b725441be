//! The gRPC workload: a tonic unary server (`grpc-load serve`) in the
//! server pod, and `grpc-load load` in the client pod sending
//! `helloworld.Greeter/SayHello` at a fixed rate over h2c. The binary is the
//! workspace member `bench/grpc-load`, built here on demand.
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::env::{cmd, spawn, wait_port, Proc, Sidecar, CLIENT_NS, SERVER_IP, SERVER_NS};
use crate::{status, step};

/// The gRPC server's port (pod IP and loopback).
pub const GRPC_PORT: u16 = 50051;
/// Envoy's inbound listener for gRPC.
pub const GRPC_SIDECAR_PORT: u16 = 15007;

/// The sidecar in front of the gRPC server.
pub const GRPC_SIDECAR: Sidecar = Sidecar {
    listen: GRPC_SIDECAR_PORT,
    app: GRPC_PORT,
    grpc: true,
};

/// Builds `grpc-load` (release) in its own cargo invocation, so the agent's
/// build is not re-resolved with the load generator's features.
pub fn build(root: &Path) -> Result<PathBuf> {
    step("building the gRPC load generator (release)");
    status(
        crate::cargo()
            .current_dir(root)
            .args(["build", "--release", "-p", "grpc-load"]),
    )?;
    Ok(root.join("target/release/grpc-load"))
}

/// The tonic server in the server pod: one runtime thread, like nginx's one worker.
pub fn start_server(bin: &Path, dir: &Path) -> Result<Proc> {
    let mut c = cmd(Some(SERVER_NS), &bin.display().to_string());
    c.args(["--threads", "1", "serve", "--addr", &format!("0.0.0.0:{GRPC_PORT}")]);
    let p = spawn("grpc server", c, &dir.join("grpc-server.log"))?;
    wait_port(CLIENT_NS, SERVER_IP, GRPC_PORT, "the gRPC server")?;
    Ok(p)
}

/// `grpc-load load` in the client pod; returns its oha-shaped JSON.
pub fn load(bin: &Path, port: u16, secs: u64, rate: u32, conns: u32) -> Result<serde_json::Value> {
    let mut c = cmd(Some(CLIENT_NS), &bin.display().to_string());
    c.args([
        "load",
        "--target",
        &format!("{SERVER_IP}:{port}"),
        "--rate",
        &rate.to_string(),
        "--duration",
        &secs.to_string(),
        "--connections",
        &conns.to_string(),
    ]);
    super::json_output(c, "grpc-load")
}
