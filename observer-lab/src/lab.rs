//! The embedded lab: two nodes and their pods as network namespaces on this machine, with
//! kube-proxy-style DNAT, so the whole story can be watched without a cluster.
//!
//! Layout for lab `L`: namespaces `L-<node>` and `L-<pod>`; one veth wire `eth0`<->`eth0`
//! between the nodes; per pod a veth `veth<hash>` (node side) <-> `eth0` (pod side), routed per
//! pod as Calico and GKE do (pod default route via 169.254.1.1 / fe80::1 on the node side). No
//! address or route is added outside these namespaces.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use log::info;

use crate::{
    config::{self, LabConfig, Node, Pod},
    firewall, kubeproxy, kubeproxy_nft,
    model::{Family, LoadBalancer, OUTSIDE, Protocol, VPC},
    names,
    netns::{self, CmdError, ip},
    outside, policy, socket_lb,
};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab name {0:?}: use 1-12 of [a-z0-9] (it prefixes every namespace)")]
    BadName(String),
    #[error("lab {0:?} is already up; run `observer-lab down --name {0}` first")]
    AlreadyUp(String),
    #[error("lab {lab:?} has no pod or node named {target:?}")]
    UnknownTarget { lab: String, target: String },
    #[error("servers in the lab did not start within 10 s: {0}")]
    ServersNotReady(String),
    #[error(transparent)]
    SocketLb(#[from] socket_lb::SocketLbError),
}

pub const STATE_ROOT: &str = observer_common::LAB_STATE_ROOT;

/// Where an agent started with `observer agent --lab` serves /flows: loopback of its node's
/// namespace, so nothing reaches it but a reader entering that namespace (as root).
pub const AGENT_FLOWS: &str = "127.0.0.1:9465";

/// The VPC's own address on its ports, the source of its ARP requests.
const VPC_IP: &str = "10.200.255.254/32";

/// VPC port facing node `i` (interface names have at most 15 characters).
fn vpc_port(i: usize, node: &str) -> String {
    let mut p = format!("n{i}-{node}");
    p.truncate(15);
    p
}

