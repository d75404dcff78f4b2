//! `cargo xtask image`: build the DaemonSet's image from `Dockerfile` with podman, then run it
//! the way the DaemonSet does (host network of a lab node, exactly CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN, read-only root filesystem, the cgroup v2 mount, BTF and bpffs mounted) and
//! check that a real connection comes out as a record.
//!
//! The Dockerfile starts FROM Debian's official images. Where no container registry is reachable
//! (as on the build machines here), a stand-in of the same name is made first: Debian bookworm
//! by debootstrap from this machine's Debian archive, with the official image's apt sources and
//! this machine's CA certificates (build networks that intercept TLS need them for crates.io).
//! Containers here run with runc and cgroupfs (crun refuses this kernel's hybrid cgroup layout)
//! and build steps with chroot isolation.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use observer_lab::drive::{LabRun, unique_name};

const BASE: &str = "docker.io/library/debian:bookworm";
const SLIM: &str = "docker.io/library/debian:bookworm-slim";
pub const IMAGE: &str = "localhost/observer:dev";
const BUILD_CACHE: &str = "localhost/observer-build:cache";

pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

pub fn exists(name: &str) -> bool {
    podman()
        .args(["image", "exists", name])
        .status()
        .is_ok_and(|s| s.success())
}

/// Debian bookworm as the official image has it, from this machine's archive.
fn base_images() -> anyhow::Result<()> {
    let debian = crate::setup::debian_archive("/debian")?;
    let security = crate::setup::debian_archive("/debian-security")?;
    let root = Path::new("/var/cache/observer/rootfs-bookworm");
    let _ = std::fs::remove_dir_all(root);
    println!("==> base image: debootstrap bookworm (minbase) from {debian}");
    crate::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(root)
            .arg(&debian)
            .stdout(Stdio::null()),
    )?;
    let _ = std::fs::remove_file(root.join("etc/apt/sources.list"));
    std::fs::write(
        root.join("etc/apt/sources.list.d/debian.sources"),
        format!(
            "Types: deb\nURIs: {debian}\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb\nURIs: {security}\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    let local_ca = root.join("usr/local/share/ca-certificates");
    std::fs::create_dir_all(&local_ca)?;
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        local_ca.join("build-host.crt"),
    )
    .context("copying this machine's CA certificates")?;
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for e in std::fs::read_dir(root.join(d))?.flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    crate::run(
        podman()
            .args(["import", "-", BASE])
            .stdin(tar.stdout.context("tar stdout")?)
            .stdout(Stdio::null()),
    )?;
    crate::run(podman().args(["tag", BASE, SLIM]))?;
    let _ = std::fs::remove_dir_all(root);
    Ok(())
}

/// Resource limits the runtime may set: podman's defaults are above what root may raise to here
/// (no CAP_SYS_RESOURCE), and runc refused nproc 65536 (32768 passes; one agent needs few).
fn ulimits() -> Vec<String> {
    let current = |r| {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills a struct we own.
        unsafe { libc::getrlimit(r, &mut l) };
        l.rlim_cur
    };
    vec![
        "--ulimit".into(),
        format!("nofile={0}:{0}", current(libc::RLIMIT_NOFILE).min(1 << 20)),
        "--ulimit".into(),
        format!("nproc={0}:{0}", current(libc::RLIMIT_NPROC).min(1 << 15)),
    ]
}

pub fn build() -> anyhow::Result<()> {
    crate::setup::ensure_packages(&["podman", "debootstrap", "runc"])?;
    if !exists(BASE) || !exists(SLIM) {
        base_images()?;
    }
    println!("==> podman build -t {IMAGE} . (the Dockerfile; about 10 min the first time)");
    let t0 = Instant::now();
    // The build stage is tagged, so its toolchain layers stay cached when the dangling images
    // of earlier builds are pruned below.
    for (target, tag) in [(Some("build"), BUILD_CACHE), (None, IMAGE)] {
        crate::run(
            podman()
                .args([
                    "build",
                    "--isolation=chroot",
                    "--network=host",
                    "--pull=never",
                ])
                .args(target.map(|t| format!("--target={t}")))
                .args(["-t", tag, "-f", "Dockerfile", "."])
                .current_dir(crate::workspace_root()),
        )?;
    }
    println!("    built in {:.0} s", t0.elapsed().as_secs_f64());
    // Earlier builds' images, now untagged, would pile up run after run.
    let _ = podman()
        .args(["image", "prune", "-f"])
        .stdout(Stdio::null())
        .status();
    check()
}

/// Run the image as the DaemonSet does, in a lab node's network namespace.
fn check() -> anyhow::Result<()> {
    let bins = crate::bins();
    let name = unique_name("img");
    let dir = std::env::temp_dir().join(format!("observer-{name}"));
    let lab = LabRun::up(&bins, &name, None, &dir)?;
    let container = format!("observer-{name}");
    let cgroup2 = cgroup2_mount()?;
    // A bpf filesystem of its own, as the node's /sys/fs/bpf: the agent pins its flow map there.
    let bpffs = dir.join("bpffs");
    std::fs::create_dir_all(&bpffs)?;
    crate::run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs))?;
    println!(
        "==> running {IMAGE} in {} as the DaemonSet would",
        lab.ns("node-a")
    );
    let res = run_as_daemonset(&lab, &container, &cgroup2, &bpffs);
    let _ = podman()
        .args(["rm", "-f", &container])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("umount").arg("-l").arg(&bpffs).status();
    drop(lab);
    res
}

