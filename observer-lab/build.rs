//! Builds the lab's socket load balancer (`observer-lab-ebpf`) for the BPF target, as
//! `observer/build.rs` builds the agent's programs (same toolchain: `cargo xtask setup`).
//!
//! `xtask` depends on this crate, and `cargo xtask setup` is what installs that toolchain: on a
//! fresh machine this script must let the library build without it. It then embeds an empty
//! object (the lab refuses `--lb socket` with a clear error) and runs again once the toolchain
//! and bpf-linker are there; the lab binary that tests and the demo run is built after setup.

use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../observer-lab-ebpf").canonicalize()?;

    let missing = missing_parts(&toolchain);
    if !missing.is_empty() {
        let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out_dir.join("observer-lab-ebpf"), [])?;
        for path in &missing {
            // A path that does not exist makes cargo run this script again next build.
            println!("cargo:rerun-if-changed={}", path.display());
        }
        println!(
            "cargo:warning=building observer-lab without its kernel program (no {}); \
             `cargo xtask setup` installs it",
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }

    // SAFETY: build scripts are single-threaded here (see observer/build.rs for why).
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "observer-lab-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// What of the eBPF toolchain is not installed: the rustup toolchain's directory and bpf-linker.
fn missing_parts(toolchain: &str) -> Vec<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".rustup")));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".cargo")));
    let mut missing = Vec::new();
    if let Some(dir) = rustup_home.map(|r| r.join("toolchains").join(toolchain))
        && !dir.exists()
    {
        missing.push(dir);
    }
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bpf-linker").exists()));
    if let Some(linker) = cargo_home.map(|c| c.join("bin/bpf-linker"))
        && !on_path
        && !linker.exists()
    {
        missing.push(linker);
    }
    missing
}
