//! Idempotent machine set-up. Checks first, installs only what is missing, says what it does.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Debian packages: the toolchain that builds Rust for BPF (Debian's rustc-web 1.96 with
/// rust-web-src: `-Z build-std=core` needs the std sources; aya-build, docs.rs/aya-build), the LLVM bpf-linker
/// links against, and the tools the lab and the tests drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "libffi-dev",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "tcpdump",
    "iperf3",
    "curl",
    "bpftool",
    "prometheus",
    "util-linux",
    "libcap2-bin",
];

pub const EBPF_TOOLCHAIN: &str = "debian-web";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).expect("valid PATH")
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Install the Debian packages of `list` that are missing.
pub fn ensure_packages(list: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = list.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        println!("==> installing Debian packages: {}", missing.join(" "));
        crate::run(Command::new("apt-get").args(["update", "-q"]))?;
        crate::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )?;
    }
    Ok(())
}

pub fn ensure() -> anyhow::Result<()> {
    ensure_packages(PACKAGES)?;

    let linker = cargo_bin().join("bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !have {
        println!("==> installing bpf-linker {BPF_LINKER_VERSION} for LLVM 22 (about a minute)");
        crate::run(
            Command::new("cargo")
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("PATH", path_with_cargo_bin())
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
        )?;
    }

    // Manifest checks: kubernetes-validate (real Kubernetes schemas, PyPI) and kubectl's
    // kustomize (the machine image ships kubectl; its apt source has the package otherwise).
    let has_validate = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_validate {
        println!("==> installing kubernetes-validate (PyPI) for manifest checks");
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "-q", "kubernetes-validate"])
                .args(extra)
                .status()
                .is_ok_and(|s| s.success())
        };
        // Debian's own python3 refuses pip installs (PEP 668) unless told otherwise.
        if !pip(&[]) && !pip(&["--break-system-packages"]) {
            bail!("could not install kubernetes-validate with `python3 -m pip`");
        }
    }
    if Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        ensure_packages(&["kubectl"])?;
    }

    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with(EBPF_TOOLCHAIN))
    {
        println!(
            "==> linking Debian's Rust 1.96 (with rust-src) as rustup toolchain {EBPF_TOOLCHAIN}"
        );
        crate::run(Command::new("rustup").args(["toolchain", "link", EBPF_TOOLCHAIN, "/usr"]))?;
    }
    Ok(())
}

/// The URI of this machine's apt source whose path ends in `suffix` (`/debian`,
/// `/debian-security`), so nothing here names a mirror.
pub fn debian_archive(suffix: &str) -> anyhow::Result<String> {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    for e in std::fs::read_dir("/etc/apt/sources.list.d")?.filter_map(Result::ok) {
        texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.contains("://")))
            })
        })
        .find(|uri| uri.trim_end_matches('/').ends_with(suffix))
        .map(str::to_owned)
        .with_context(|| format!("no apt source ending in {suffix} in /etc/apt/sources.list(.d)"))
}
