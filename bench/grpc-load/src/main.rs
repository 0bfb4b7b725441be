//! `grpc-load serve | load`: the gRPC workload of `cargo xtask bench`. A
//! tonic unary server, and an open-loop client sending unary calls at a
//! fixed rate with latency counted from each call's intended send time
//! (no `ghz` in the registries here, hence this). Prints oha-shaped JSON.
mod greeter;
mod load;
mod report;
mod ticker;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "grpc-load", about = "gRPC unary server and fixed-rate load generator")]
struct Cli {
    /// Runtime worker threads (1 = a single-threaded runtime, like one nginx worker).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve `helloworld.Greeter/SayHello` over plaintext HTTP/2 until killed.
    Serve {
        #[arg(long, default_value = "0.0.0.0:50051")]
        addr: SocketAddr,
    },
    /// Send unary calls at a fixed rate; print the summary as JSON.
    Load(load::LoadArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match cli.cmd {
            Cmd::Serve { addr } => serve(addr).await,
            Cmd::Load(args) => {
                let report = load::run(&args).await?;
                println!("{}", report.to_json());
                Ok(())
            }
        }
    })
}

async fn serve(addr: SocketAddr) -> Result<()> {
    eprintln!("grpc-load serving {} on {addr}", greeter::SERVICE);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(greeter::Greeter)
        .serve(addr)
        .await
        .with_context(|| format!("serving on {addr}"))
}
