//! Developer tasks: `cargo xtask setup|build|test|demo|bench|lint|image|cluster`.
//!
//! Every task starts with `setup`, which installs what is missing on a Debian 12 machine (as
//! root) and is a quick no-op once everything is there.

mod bench;
mod cluster;
mod cluster_check;
mod cluster_dns;
mod demo;
mod demo_lab;
mod demo_node_ip;
mod image;
mod kube_build;
mod kube_scale;
mod proc;
mod setup;
mod soak;
mod storm;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "observer developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (Debian packages, bpf-linker, toolchain link).
    Setup,
    /// Build the agent (kernel programs embedded) in release mode.
    Build,
    /// The whole test suite: unit tests and real-kernel lab tests (needs root).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The main job: build, bring up the lab, watch a Service connection become PodB:8443.
    Demo {
        /// Keep the lab running afterwards (take it down with `observer-lab down --name demo`).
        #[arg(long)]
        keep: bool,
        /// The Services' load balancer: kube-proxy's iptables or nftables mode, or a socket-level
        /// balancer like Cilium's and Calico's kube-proxy replacements.
        #[arg(long, default_value = "iptables", value_parser = ["iptables", "nftables", "socket"])]
        lb: String,
    },
    /// Measure per-packet cost and throughput with and without the agent.
    Bench {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Run one part only: `programs` (each tc program under BPF_PROG_TEST_RUN next to
        /// reference programs), `userspace` (correlation throughput on synthetic input),
        /// `datapath` (throughput, connection rate, per-program cost in the lab), `storm`
        /// (connections at fixed rates, each checked for its record) or `kube` (the agent's
        /// memory for a large cluster's names).
        /// `soak` (minutes of load with the agents restarted every minute) runs only when
        /// asked for.
        #[arg(long, value_parser = ["programs", "userspace", "datapath", "storm", "kube", "soak"])]
        only: Option<String>,
        /// New connections per second of the storm part, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000")]
        rates: Vec<u32>,
        /// Seconds per storm rate.
        #[arg(long, default_value_t = 30)]
        storm_seconds: u32,
        /// Minutes of the soak.
        #[arg(long, default_value_t = 10)]
        soak_minutes: u32,
        /// New connections per second of the soak.
        #[arg(long, default_value_t = 500)]
        soak_rate: u32,
        /// Pods in the replayed cluster of the `kube` part.
        #[arg(long, default_value_t = 150_000)]
        pods: usize,
        /// Nodes they run on.
        #[arg(long, default_value_t = 5_000)]
        nodes: usize,
    },
    /// cargo fmt --check and clippy (userspace and kernel crate).
    Lint,
    /// Build the container image from `Dockerfile` (podman) and run it as the DaemonSet does
    /// against the lab.
    Image,
    /// A real one-node Kubernetes cluster in a network namespace (kubelet, kube-proxy,
    /// containerd, CNI bridge): `up`, `down`, or `check` (up, `kubectl apply -k deploy/base`,
    /// assert on the agent's records of a Service call, down).
    Cluster {
        #[arg(value_parser = ["up", "down", "check"])]
        action: String,
        /// With `check`: leave the cluster up when a check fails, to look at it.
        #[arg(long)]
        keep: bool,
    },
}

/// A check of the whole suite that is no cargo test.
type Check = fn() -> anyhow::Result<()>;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build()
        }
        Task::Test { args } => {
            setup::ensure()?;
            kube_build::ensure()?;
            build()?;
            let (mut passed, mut failed) = test(&args)?;
            // The whole suite also builds the shipped image and runs it against the lab; a
            // filtered run (`cargo xtask test lifecycle`) leaves it out.
            if args.is_empty() {
                let checks: [(&str, &str, Check); 2] = [
                    (
                        "the container image: `cargo xtask image`",
                        "image",
                        image::build,
                    ),
                    (
                        "the DaemonSet on a real kubelet: `cargo xtask cluster check`",
                        "cluster",
                        || cluster_check::run(false),
                    ),
                ];
                for (what, name, check) in checks {
                    println!("\n==> {what}");
                    match check() {
                        Ok(()) => passed += 1,
                        Err(e) => {
                            println!("{name} check FAILED: {e:#}");
                            failed += 1;
                        }
                    }
                }
            }
            println!("\n{passed} passed, {failed} failed");
            if failed > 0 {
                bail!("{failed} failed");
            }
            Ok(())
        }
        Task::Demo { keep, lb } => {
            setup::ensure()?;
            build()?;
            demo::run(keep, &lb)
        }
        Task::Bench {
            seconds,
            only,
            pods,
            nodes,
            rates,
            storm_seconds,
            soak_minutes,
            soak_rate,
        } => {
            setup::ensure()?;
            build()?;
            let cluster = kube_scale::Cluster {
                pods,
                nodes,
                services: pods / 15,
                namespaces: 1_000,
            };
            let storm = bench::Storm {
                rates,
                seconds: storm_seconds,
                soak_minutes,
                soak_rate,
            };
            bench::run(seconds, only.as_deref(), cluster, &storm)
        }
        Task::Image => {
            setup::ensure()?;
            build()?;
            image::build()
        }
        Task::Cluster { action, keep } => {
            setup::ensure()?;
            match action.as_str() {
                "up" => cluster::up(),
                "down" => cluster::down(),
                _ => cluster_check::run(keep),
            }
        }
        Task::Lint => {
            setup::ensure()?;
            setup::ensure_packages(&["rust-web-clippy"])?;
            lint()
        }
    }
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The release builds of `observer` (agent, explain) and `observer-lab`.
pub fn bins() -> observer_lab::drive::Bins {
    observer_lab::drive::Bins::in_dir(&workspace_root().join("target/release"))
}

/// `cargo` with ~/.cargo/bin (bpf-linker) on PATH.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", setup::path_with_cargo_bin())
        .current_dir(workspace_root());
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    println!("==> building observer (release, kernel programs embedded) and observer-lab");
    run(cargo().args(["build", "--release", "-p", "observer", "-p", "observer-lab"]))
}

/// cargo test over the workspace; (passed, failed) summed over every test binary.
fn test(extra: &[String]) -> anyhow::Result<(u64, u64)> {
    if !setup::is_root() {
        bail!("the kernel tests load eBPF programs and build network namespaces: run as root");
    }
    println!(
        "==> unit and real-kernel tests (lab tests run one at a time: they share the cgroup root)"
    );
    let mut child = cargo()
        .args(["test", "--release", "--no-fail-fast"])
        .args(extra)
        .args(["--", "--test-threads=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Pass the output through and add up every binary's summary for one closing line.
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped");
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                match (what, n.parse::<u64>()) {
                    ("passed", Ok(n)) => passed += n,
                    ("failed", Ok(n)) => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        // A binary that did not build or crashed reports no summary.
        failed += 1;
        println!("cargo test failed: {status}");
    }
    Ok((passed, failed))
}

fn lint() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel crate, for its own target, with the toolchain that builds it.
    run(Command::new("rustup")
        .env("PATH", setup::path_with_cargo_bin())
        .env("RUSTC_BOOTSTRAP", "1")
        .current_dir(workspace_root())
        .args([
            "run",
            setup::EBPF_TOOLCHAIN,
            "cargo",
            "clippy",
            "-p",
            "observer-ebpf",
            "-p",
            "observer-lab-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
            "target/ebpf-lint",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
}
