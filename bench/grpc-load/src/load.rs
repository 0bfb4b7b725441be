//! Fixed-rate, open-loop unary calls. Call `i` is due at `start + i/rate`
//! and is sent then whether or not earlier calls have returned (HTTP/2
//! multiplexes them), and its latency counts from that intended time, so a
//! stalled server or proxy shows up as latency instead of as fewer calls
//! (no coordinated omission). The run is bounded: `rate × duration` calls,
//! each given up after the call timeout.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tonic::{
    client::Grpc,
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
    Request,
};
use tonic_prost::ProstCodec;

use crate::{
    greeter::{HelloReply, HelloRequest, SAY_HELLO},
    report::Report,
    ticker::Ticker,
};

/// What to load and how hard.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Server address, `host:port` (plaintext HTTP/2).
    #[arg(long)]
    pub target: String,
    /// Calls per second, fixed.
    #[arg(long)]
    pub rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// HTTP/2 connections; calls are spread over them round-robin.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// A call without an answer after this many milliseconds counts as failed.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

/// How one call ended.
enum Outcome {
    /// The server answered (with any gRPC status); latency from the intended send time.
    Answered { latency: Duration, code: i32 },
    /// No answer: transport error or the call timeout.
    Failed(String),
}

async fn connect(target: &str) -> Result<Grpc<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{target}"))
        .with_context(|| format!("bad target {target:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {target}"))?;
    Ok(Grpc::new(channel))
}

async fn say_hello(mut client: Grpc<Channel>) -> Result<(), tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::from_error(Box::new(e)))?;
    let request = Request::new(HelloRequest {
        name: "meshless".to_owned(),
    });
    let codec = ProstCodec::<HelloRequest, HelloReply>::default();
    client
        .unary(request, PathAndQuery::from_static(SAY_HELLO), codec)
        .await
        .map(drop)
}

/// Runs the load and summarises it.
pub async fn run(args: &LoadArgs) -> Result<Report> {
    anyhow::ensure!(
        args.rate > 0 && args.connections > 0,
        "rate and connections must be positive"
    );
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(connect(&args.target).await?);
    }
    let total = u64::from(args.rate) * args.duration;
    let timeout = Duration::from_millis(args.timeout_ms);
    let period_ns = 1e9 / f64::from(args.rate);
    let (outcomes_tx, mut outcomes_rx) = mpsc::unbounded_channel();
    let mut ticker = Ticker::new().context("creating the send timer")?;
    let start = Instant::now();
    for i in 0..total {
        let intended = start + Duration::from_nanos((i as f64 * period_ns) as u64);
        let now = Instant::now();
        if intended > now {
            ticker
                .sleep(intended - now)
                .await
                .context("waiting for the next send time")?;
        }
        let client = clients[(i % clients.len() as u64) as usize].clone();
        let outcomes_tx = outcomes_tx.clone();
        tokio::spawn(async move {
            let outcome = match tokio::time::timeout(timeout, say_hello(client)).await {
                Ok(Ok(())) => Outcome::Answered {
                    latency: intended.elapsed(),
                    code: 0,
                },
                Ok(Err(status)) if is_answer(&status) => Outcome::Answered {
                    latency: intended.elapsed(),
                    code: status.code() as i32,
                },
                Ok(Err(status)) => Outcome::Failed(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => Outcome::Failed("client timeout".to_owned()),
            };
            let _ = outcomes_tx.send(outcome);
        });
    }
    drop(outcomes_tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut codes: BTreeMap<i32, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    // Ends when every call task has finished; each is bounded by `timeout`.
    while let Some(outcome) = outcomes_rx.recv().await {
        match outcome {
            Outcome::Answered { latency, code } => {
                latencies.push(latency);
                *codes.entry(code).or_default() += 1;
            }
            Outcome::Failed(why) => *errors.entry(why).or_default() += 1,
        }
    }
    Ok(Report::new(total, start.elapsed(), latencies, codes, errors))
}

/// Whether a non-OK status came from the server or proxy (in trailers)
/// rather than from the client's transport, which tonic also reports as a
/// status but with the underlying error as its source.
fn is_answer(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_none()
}
