//! A real one-node Kubernetes cluster on this machine (`cargo xtask cluster up|down`): etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (iptables
//! mode) built from Debian's kubernetes 1.20 source (`kube_build.rs`), containerd and runc from
//! Debian as the CRI runtime, and Debian's CNI plugins (bridge, host-local, portmap).
//!
//! The node is a network namespace (`observer-k8s`): every component runs in it, so the pods'
//! bridge, kube-proxy's rules and every address stay out of the host's network. They also share
//! one private mount namespace (made by `unshare -m` for containerd, joined by the others with
//! `nsenter`), where the kubelet's volume mounts and containerd's overlays live and die with them.
//! Images cannot be pulled here: the pause image (the kubelet source's `build/pause/linux/pause.c`,
//! built static) and a busybox image (Debian's busybox-static) are built with podman FROM scratch
//! and imported into containerd with the observer image.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use integration_test::kube::{CACHE, component};

/// The node's network namespace.
pub const NS: &str = "observer-k8s";
pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "10.210.0.1";
/// The kubelet's default root: `deploy/base` puts the agent's seccomp profile under its
/// `seccomp/`, where the kubelet looks for Localhost profiles.
const KUBELET_ROOT: &str = "/var/lib/kubelet";
/// Everything else of the cluster's: certificates, configs, logs, etcd, containerd.
const STATE: &str = "/run/observer-cluster";
pub const PAUSE: &str = "localhost/pause:3.4-observer";
pub const BUSYBOX: &str = "localhost/busybox:observer";
/// What `deploy/base` names the agent's image (docker.io/library/observer:dev to containerd).
pub const AGENT_IMAGE: &str = "docker.io/library/observer:dev";
const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "etcd-server",
    "busybox-static",
    "podman",
    "iptables",
    "conntrack",
    "openssl",
    "bpftool",
    "prometheus",
    "curl",
];

/// A file of the cluster's state directory.
pub fn state(f: &str) -> PathBuf {
    Path::new(STATE).join(f)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A command run in the node's network and mount namespaces.
fn on_node(pid: u32, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-n", "-m", "--"])
        .arg(program);
    c
}

fn log_file(name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(state(&format!("{name}.log")))?)
}

/// `kubectl` against the cluster, from inside the node's network; must succeed.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let net = format!("--net=/run/netns/{NS}");
    let kubeconfig = s(&state("kubeconfig"));
    let argv: Vec<&str> = ["nsenter", &net, "kubectl", "--kubeconfig", &kubeconfig]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    Ok(observer_lab::netns::run_with_input(&argv, stdin)?)
}

/// Wait until `ok` holds, at most `secs`; `what` names it in the error, with `detail`'s text.
pub fn wait_for(
    what: &str,
    secs: u64,
    mut ok: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what}: not within {secs} s\n{}", detail());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

fn tail(name: &str) -> String {
    let text = std::fs::read_to_string(state(&format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "last lines of {}:\n{}",
        state(&format!("{name}.log")).display(),
        lines[lines.len().saturating_sub(15)..].join("\n")
    )
}

pub fn up() -> anyhow::Result<()> {
    crate::setup::ensure_packages(PACKAGES)?;
    crate::kube_build::ensure()?;
    if Path::new(&format!("/run/netns/{NS}")).exists() {
        bail!("the cluster is already up (`cargo xtask cluster down` first)");
    }
    if Path::new(KUBELET_ROOT).exists() && !Path::new(KUBELET_ROOT).join(".observer").exists() {
        bail!("{KUBELET_ROOT} exists and is not the test cluster's: is a kubelet running here?");
    }
    println!("==> a one-node Kubernetes cluster in network namespace {NS} (state in {STATE})");
    std::fs::create_dir_all(state("cni"))?;
    std::fs::create_dir_all(KUBELET_ROOT)?;
    std::fs::write(Path::new(KUBELET_ROOT).join(".observer"), "")?;
    integration_test::kube::certificates(
        Path::new(STATE),
        &format!("IP:{NODE_IP},IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes.default.svc"),
    )?;
    write_configs()?;
    node_network()?;
    let res = start_components();
    if res.is_err() {
        let _ = down();
    }
    res
}

/// The node: a namespace whose uplink `eth0` carries the node IP and the default route; its
/// peer stays in the namespace, so nothing routed there leaves it.
fn node_network() -> anyhow::Result<()> {
    let ip = |args: &[&str]| crate::run(Command::new("ip").args(["-n", NS]).args(args));
    crate::run(Command::new("ip").args(["netns", "add", NS]))?;
    ip(&["link", "set", "lo", "up"])?;
    ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
    ])?;
    ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    ip(&["link", "set", "eth0", "up"])?;
    ip(&["link", "set", "wire0", "up"])?;
    ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.210.0.254",
        "dev",
        "eth0",
        "onlink",
    ])?;
    // conntrack's own packet counts, to check the agent's against.
    crate::run(Command::new("ip").args([
        "netns",
        "exec",
        NS,
        "sysctl",
        "-q",
        "-w",
        "net.netfilter.nf_conntrack_acct=1",
    ]))
}

