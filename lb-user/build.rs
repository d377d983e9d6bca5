//! Builds the XDP program (`lb-ebpf`) for `bpfel-unknown-none` and leaves the object in
//! `OUT_DIR`, where `src/dataplane.rs` embeds it.
//!
//! The eBPF crate needs Debian's Rust (`/usr/bin/rustc`, which ships a prebuilt `core` for the
//! BPF target) and `bpf-linker`; `scripts/install-deps.sh` installs both. The ordinary rustup
//! toolchain still drives cargo. See ../shared/TOOLCHAIN.md for why.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("lb-user lives in the workspace root");
    let ebpf_dir = workspace.join("lb-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));

    for path in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-ebpf/Cargo.lock",
        "lb-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    println!("cargo:rerun-if-env-changed=LB_EBPF_RUSTC");

    let rustc = env::var("LB_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".to_string());
    if !Path::new(&rustc).exists() {
        fail(&format!(
            "{rustc} not found: the XDP program needs Debian's Rust with the BPF core library. \
             Run `sudo scripts/install-deps.sh` (or set LB_EBPF_RUSTC)."
        ));
    }

    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // Nothing of the outer (host) build may leak into the BPF build.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("RUSTC", &rustc)
        // aya-ebpf uses unstable features; Debian's stable compiler allows them with this.
        .env("RUSTC_BOOTSTRAP", "1")
        // --btf makes bpf-linker emit .BTF/.BTF.ext, which the loader and verifier use.
        // --disable-expand-memcpy-in-order: bpf-linker otherwise asks LLVM to keep memcpy for
        // its own in-order expansion, which also turns off LLVM's inline expansion of memset and
        // memmove; every `[0; 3]` padding field and every MAC address copy then became a call
        // to an out-of-line byte loop (31 calls in the datapath, several on every packet).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Clink-arg=--disable-expand-memcpy-in-order",
        );
    // Make `bpf-linker` from `cargo install` findable even when ~/.cargo/bin is not on PATH.
    if let Some(home) = env::var_os("HOME") {
        let cargo_bin = Path::new(&home).join(".cargo/bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = env::split_paths(&path).collect();
        paths.push(cargo_bin);
        command.env(
            "PATH",
            env::join_paths(paths).expect("PATH entries are valid"),
        );
    }

    let status = command.status().unwrap_or_else(|error| {
        fail(&format!("running cargo for lb-ebpf: {error}"));
    });
    if !status.success() {
        fail(&format!(
            "building lb-ebpf for {BPF_TARGET} failed ({status}); see the output above. \
             Missing bpf-linker or Debian's Rust? Run `sudo scripts/install-deps.sh`."
        ));
    }

    let object = target_dir.join(BPF_TARGET).join("release").join("lb-ebpf");
    let embedded = out_dir.join("lb-ebpf.o");
    std::fs::copy(&object, &embedded).unwrap_or_else(|error| {
        fail(&format!(
            "copying {} to {}: {error}",
            object.display(),
            embedded.display()
        ));
    });
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