/// A lab by name: where its state lives and how its namespaces are called.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn new(name: &str) -> Result<Lab, LabError> {
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(LabError::BadName(name.to_owned()));
        }
        Ok(Lab {
            name: name.to_owned(),
        })
    }

    pub fn ns(&self, member: &str) -> String {
        format!("{}-{member}", self.name)
    }

    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(&self.name)
    }

    fn config_path(&self) -> PathBuf {
        self.state_dir().join("lab.toml")
    }

    /// The lab's names file (pods, Services, namespaces; `observer agent --names`), kept in
    /// step with its description.
    pub fn names_path(&self) -> PathBuf {
        self.state_dir().join("names.yaml")
    }

    /// The bearer token the lab's agents want on /flows (`observer agent --lab`), made at `up`.
    pub fn flows_token_path(&self) -> PathBuf {
        self.state_dir().join("flows-token")
    }

    /// A new random token, readable by root only.
    fn write_flows_token(&self) -> Result<(), LabError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let path = self.flows_token_path();
        let io = |source| LabError::Io {
            path: path.clone(),
            source,
        };
        let mut random = [0u8; 24];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(io)?,
            &mut random,
        )
        .map_err(io)?;
        let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{token}"))
            .map_err(io)
    }

    fn write_config(&self, cfg: &LabConfig, text: &str) -> Result<(), LabError> {
        for (path, body) in [
            (self.config_path(), text.to_owned()),
            (self.names_path(), names::yaml(cfg, self)),
        ] {
            std::fs::write(&path, body).map_err(|source| LabError::Io { path, source })?;
        }
        Ok(())
    }

    /// The description the lab was brought up with.
    pub fn load_config(&self) -> Result<LabConfig, LabError> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(LabConfig::parse(&text)?)
    }

    /// Namespaces that belong to this lab (the name has no `-`, so the prefix is unambiguous).
    pub fn namespaces(&self) -> Vec<String> {
        let prefix = format!("{}-", self.name);
        netns::list()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    pub fn up(&self, cfg: &LabConfig, config_text: &str) -> Result<(), LabError> {
        if !self.namespaces().is_empty() {
            return Err(LabError::AlreadyUp(self.name.clone()));
        }
        // The description's policies are checked here: config knows nothing of policies.
        policy::parse(&cfg.policies)?;
        let dir = self.state_dir();
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            path: dir.clone(),
            source,
        })?;
        self.write_flows_token()?;
        self.write_config(cfg, config_text)?;
        let res = self.build(cfg);
        if res.is_err() {
            // Leave nothing half-built behind.
            let _ = self.down();
        }
        res
    }

    fn build(&self, cfg: &LabConfig) -> Result<(), LabError> {
        for n in &cfg.nodes {
            self.add_node(n)?;
        }
        self.add_wire(&cfg.nodes[0], &cfg.nodes[1])?;
        if let Some(o) = &cfg.outside {
            self.add_outside(cfg, o)?;
        }
        for p in &cfg.pods {
            let node = cfg.node(&p.node).expect("validated");
            self.add_pod(cfg, node, p)?;
        }
        for n in &cfg.nodes {
            let ns = self.ns(&n.name);
            // As on a real node, a Service address is routed (there, by the default route), so a
            // packet that kube-proxy does not translate reaches filter FORWARD, where it rejects
            // Services without endpoints. Inside the lab: the VPC answers nothing for it.
            ip(
                &ns,
                &["route", "add", &cfg.service_cidr.to_string(), "dev", "eth0"],
            )?;
            self.program_services(cfg, &ns)?;
            if cfg.outside.is_some() {
                outside::program_ip_masq(cfg, &ns)?;
            }
        }
        self.program_policies(cfg)?;
        self.program_firewall(cfg)?;
        if cfg.load_balancer == LoadBalancer::Socket {
            socket_lb::up(&self.state_dir(), cfg, &self.pod_namespaces(cfg))?;
        }
        self.start_servers(cfg)?;
        info!("lab {} is up", self.name);
        Ok(())
    }

    pub(crate) fn new_ns(&self, member: &str) -> Result<String, LabError> {
        let ns = self.ns(member);
        netns::run(&["ip", "netns", "add", &ns])?;
        ip(&ns, &["link", "set", "lo", "up"])?;
        // Before any link exists, so every interface starts with these.
        netns::sysctl(
            &ns,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        Ok(ns)
    }

    fn add_node(&self, n: &Node) -> Result<(), LabError> {
        let ns = self.new_ns(&n.name)?;
        netns::sysctl(
            &ns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        Ok(())
    }

    /// Join the nodes through the VPC router namespace: each node's eth0 is cabled to a port of
    /// the VPC, which routes the node IPs and pod ranges and answers ARP/NDP for the other node,
    /// so the nodes still see one subnet. The VPC firewall (nftables) filters what it forwards.
    fn add_wire(&self, a: &Node, b: &Node) -> Result<(), LabError> {
        let vpc = self.new_ns(VPC)?;
        netns::sysctl(
            &vpc,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.proxy_arp=1",
                "net.ipv6.conf.all.proxy_ndp=1",
            ],
        )?;
        for (i, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
            self.cable(&vpc, i, me, peer)?;
        }
        Ok(())
    }

    /// Node `me`'s eth0 to VPC port `i`: addresses, and routes both ways for `me`'s pods and the
    /// `peer`'s (IPv6 too when both nodes have it).
    fn cable(&self, vpc: &str, i: usize, me: &Node, peer: &Node) -> Result<(), LabError> {
        let ns = self.ns(&me.name);
        let port = vpc_port(i, &me.name);
        ip(
            vpc,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(vpc, &["addr", "add", VPC_IP, "dev", &port])?;
        ip(vpc, &["link", "set", &port, "up"])?;
        ip(
            vpc,
            &["route", "add", &format!("{}/32", me.ip), "dev", &port],
        )?;
        ip(
            vpc,
            &[
                "route",
                "add",
                &me.pod_cidr.to_string(),
                "via",
                &me.ip.to_string(),
                "dev",
                &port,
            ],
        )?;
        ip(
            &ns,
            &["addr", "add", &format!("{}/24", me.ip), "dev", "eth0"],
        )?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(
            &ns,
            &[
                "route",
                "add",
                &peer.pod_cidr.to_string(),
                "via",
                &peer.ip.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        let (Some(me6), Some(peer6), Some(my_cidr6), Some(peer_cidr6)) =
            (me.ip6, peer.ip6, me.pod_cidr6, peer.pod_cidr6)
        else {
            return Ok(());
        };
        ip(
            vpc,
            &["-6", "route", "add", &format!("{me6}/128"), "dev", &port],
        )?;
        ip(
            vpc,
            &[
                "-6",
                "route",
                "add",
                &my_cidr6.to_string(),
                "via",
                &me6.to_string(),
                "dev",
                &port,
            ],
        )?;
        ip(
            vpc,
            &[
                "-6",
                "neigh",
                "add",
                "proxy",
                &peer6.to_string(),
                "dev",
                &port,
            ],
        )?;
        ip(
            &ns,
            &["addr", "add", &format!("{me6}/64"), "dev", "eth0", "nodad"],
        )?;
        ip(
            &ns,
            &[
                "-6",
                "route",
                "add",
                &peer_cidr6.to_string(),
                "via",
                &peer6.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        Ok(())
    }

    fn add_pod(&self, cfg: &LabConfig, node: &Node, p: &Pod) -> Result<(), LabError> {
        let pns = self.new_ns(&p.name)?;
        let nns = self.ns(&node.name);
        let veth = cfg.host_veth(&p.name);
        ip(
            &nns,
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pns,
            ],
        )?;
        ip(&nns, &["link", "set", &veth, "up"])?;
        ip(&nns, &["addr", "add", "169.254.1.1/32", "dev", &veth])?;
        ip(
            &nns,
            &[
                "route",
                "add",
                &format!("{}/32", p.ip),
                "dev",
                &veth,
                "scope",
                "link",
            ],
        )?;
        ip(
            &pns,
            &["addr", "add", &format!("{}/32", p.ip), "dev", "eth0"],
        )?;
        ip(&pns, &["link", "set", "eth0", "up"])?;
        ip(
            &pns,
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        ip(
            &pns,
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )?;
        if let Some(ip6) = p.ip6 {
            ip(&nns, &["addr", "add", "fe80::1/64", "dev", &veth, "nodad"])?;
            ip(
                &nns,
                &["-6", "route", "add", &format!("{ip6}/128"), "dev", &veth],
            )?;
            ip(
                &pns,
                &["addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"],
            )?;
            ip(
                &pns,
                &[
                    "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                ],
            )?;
        }
        Ok(())
    }

    fn start_servers(&self, cfg: &LabConfig) -> Result<(), LabError> {
        let mut waiting = Vec::new();
        for p in &cfg.pods {
            let listeners: Vec<(u16, Protocol)> = cfg.listeners(p).into_iter().collect();
            if !listeners.is_empty() {
                waiting.push((p.name.clone(), self.spawn_server(&p.name, &listeners)?));
            }
        }
        if let Some(o) = &cfg.outside {
            let listeners: Vec<(u16, Protocol)> =
                o.tcp.iter().map(|p| (*p, Protocol::Tcp)).collect();
            waiting.push((OUTSIDE.to_owned(), self.spawn_server(OUTSIDE, &listeners)?));
        }
        let dir = self.state_dir();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if waiting.iter().all(|(_, r)| r.exists()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let missing: Vec<String> = waiting
            .iter()
            .filter(|(_, r)| !r.exists())
            .map(|(n, _)| format!("{n} (log: {})", dir.join(format!("{n}.log")).display()))
            .collect();
        Err(LabError::ServersNotReady(missing.join(", ")))
    }

    /// Start `observer-lab serve` in `member`'s namespace; returns the file it writes when ready.
    fn spawn_server(
        &self,
        member: &str,
        listeners: &[(u16, Protocol)],
    ) -> Result<PathBuf, LabError> {
        let exe = std::env::current_exe().map_err(|source| LabError::Io {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        let dir = self.state_dir();
        let ready = dir.join(format!("{member}.ready"));
        let _ = std::fs::remove_file(&ready);
        let log_path = dir.join(format!("{member}.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| LabError::Io {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(member)])
            .arg(&exe)
            .args(["serve", "--name", member, "--ready-file"])
            .arg(&ready);
        for (port, proto) in listeners {
            cmd.arg(format!("--{}", proto.lower()))
                .arg(port.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| LabError::Io {
                path: log_path.clone(),
                source,
            })?)
            .stderr(log);
        // Own session: the server outlives `lab up` and is not hit by the terminal's ^C.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|source| LabError::Io { path: exe, source })?;
        Ok(ready)
    }

    fn save_config(&self, cfg: &LabConfig) -> Result<(), LabError> {
        let text = toml::to_string(cfg).expect("lab descriptions serialise");
        // Re-parse: the same validation as `up`.
        LabConfig::parse(&text)?;
        self.write_config(cfg, &text)
    }

    fn pod_namespaces(&self, cfg: &LabConfig) -> Vec<String> {
        cfg.pods.iter().map(|p| self.ns(&p.name)).collect()
    }

    /// The socket load balancer follows the pods (their namespaces, the Services' endpoints).
    fn sync_socket_lb(&self, cfg: &LabConfig) -> Result<(), LabError> {
        if cfg.load_balancer == LoadBalancer::Socket {
            socket_lb::sync(&self.state_dir(), cfg, &self.pod_namespaces(cfg))?;
        }
        Ok(())
    }

    /// Add a pod to a running lab and record it in the lab's description.
    pub fn add_pod_live(&self, pod: Pod) -> Result<(), LabError> {
        let mut cfg = self.load_config()?;
        if !cfg.namespaces.iter().any(|n| n.name == pod.namespace) {
            cfg.namespaces.push(config::Namespace {
                name: pod.namespace.clone(),
                labels: [(
                    "kubernetes.io/metadata.name".to_owned(),
                    pod.namespace.clone(),
                )]
                .into_iter()
                .collect(),
            });
        }
        cfg.pods.push(pod.clone());
        self.save_config(&cfg)?;
        let node = cfg.node(&pod.node).expect("validated").clone();
        if let Err(e) = self.add_pod(&cfg, &node, &pod) {
            let _ = self.del_pod_live(&pod.name);
            return Err(e);
        }
        self.sync_socket_lb(&cfg)
    }

    /// Delete a pod of a running lab (its veth goes with its namespace).
    pub fn del_pod_live(&self, name: &str) -> Result<(), LabError> {
        let mut cfg = self.load_config()?;
        let ns = self.target_ns(&cfg, name)?;
        for pid in netns::pids(&ns) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if netns::list().contains(&ns) {
            netns::run(&["ip", "netns", "del", &ns])?;
        }
        cfg.pods.retain(|p| p.name != name);
        self.save_config(&cfg)?;
        self.sync_socket_lb(&cfg)
    }

    /// kube-proxy's rules for every Service, in the lab's load-balancer mode, in node `ns`.
    fn program_services(&self, cfg: &LabConfig, ns: &str) -> Result<(), LabError> {
        let mut families = vec![Family::V4];
        if cfg.cluster_cidr6.is_some() {
            families.push(Family::V6);
        }
        for family in families {
            let (cmd, text) = match (cfg.load_balancer, family) {
                (LoadBalancer::Iptables | LoadBalancer::Socket, Family::V4) => (
                    vec!["iptables-restore", "--noflush"],
                    kubeproxy::tables(cfg, family),
                ),
                (LoadBalancer::Iptables | LoadBalancer::Socket, Family::V6) => (
                    vec!["ip6tables-restore", "--noflush"],
                    kubeproxy::tables(cfg, family),
                ),
                (LoadBalancer::Nftables, _) => {
                    (vec!["nft", "-f", "-"], kubeproxy_nft::ruleset(cfg, family))
                }
            };
            let args: Vec<&str> = ["ip", "netns", "exec", ns].into_iter().chain(cmd).collect();
            netns::run_with_input(&args, Some(&text))?;
        }
        Ok(())
    }

    /// Program the NetworkPolicy chains of every node from `cfg.policies`.
    fn program_policies(&self, cfg: &LabConfig) -> Result<(), LabError> {
        let policies = policy::parse(&cfg.policies)?.network_policies;
        for n in &cfg.nodes {
            let ns = self.ns(&n.name);
            for (family, tool) in [(Family::V4, "iptables"), (Family::V6, "ip6tables")] {
                if family == Family::V6 && cfg.cluster_cidr6.is_none() {
                    continue;
                }
                let (text, chains) = policy::filter_table(cfg, &policies, &n.name, family);
                let before: Vec<String> = netns::exec(&ns, &[tool, "-S"])?
                    .lines()
                    .filter_map(|l| l.strip_prefix("-N OBS-").map(|c| format!("OBS-{c}")))
                    .collect();
                let restore = format!("{tool}-restore");
                netns::run_with_input(
                    &["ip", "netns", "exec", &ns, &restore, "--noflush"],
                    Some(&text),
                )?;
                // Chains of an earlier apply that this one no longer defines: unreferenced now.
                let stale: Vec<&String> = before.iter().filter(|c| !chains.contains(*c)).collect();
                for c in &stale {
                    netns::exec(&ns, &[tool, "-F", c])?;
                }
                for c in &stale {
                    netns::exec(&ns, &[tool, "-X", c])?;
                }
                if netns::exec(&ns, &[tool, "-C", "FORWARD", "-j", "OBS-FORWARD"]).is_err() {
                    netns::exec(&ns, &[tool, "-I", "FORWARD", "1", "-j", "OBS-FORWARD"])?;
                }
            }
        }
        Ok(())
    }

    /// Program the VPC firewall from `cfg.policies` (GKE's default when it has none).
    fn program_firewall(&self, cfg: &LabConfig) -> Result<(), LabError> {
        let fw = policy::parse(&cfg.policies)?
            .firewall
            .unwrap_or_else(|| firewall::Firewall::gke_default(cfg));
        netns::run_with_input(
            &["ip", "netns", "exec", &self.ns(VPC), "nft", "-f", "-"],
            Some(&firewall::nft_ruleset(&fw)),
        )?;
        Ok(())
    }

    /// Replace the lab's NetworkPolicies and firewall while it runs.
    pub fn apply_policies(&self, yaml: &str) -> Result<policy::Policies, LabError> {
        let parsed = policy::parse(yaml)?;
        let mut cfg = self.load_config()?;
        cfg.policies = yaml.to_owned();
        self.save_config(&cfg)?;
        self.program_policies(&cfg)?;
        self.program_firewall(&cfg)?;
        Ok(parsed)
    }

    /// Kill every process in the lab's namespaces and delete them; safe to run any time.
    pub fn down(&self) -> Result<usize, LabError> {
        let spaces = self.namespaces();
        for ns in &spaces {
            for pid in netns::pids(ns) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && spaces.iter().any(|ns| !netns::pids(ns).is_empty()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for ns in &spaces {
            for pid in netns::pids(ns) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Deleting a namespace destroys its veth ends, and with them their peers.
        for ns in &spaces {
            netns::run(&["ip", "netns", "del", ns])?;
        }
        socket_lb::down(&self.state_dir());
        let _ = std::fs::remove_dir_all(self.state_dir());
        // Flow maps its agents pinned under the default root (per node namespace).
        remove_pins(
            Path::new(observer_common::PIN_ROOT),
            &format!("{}-", self.name),
        );
        Ok(spaces.len())
    }

    /// The namespace of a pod or node of this lab.
    pub fn target_ns(&self, cfg: &LabConfig, target: &str) -> Result<String, LabError> {
        if cfg.nodes.iter().any(|n| n.name == target)
            || cfg.pods.iter().any(|p| p.name == target)
            || (target == OUTSIDE && cfg.outside.is_some())
        {
            Ok(self.ns(target))
        } else {
            Err(LabError::UnknownTarget {
                lab: self.name.clone(),
                target: target.to_owned(),
            })
        }
    }

    pub fn status(&self) -> String {
        let present = self.namespaces();
        let Ok(cfg) = self.load_config() else {
            return if present.is_empty() {
                format!("lab {}: down\n", self.name)
            } else {
                format!(
                    "lab {}: no description in {}, but namespaces remain: {} (run `observer-lab down --name {}`)\n",
                    self.name,
                    self.state_dir().display(),
                    present.join(" "),
                    self.name
                )
            };
        };
        describe(self, &cfg, &present)
    }
}

/// Unpin every agent directory under `root` whose name starts with `prefix`.
fn remove_pins(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            // Unlinking a pin drops the kernel's reference; the map goes with its last user.
            for pin in [observer_common::FLOWS_PIN, observer_common::CT_ORIG_PIN] {
                let _ = std::fs::remove_file(e.path().join(pin));
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn describe(lab: &Lab, cfg: &LabConfig, present: &[String]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let state = |ns: &str| {
        if present.iter().any(|p| p == ns) {
            "up"
        } else {
            "MISSING"
        }
    };
    let _ = writeln!(
        s,
        "lab {} (state in {})",
        lab.name,
        lab.state_dir().display()
    );
    let _ = writeln!(
        s,
        "nodes (eth0 <-> VPC router netns {}-{VPC} with its firewall; no NAT, no encapsulation):",
        lab.name
    );
    for n in &cfg.nodes {
        let ns = lab.ns(&n.name);
        let _ = writeln!(
            s,
            "  {:<10} netns {:<16} {:<4} ip {:<12} pods {}{}",
            n.name,
            ns,
            state(&ns),
            n.ip,
            n.pod_cidr,
            n.pod_cidr6.map(|c| format!(", {c}")).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "pods:");
    for p in &cfg.pods {
        let ns = lab.ns(&p.name);
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "  {:<10} netns {:<16} {:<4} on {:<7} ns {:<10} ip {}{}  node iface {}  [{}]",
            p.name,
            ns,
            state(&ns),
            p.node,
            p.namespace,
            p.ip,
            p.ip6.map(|i| format!(", {i}")).unwrap_or_default(),
            cfg.host_veth(&p.name),
            labels.join(",")
        );
    }
    let _ = match cfg.load_balancer {
        LoadBalancer::Socket => writeln!(
            s,
            "services (a socket load balancer in the pods' connect()/sendmsg() for ClusterIPs; kube-proxy iptables mode for the rest):"
        ),
        lb => writeln!(
            s,
            "services (kube-proxy {} mode on every node):",
            lb.as_str()
        ),
    };
    for svc in &cfg.services {
        for port in &svc.ports {
            let eps: Vec<String> = cfg
                .endpoints(svc)
                .map(|p| {
                    let ip = if svc.cluster_ip.is_ipv6() {
                        p.ip6.map(|i| format!("[{i}]")).unwrap_or_default()
                    } else {
                        p.ip.to_string()
                    };
                    format!("{}={ip}:{}", p.name, port.target_port)
                })
                .collect();
            let vip = if svc.cluster_ip.is_ipv6() {
                format!("[{}]:{}", svc.cluster_ip, port.port)
            } else {
                format!("{}:{}", svc.cluster_ip, port.port)
            };
            let _ = writeln!(
                s,
                "  {}/{:<8} {} {:<24} -> {}",
                svc.namespace,
                svc.name,
                kubeproxy::proto_upper(port.protocol),
                vip,
                if eps.is_empty() {
                    "no endpoints (kube-proxy rejects it)".to_owned()
                } else {
                    eps.join(", ")
                }
            );
        }
    }
    s
}
