//! Builds the lab's socket load balancer (`observer-lab-ebpf`) for the BPF target, as
//! `observer/build.rs` builds the agent's programs (same toolchain: `cargo xtask setup`).

use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".to_owned());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../observer-lab-ebpf").canonicalize()?;
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
