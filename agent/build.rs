//! Builds the eBPF object (`ebpf/`) with Debian's rustc, which ships a
//! precompiled `core` for `bpfel-unknown-none` (rustup's toolchain here has
//! no rust-src, so aya-build's `-Z build-std` path cannot work). See
//! ../shared/TOOLCHAIN.md for why each environment variable is touched.
use std::{env, path::PathBuf, process::Command};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("agent/ lives in the workspace root");
    let ebpf_dir = root.join("ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    for path in ["ebpf/src", "ebpf/Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=MESHLESS_EBPF_OBJECT");

    let dest = out_dir.join("meshless.bpf.o");
    // Escape hatch for packaging: use a prebuilt object.
    if let Ok(prebuilt) = env::var("MESHLESS_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &dest).expect("copy MESHLESS_EBPF_OBJECT");
        return;
    }
    if !PathBuf::from(DEBIAN_RUSTC).exists() {
        panic!(
            "{DEBIAN_RUSTC} not found: the eBPF programs need Debian's Rust toolchain. \
             Run `cargo xtask setup` (installs rustc-web, libstd-rust-web-dev-bpf, bpf-linker)."
        );
    }
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(DEBIAN_CARGO);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "RUSTDOC",
        "CARGO_MAKEFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_LINKER",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run Debian cargo for the eBPF build");
    if !status.success() {
        panic!("building ebpf/ failed ({status}); run `cargo xtask setup` if bpf-linker is missing");
    }
    let built = target_dir.join("bpfel-unknown-none/release/meshless");
    std::fs::copy(&built, &dest).expect("copy the eBPF object into OUT_DIR");
}
