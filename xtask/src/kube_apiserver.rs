//! The real `kube-apiserver` the Kubernetes tests run against, built from
//! the `k8s.io/kubernetes` Go module (no prebuilt one is in the registries).
//!
//! A scratch module requires the pinned release and replaces each staging
//! module it names at `v0.0.0` (`k8s.io/api`, `k8s.io/apiserver`, …) with
//! the matching `v0.<minor>.<patch>`. Everything lives under
//! `target/kube-apiserver/` (GOPATH, GOCACHE, the binary), so a fresh
//! checkout rebuilds it and a changed pin builds a new one next to it.
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::step;

/// The Kubernetes release the tests run against.
pub const KUBERNETES: &str = "v1.36.3";
/// Go 1.26 or later builds it; the machine's Go lives here.
const GO: &str = "/usr/local/go/bin/go";

/// The binary for the pin, under `root/target`.
pub fn binary(root: &Path) -> PathBuf {
    root.join("target/kube-apiserver")
        .join(KUBERNETES)
        .join("kube-apiserver")
}

/// Builds the pinned kube-apiserver unless it is already there.
pub fn ensure(root: &Path) -> Result<PathBuf> {
    let bin = binary(root);
    if bin.exists() {
        return Ok(bin);
    }
    let base = root.join("target/kube-apiserver");
    let scratch = base.join(format!("module-{KUBERNETES}"));
    std::fs::create_dir_all(&scratch).with_context(|| format!("mkdir {}", scratch.display()))?;
    step(&format!(
        "building kube-apiserver {KUBERNETES} from Go modules (first time only: ~12 CPU-minutes, ~6 min on 2 idle cores, 2.3 GB peak)"
    ));
    let started = Instant::now();
    let go = |args: &[&str]| {
        let mut c = Command::new(go_binary());
        c.args(args)
            .current_dir(&scratch)
            .env("GOPATH", base.join("gopath"))
            .env("GOCACHE", base.join("gocache"))
            .env("GOTOOLCHAIN", "local")
            // Writable module cache, so `cargo clean` can remove it.
            .env("GOFLAGS", "-mod=mod -modcacherw -buildvcs=false");
        c
    };
    let out = go(&["mod", "download", "-json", &format!("k8s.io/kubernetes@{KUBERNETES}")])
        .output()
        .context("could not run go (Go 1.26 is expected at /usr/local/go/bin/go)")?;
    if !out.status.success() {
        bail!(
            "go mod download k8s.io/kubernetes@{KUBERNETES} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("go mod download -json printed no JSON")?;
    let gomod_path = info["GoMod"].as_str().context("no GoMod in go mod download's answer")?;
    let gomod = std::fs::read_to_string(gomod_path).with_context(|| format!("read {gomod_path}"))?;
    std::fs::write(scratch.join("go.mod"), scratch_go_mod(&gomod)?)?;
    std::fs::write(
        scratch.join("tools.go"),
        "package tools\n\nimport _ \"k8s.io/kubernetes/cmd/kube-apiserver\"\n",
    )?;
    step("resolving the module graph (go mod tidy)");
    crate::status(&mut go(&["mod", "tidy"]))?;
    step("compiling (a line every 100 packages)");
    let tmp = bin.with_extension("partial");
    std::fs::create_dir_all(bin.parent().context("binary has a parent")?)?;
    // The version it reports (`/version`, kubectl's skew check).
    let mut parts = KUBERNETES.trim_start_matches('v').split('.');
    let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
    let pkg = "k8s.io/component-base/version";
    let ldflags = format!(
        "-X {pkg}.gitVersion={KUBERNETES} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    );
    let mut child = go(&["build", "-v", "-ldflags", &ldflags, "-o"])
        .arg(&tmp)
        .arg("k8s.io/kubernetes/cmd/kube-apiserver")
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start go build")?;
    let mut tail = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for (n, line) in BufReader::new(stderr).lines().map_while(Result::ok).enumerate() {
            if n % 100 == 99 {
                step(&format!(
                    "  {} packages compiled, {:.0} s",
                    n + 1,
                    started.elapsed().as_secs_f64()
                ));
            }
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!(
            "go build k8s.io/kubernetes/cmd/kube-apiserver failed ({st}):\n{}",
            tail.join("\n")
        );
    }
    std::fs::rename(&tmp, &bin)?;
    step(&format!(
        "kube-apiserver {KUBERNETES} built in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        bin.display()
    ));
    Ok(bin)
}

fn go_binary() -> PathBuf {
    let pinned = PathBuf::from(GO);
    if pinned.exists() {
        pinned
    } else {
        PathBuf::from("go")
    }
}

/// The scratch module's go.mod: require the release and pin every staging
/// module it lists at `v0.0.0` to the release's `v0.<minor>.<patch>`.
fn scratch_go_mod(kubernetes_go_mod: &str) -> Result<String> {
    let staging_version = KUBERNETES
        .strip_prefix("v1.")
        .map(|rest| format!("v0.{rest}"))
        .context("the pin is a v1.x.y release")?;
    let go_line = kubernetes_go_mod
        .lines()
        .find(|l| l.starts_with("go "))
        .unwrap_or("go 1.26.0");
    let mut out = format!(
        "module meshless.test/kube-apiserver\n\n{go_line}\n\nrequire k8s.io/kubernetes {KUBERNETES}\n\nreplace (\n"
    );
    let mut staged = 0;
    for line in kubernetes_go_mod.lines() {
        let mut words = line.split_whitespace();
        if let (Some(module), Some("v0.0.0"), None) = (words.next(), words.next(), words.next()) {
            if module.starts_with("k8s.io/") {
                out.push_str(&format!("\t{module} => {module} {staging_version}\n"));
                staged += 1;
            }
        }
    }
    if staged == 0 {
        bail!("k8s.io/kubernetes {KUBERNETES}'s go.mod names no staging modules at v0.0.0");
    }
    out.push_str(")\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_are_replaced_at_the_matching_v0_release() {
        let gomod = "module k8s.io/kubernetes\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/api v0.0.0\n\tk8s.io/utils v0.0.0-2026\n\tgithub.com/x/y v0.0.0\n)\n";
        let out = scratch_go_mod(gomod).expect("go.mod");
        let minor = KUBERNETES.trim_start_matches("v1.");
        assert!(out.contains(&format!("\tk8s.io/api => k8s.io/api v0.{minor}\n")));
        assert!(!out.contains("k8s.io/utils =>"), "real versions stay");
        assert!(!out.contains("github.com/x/y =>"));
        assert!(out.contains("go 1.26.0\n"));
    }
}
