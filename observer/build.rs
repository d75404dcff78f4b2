//! Builds the kernel programs (`observer-ebpf`) for the BPF target and puts the object in
//! `OUT_DIR`, where `src/ebpf.rs` embeds it.
//!
//! The kernel crate needs a nightly-capable toolchain with `rust-src` (for `-Z build-std=core`)
//! and `bpf-linker`; `cargo xtask setup` installs both (see docs/building.md). Set
//! `OBSERVER_EBPF_TOOLCHAIN` to use another rustup toolchain than `debian-web`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../observer-ebpf").canonicalize()?;
    let common_dir = manifest.join("../observer-common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());

    if which_bpf_linker().is_none() {
        bail!(
            "bpf-linker is not on PATH; run `cargo xtask setup` (installs it into ~/.cargo/bin) \
             or add ~/.cargo/bin to PATH"
        );
    }
    // The Debian toolchain is stable; RUSTC_BOOTSTRAP lets it take `-Z build-std=core`, which
    // aya-build adds when this is set. The child cargo inherits it.
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };

    let root_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package {
            name: "observer-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

fn which_bpf_linker() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("bpf-linker"))
            .find(|p| p.is_file())
    })
}
