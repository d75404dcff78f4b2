//! Command line of `observer-lab`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "observer-lab",
    version,
    about = "A two-node Kubernetes-shaped lab from network namespaces on this machine: pods, \
kube-proxy DNAT, NetworkPolicy, a VPC firewall",
    long_about = "observer-lab builds two nodes and their pods as network namespaces, with \
kube-proxy-shaped DNAT rules, Calico-shaped NetworkPolicy chains and a VPC firewall between the \
nodes, so `observer agent` can be watched recording the whole story without a cluster. Nothing is \
added to the host's own network namespace.\n\nStart: `observer-lab up`, then `observer agent \
--lab obs --node node-a` (and node-b), and `observer observe -f --lab obs`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab: nodes, pods, routes and kube-proxy rules, and start the pods' servers.
    Up(LabUpArgs),
    /// Remove everything the lab created (also after a crash).
    Down(LabNameArgs),
    /// Print the lab's description and whether its namespaces exist.
    Status(LabNameArgs),
    /// Run a command inside a lab pod or node, e.g. `observer-lab exec pod-a -- curl ...`.
    Exec(LabExecArgs),
    /// Replace the lab's NetworkPolicies (networking.k8s.io/v1 YAML) while it runs.
    Apply(LabApplyArgs),
    /// Add a pod (namespace, veth, routes) to a running lab, e.g. to watch an agent pick it up.
    AddPod(LabAddPodArgs),
    /// Delete a pod from a running lab.
    DelPod(LabDelPodArgs),
    /// Print the default lab description (the story), to copy and edit.
    Example,
    /// Print the path of the lab's names file (for `observer agent --names`, `observer explain
    /// --names`).
    Names(LabNameArgs),
    /// Traffic generator used inside pods: connect to ADDR:PORT and exchange a request.
    Client(ClientArgs),
    /// Load generator used inside pods: short connections (or UDP exchanges) at a fixed rate for
    /// a fixed time; prints what it did as JSON (answered, failed, not started, client ports).
    Storm(StormArgs),
    /// An OTLP/gRPC logs receiver in a lab node's namespace, printing the body of each log
    /// record it is sent (for `observer agent --otlp-endpoint http://127.0.0.1:4317`).
    OtlpReceiver(OtlpReceiverArgs),
    /// Server run inside each pod by `lab up` (TCP answers like HTTP, UDP echoes).
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct LabNameArgs {
    /// Lab name: prefix of every namespace it creates (`NAME-node-a`, `NAME-pod-a`, ...).
    #[arg(long, env = "OBSERVER_LAB", default_value = "obs")]
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct LabUpArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// Lab description (TOML); default: the built-in story (`observer-lab example`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// kube-proxy's mode on every node, over the description's `load_balancer`.
    #[arg(long, value_enum)]
    pub lb: Option<crate::model::LoadBalancer>,
    /// How pods' host-side veths are named, as this CNI names them (over the description's
    /// `pod_ifaces`).
    #[arg(long, value_enum)]
    pub pod_ifaces: Option<crate::model::PodIfaceNames>,
}

#[derive(Args, Debug, Clone)]
pub struct OtlpReceiverArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// The node (or pod) whose network namespace it listens in.
    #[arg(long, default_value = "node-a")]
    pub node: String,
    /// Where it listens there.
    #[arg(long, default_value = "127.0.0.1:4317")]
    pub listen: SocketAddr,
}

#[derive(Args, Debug, Clone)]
pub struct LabApplyArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// YAML with NetworkPolicy documents (`---`-separated); an empty file removes them all.
    pub file: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct LabAddPodArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// Pod name.
    pub pod: String,
    /// Node to put it on.
    #[arg(long)]
    pub node: String,
    /// IPv4 address inside the node's pod_cidr.
    #[arg(long)]
    pub ip: std::net::Ipv4Addr,
    /// IPv6 address inside the node's pod_cidr6.
    #[arg(long)]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Kubernetes namespace (declared in the lab description if it is new).
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

#[derive(Args, Debug, Clone)]
pub struct LabDelPodArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// Pod name.
    pub pod: String,
}

#[derive(Args, Debug, Clone)]
pub struct LabExecArgs {
    #[command(flatten)]
    pub lab: LabNameArgs,
    /// Pod or node name from the lab description.
    pub target: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum L4 {
    Tcp,
    Udp,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Destination, e.g. 100.64.0.10:443 or [fd00:100:64::10]:443.
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, value_enum, default_value_t = L4::Tcp)]
    pub proto: L4,
    /// Number of connections (UDP: sockets, one datagram exchange each).
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Per-exchange timeout.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keep each connection open this long before closing (for "in flight" tests).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Send every connection from this source port, one after the other (a client reusing its
    /// 4-tuple; forces --concurrency 1).
    #[arg(long)]
    pub source_port: Option<u16>,
}

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// Destination, e.g. 100.64.0.10:443.
    #[arg(long)]
    pub to: SocketAddr,
    #[arg(long, value_enum, default_value_t = L4::Tcp)]
    pub proto: L4,
    /// New connections (UDP: exchanges, each from a new socket) per second.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: u32,
    /// How long to keep starting them.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Per-exchange timeout.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Connections open at once at most; one due while this many are open is not started
    /// (and counted as such).
    #[arg(long, default_value_t = 4000)]
    pub max_in_flight: usize,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Name put in every answer (the pod name).
    #[arg(long)]
    pub name: String,
    #[arg(long = "tcp")]
    pub tcp_ports: Vec<u16>,
    #[arg(long = "udp")]
    pub udp_ports: Vec<u16>,
    /// File written once every socket is bound.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 1m)"))
}