fn start_components() -> anyhow::Result<()> {
    let pid = start_containerd()?;
    images(pid)?;
    start_control_plane(pid)?;
    start_node(pid)
}

/// A file of the state directory as an argument.
fn arg_path(f: &str) -> String {
    s(&state(f))
}

/// Start a component in the node's namespaces, its stderr to `<name>.log`.
fn start(pid: u32, name: &str, program: PathBuf, args: Vec<String>) -> anyhow::Result<()> {
    on_node(pid, &program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(name)?)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(())
}

/// containerd in the node's network namespace and a mount namespace of its own, which the other
/// components join; its pid.
fn start_containerd() -> anyhow::Result<u32> {
    let containerd = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{NS}"))
        .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
        // The node's bpf filesystem (systemd mounts one on a real node), private to the node's
        // mount namespace: the agent pins its flow map there for the next agent.
        .arg(format!(
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf && exec containerd --config {}",
            s(&state("containerd.toml"))
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file("containerd")?)
        .spawn()
        .context("starting containerd (Debian package containerd)")?;
    // nsenter, unshare and sh exec, so this is containerd's pid.
    let pid = containerd.id();
    std::fs::write(state("containerd.pid"), pid.to_string())?;
    let sock = state("containerd.sock");
    wait_for(
        "containerd's socket",
        30,
        || sock.exists(),
        || tail("containerd"),
    )?;
    Ok(pid)
}

/// etcd, kube-apiserver (waited for), kube-controller-manager, kube-scheduler.
fn start_control_plane(pid: u32) -> anyhow::Result<()> {
    let p = arg_path;
    start(
        pid,
        "etcd",
        "etcd".into(),
        vec![
            format!("--data-dir={}", p("etcd")),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
        ],
    )?;
    start(
        pid,
        "kube-apiserver",
        component("kube-apiserver"),
        vec![
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--advertise-address={NODE_IP}"),
            "--secure-port=6443".into(),
            format!("--tls-cert-file={}", p("tls.crt")),
            format!("--tls-private-key-file={}", p("tls.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=Node,RBAC".into(),
            format!("--service-account-key-file={}", p("sa.key")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // `kubectl logs` reaches the kubelet at the node IP: no DNS names the node here.
            "--kubelet-preferred-address-types=InternalIP".into(),
        ],
    )?;
    wait_for(
        "kube-apiserver ready",
        90,
        || kubectl(&["get", "--raw", "/readyz"], None).is_ok_and(|o| o.trim() == "ok"),
        || tail("kube-apiserver"),
    )?;
    let kubeconfig = format!("--kubeconfig={}", p("kubeconfig"));
    start(
        pid,
        "kube-controller-manager",
        component("kube-controller-manager"),
        vec![
            kubeconfig.clone(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            "--controllers=*,-nodeipam".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
        ],
    )?;
    start(
        pid,
        "kube-scheduler",
        component("kube-scheduler"),
        vec![
            kubeconfig,
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--port=0".into(),
        ],
    )
}

/// kubelet and kube-proxy; waits for the node to be Ready.
fn start_node(pid: u32) -> anyhow::Result<()> {
    let p = arg_path;
    let kubeconfig = format!("--kubeconfig={}", p("kubeconfig"));
    start(
        pid,
        "kubelet",
        component("kubelet"),
        vec![
            format!("--config={}", p("kubelet.yaml")),
            kubeconfig.clone(),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                p("containerd.sock")
            ),
            format!("--hostname-override={NODE}"),
            format!("--node-ip={NODE_IP}"),
            format!("--pod-infra-container-image={PAUSE}"),
            format!("--cert-dir={}", p("kubelet-pki")),
        ],
    )?;
    start(
        pid,
        "kube-proxy",
        component("kube-proxy"),
        vec![
            kubeconfig,
            "--proxy-mode=iptables".into(),
            format!("--hostname-override={NODE}"),
            "--cluster-cidr=10.244.0.0/16".into(),
            // Leave the machine's conntrack table size alone (a global sysctl).
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--healthz-bind-address=127.0.0.1:10256".into(),
        ],
    )?;
    wait_for(
        "node-a Ready",
        90,
        || {
            kubectl(
                &[
                    "get",
                    "node",
                    NODE,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
                None,
            )
            .is_ok_and(|o| o.trim() == "True")
        },
        || tail("kubelet"),
    )?;
    println!(
        "    node {NODE} Ready; kubectl: nsenter --net=/run/netns/{NS} kubectl --kubeconfig {}",
        p("kubeconfig")
    );
    Ok(())
}

/// The pause and busybox images (built once with podman) and the observer image, if built,
/// into containerd's `k8s.io` namespace.
fn images(pid: u32) -> anyhow::Result<()> {
    let dir = PathBuf::from(CACHE).join("cluster-images");
    std::fs::create_dir_all(&dir)?;
    let src = PathBuf::from(CACHE).join("k8s-src/src/build/pause/linux/pause.c");
    crate::run(
        Command::new("gcc")
            .args(["-Os", "-static", "-DVERSION=v3.4-observer", "-o"])
            .arg(dir.join("pause"))
            .arg(&src),
    )?;
    std::fs::copy("/bin/busybox", dir.join("busybox"))?;
    std::fs::write(
        dir.join("Containerfile.pause"),
        "FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT [\"/pause\"]\n",
    )?;
    std::fs::write(
        dir.join("Containerfile.busybox"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENTRYPOINT [\"/bin/sh\"]\n",
    )?;
    let mut images = vec![(PAUSE, Some("pause")), (BUSYBOX, Some("busybox"))];
    if crate::image::exists(crate::image::IMAGE) {
        images.push((crate::image::IMAGE, None));
    }
    for (image, containerfile) in images {
        if let Some(f) = containerfile {
            crate::run(
                crate::image::podman()
                    .args(["build", "-q", "--pull=never", "-t", image, "-f"])
                    .arg(dir.join(format!("Containerfile.{f}")))
                    .arg(&dir)
                    .stdout(Stdio::null()),
            )?;
        }
        let tar = state("image.tar");
        let _ = std::fs::remove_file(&tar);
        crate::run(
            crate::image::podman()
                .args(["save", "-q", "--format", "docker-archive", "-o"])
                .arg(&tar)
                .arg(image),
        )?;
        crate::run(&mut ctr(pid, &["images", "import", &s(&tar)]))?;
        std::fs::remove_file(&tar)?;
    }
    if crate::image::exists(crate::image::IMAGE) {
        tag_agent_image(AGENT_IMAGE)?;
    }
    Ok(())
}

/// `ctr` on the node's containerd, in the namespace the kubelet's images are in.
fn ctr(pid: u32, args: &[&str]) -> Command {
    let mut c = on_node(pid, Path::new("ctr"));
    c.args(["-a", &s(&state("containerd.sock")), "-n", "k8s.io"])
        .args(args)
        .stdout(Stdio::null());
    c
}

/// The observer image under another name in the node's containerd (a new tag to roll out).
pub fn tag_agent_image(name: &str) -> anyhow::Result<()> {
    let pid: u32 = std::fs::read_to_string(state("containerd.pid"))?
        .trim()
        .parse()?;
    let _ = ctr(pid, &["images", "rm", name])
        .stderr(Stdio::null())
        .status();
    crate::run(ctr(pid, &["images", "tag", crate::image::IMAGE, name]).stderr(Stdio::null()))
}

fn write_configs() -> anyhow::Result<()> {
    let p = arg_path;
    std::fs::write(
        state("kubeconfig"),
        integration_test::kube::kubeconfig(&format!("https://{NODE_IP}:6443"), Some(&p("ca.crt"))),
    )?;
    // restrict_oom_score_adj: the sandbox's oom_score_adj (-998) is below what this machine lets
    // root set without CAP_SYS_RESOURCE, which runc then fails on ("can't get final child's PID").
    std::fs::write(
        state("containerd.toml"),
        format!(
            r#"version = 2
root = "{root}"
state = "{run}"
[grpc]
  address = "{sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  # Pods' network namespaces under its state dir, not the host's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
"#,
            root = p("containerd"),
            run = p("containerd-run"),
            sock = p("containerd.sock"),
            cni = p("cni"),
        ),
    )?;
    std::fs::write(
        state("cni/10-bridge.conflist"),
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "observer-cluster", "plugins": [
  {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.244.0.0/24"}}]],
            "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}
"#,
            p("cni-ipam")
        ),
    )?;
    // cgroupfs: no systemd here. No cluster DNS (pods fall back to the node's resolv.conf).
    std::fs::write(
        state("kubelet.yaml"),
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: cgroupfs\nfailSwapOn: false\nauthentication:\n  anonymous: {enabled: true}\n  webhook: {enabled: false}\nauthorization: {mode: AlwaysAllow}\nenforceNodeAllocatable: []\nevictionHard: {}\nimageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n",
    )?;
    Ok(())
}

/// The inode of a network namespace file.
fn netns_inode(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Every process in the node's network namespace (components, shims, hostNetwork pods).
fn node_processes(ino: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| netns_inode(&format!("/proc/{pid}/ns/net")) == Some(ino))
        .collect()
}

/// The kubelet's pod cgroups, in every hierarchy, deepest first.
fn pod_cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_owned());
    }
    let mut out = Vec::new();
    let roots = std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for root in std::iter::once(PathBuf::from("/sys/fs/cgroup")).chain(roots) {
        let kubepods = root.join("kubepods");
        if kubepods.is_dir() {
            walk(&kubepods, &mut out);
        }
    }
    out
}

/// Remove everything `up` made, also after a crash: processes (by the node's network namespace
/// and the pods' cgroups), cgroups, the namespace, state, the kubelet's root and the agent's
/// pins.
pub fn down() -> anyhow::Result<()> {
    let netns = format!("/run/netns/{NS}");
    for _ in 0..20 {
        let mut pids: Vec<i32> = netns_inode(&netns).map(node_processes).unwrap_or_default();
        for cg in pod_cgroups() {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        pids.retain(|p| *p != std::process::id() as i32);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for cg in pod_cgroups() {
        let _ = std::fs::remove_dir(&cg);
    }
    if Path::new(&netns).exists() {
        crate::run(Command::new("ip").args(["netns", "del", NS]))?;
    }
    let _ = std::fs::remove_dir_all(STATE);
    if Path::new(KUBELET_ROOT).join(".observer").exists() {
        let _ = std::fs::remove_dir_all(KUBELET_ROOT);
    }
    // The DaemonSet's agent pinned its flow map here (hostNetwork: the host's netns name).
    let _ = std::fs::remove_dir_all(Path::new(observer_common::PIN_ROOT).join("host"));
    let left = pod_cgroups();
    if !left.is_empty() {
        bail!("pod cgroups left behind: {left:?}");
    }
    Ok(())
}

/// The pid of a process in the node's network namespace whose command is `comm`.
pub fn node_process(comm: &str) -> Option<i32> {
    let ino = netns_inode(&format!("/run/netns/{NS}"))?;
    node_processes(ino).into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
    })
}