/// Start the image in node-a's network with the DaemonSet's capabilities and mounts; it must get
/// ready, record a lab connection, pin its flow map and exit 0 on SIGTERM.
fn run_as_daemonset(
    lab: &LabRun,
    container: &str,
    cgroup2: &str,
    bpffs: &std::path::Path,
) -> anyhow::Result<()> {
    crate::run(
        podman()
            .args(["run", "-d", "--name", container])
            .args(ulimits())
            .arg(format!("--network=ns:/run/netns/{}", lab.ns("node-a")))
            .args([
                "--cap-drop=all",
                "--cap-add=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            ])
            .arg("--read-only")
            .arg(format!(
                "--security-opt=seccomp={}",
                seccomp_profile().display()
            ))
            .arg(format!("--volume={cgroup2}:/sys/fs/cgroup:ro"))
            .args(["--volume=/sys/kernel/btf:/sys/kernel/btf:ro"])
            .arg(format!("--volume={}:/sys/fs/bpf", bpffs.display()))
            .args(["--env=KUBE_NODE_NAME=node-a"])
            .args(["--env=OBSERVER_METRICS_ADDR=127.0.0.1:9464"])
            .args(["--env=OBSERVER_IDLE_TIMEOUT=2s"])
            .arg(IMAGE)
            .stdout(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab
        .http("node-a", "/readyz")
        .is_ok_and(|b| b.contains("ready"))
    {
        if Instant::now() > deadline {
            bail!(
                "the container is not ready after 30 s:\n{}",
                logs(container)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = lab.client("pod-a", &["--to", "100.64.0.10:443"])?;
    if s["ok"] != 1 {
        bail!("lab connection failed: {s}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = logs(container);
        if let Some(line) = out.lines().find(|l| {
            l.contains("\"final\":true")
                && l.contains("\"dport\":443")
                && l.contains("\"dport\":8443")
        }) {
            println!(
                "    record from the image: {}...",
                &line[..line.len().min(160)]
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("no record of the connection from the container:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    crate::run(
        podman()
            .args(["stop", "-t", "15", container])
            .stdout(Stdio::null()),
    )?;
    let code = podman()
        .args(["inspect", "-f", "{{.State.ExitCode}}", container])
        .output()?;
    let code = String::from_utf8_lossy(&code.stdout).trim().to_owned();
    if code != "0" {
        bail!(
            "the agent exited with {code} on SIGTERM:\n{}",
            logs(container)
        );
    }
    if !bpffs.join("observer/host/FLOWS").exists() {
        bail!(
            "no flow map pinned in the mounted bpffs:\n{}",
            logs(container)
        );
    }
    println!(
        "    ready, recorded the connection, pinned its flow map, exited 0 on SIGTERM under its seccomp profile: the image works"
    );
    seccomp_refuses_the_rest()
}

/// The DaemonSet's seccomp profile.
fn seccomp_profile() -> std::path::PathBuf {
    crate::workspace_root().join("deploy/base/seccomp-observer.json")
}

/// Under the DaemonSet's seccomp profile a syscall outside it fails with EPERM: `unshare
/// --user` (unshare(2)), which the same container runs without the profile.
fn seccomp_refuses_the_rest() -> anyhow::Result<()> {
    let run = |seccomp: &str| {
        podman()
            .args([
                "run",
                "--rm",
                "--cap-drop=all",
                "--entrypoint=/usr/bin/unshare",
            ])
            .args(ulimits())
            .arg(format!("--security-opt=seccomp={seccomp}"))
            .args([IMAGE, "--user", "true"])
            .output()
    };
    let open = run("unconfined")?;
    if !open.status.success() {
        bail!(
            "`unshare --user true` fails even without a seccomp profile, so the check says nothing: {}",
            String::from_utf8_lossy(&open.stderr)
        );
    }
    let profile = seccomp_profile();
    let confined = run(&profile.to_string_lossy())?;
    let err = String::from_utf8_lossy(&confined.stderr);
    if confined.status.success() || !err.contains("Operation not permitted") {
        bail!("the seccomp profile let unshare(2) through: {err}");
    }
    println!(
        "    under the DaemonSet's seccomp profile, unshare(2) is refused: {}",
        err.trim()
    );
    Ok(())
}

fn logs(container: &str) -> String {
    podman()
        .args(["logs", container])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

/// The host's cgroup v2 mount (the root on a unified host, `unified/` on a hybrid one).
fn cgroup2_mount() -> anyhow::Result<String> {
    std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .context("no cgroup v2 mount on this machine")
}
