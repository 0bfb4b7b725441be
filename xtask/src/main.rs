//! `cargo xtask setup | run | test | lint`: everything a fresh machine needs.
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod kube_apiserver;
mod setup;
mod soak;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test meshless")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian's Rust for the eBPF target, LLVM,
    /// bpf-linker, and the real servers/clients the tests use, including
    /// the pinned kube-apiserver (built from Go modules once). Idempotent.
    Setup,
    /// Build the agent and run it as root with the console exporter.
    /// Flags after `--` go to the agent, e.g. `cargo xtask run -- --console-format json`.
    Run {
        /// Build in debug mode (faster to build, slower to run).
        #[arg(long)]
        debug: bool,
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
    /// The whole test suite: unit, property and real-kernel integration tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Overhead of meshless vs an Envoy sidecar, side by side: latency
    /// added at fixed rates, CPU and memory, span completeness. Writes
    /// docs/bench/results.{json,md} and overhead.svg.
    Bench(bench::BenchArgs),
    /// A release agent under steady traffic plus churn for N minutes:
    /// RSS, CPU and drops every second into docs/soak/soak.{json,svg}.
    Soak(soak::SoakArgs),
    /// rustfmt and clippy with warnings denied.
    Lint,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::Setup => setup::test_tools(&root),
        Cmd::Run { debug, agent_args } => run(&root, debug, &agent_args),
        Cmd::Test { cargo_args } => test(&root, &cargo_args),
        Cmd::Bench(args) => bench::run(&root, args),
        Cmd::Soak(args) => soak::run(&root, args),
        Cmd::Lint => lint(&root),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask lives inside the workspace")?
        .to_path_buf())
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // `cargo xtask` gives this process xtask's CARGO_MANIFEST_DIR; ring's
    // build script reruns when that changes, so a build started here and
    // one from a shell would rebuild ring, rustls and kube in turn.
    cmd.env_remove("CARGO_MANIFEST_DIR");
    cmd
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn run(root: &Path, debug: bool, agent_args: &[String]) -> Result<()> {
    setup::run()?;
    step("building the agent");
    let mut build = cargo();
    build.current_dir(root).args(["build", "-p", "meshless"]);
    if !debug {
        build.arg("--release");
    }
    status(&mut build)?;
    setup::mount_tracefs()?;
    let profile = if debug { "debug" } else { "release" };
    let bin = root.join("target").join(profile).join("meshless");
    step(&format!("starting {} (Ctrl-C to stop)", bin.display()));
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg(&bin);
        c
    };
    cmd.args(agent_args);
    // Replace xtask so Ctrl-C reaches the agent alone and it detaches cleanly.
    let err = cmd.exec();
    Err(err).context("could not start the agent")
}

fn test(root: &Path, cargo_args: &[String]) -> Result<()> {
    setup::test_tools(root)?;
    if !is_root() {
        bail!("the real-kernel tests load eBPF programs: run `sudo -E cargo xtask test`");
    }
    setup::mount_tracefs()?;
    step("building everything once");
    status(
        cargo()
            .current_dir(root)
            .args(["build", "--workspace", "--all-targets", "--release"]),
    )?;
    step("running the test suite (unit, property and real-kernel tests)");
    let mut cmd = cargo();
    cmd.current_dir(root).args(["test", "--workspace", "--release"]);
    if !cargo_args.is_empty() {
        cmd.arg("--").args(cargo_args);
        return status(&mut cmd);
    }
    status(&mut cmd)?;
    step("running the benchmark's quick path (so it cannot rot)");
    bench::run(
        root,
        bench::BenchArgs {
            quick: true,
            rates: vec![],
            duration: 0,
            rounds: 0,
            connections: 0,
            out: None,
            workloads: vec![bench::Workload::Http, bench::Workload::Grpc, bench::Workload::Https],
            grpc_connections: 0,
        },
    )?;
    step("a one-minute soak (the long one: `cargo xtask soak --minutes 30`)");
    let out = root.join("target/soak-quick");
    soak::run(
        root,
        soak::SoakArgs {
            minutes: 1,
            memory_limit: "128Mi".into(),
            out: Some(out),
        },
    )
}

fn lint(root: &Path) -> Result<()> {
    status(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    status(
        cargo()
            .current_dir(root)
            .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
    )
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

pub fn step(msg: &str) {
    eprintln!("\x1b[1mxtask:\x1b[0m {msg}");
}
