//! Command line: `observer agent`, `observer observe`, `observer explain`, `observer suggest`, `observer test-run`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    explain::{ExplainArgs, SuggestArgs},
    hooks::TcMode,
};

#[derive(Parser, Debug)]
#[command(
    name = "observer",
    version,
    about = "eBPF live flow observer: which tuple each layer of a Kubernetes node saw, per connection",
    long_about = "observer records every connection twice in the kernel: as the pod sent it \
(before kube-proxy's DNAT) and as it left the node (after DNAT), and says which tuple each layer \
saw: socket, pod veth, node uplink (the node-to-node wire a firewall sees), remote node.\n\n\
Run `observer agent` on a node (or in a node of the lab that `observer-lab up` builds), and \
`observer explain` on the records."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the kernel programs in this network namespace and write flow records and metrics.
    Agent(Box<AgentArgs>),
    /// Watch flow records as they are written, from flow logs or agents, filtered on their own
    /// fields: namespace, pod, Service, node, IP, port, verdict, ...
    Observe(Box<crate::observe::ObserveArgs>),
    /// Explain a connection from the agents' flow records: which tuple each layer saw, where it
    /// stopped, why, and the fix in that layer's terms.
    Explain(Box<ExplainArgs>),
    /// NetworkPolicies (client egress, server ingress) that allow exactly the observed
    /// connections, in targetPort terms.
    Suggest(SuggestArgs),
    /// Run the kernel programs on crafted packets with BPF_PROG_TEST_RUN (nothing attached): what
    /// each records for a frame, and what it costs next to reference programs.
    TestRun(crate::test_run::TestRunArgs),
}

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Node name written in every record.
    #[arg(long, env = "KUBE_NODE_NAME", default_value_t = default_node_name())]
    pub node: String,

    /// Network namespace to observe, by `ip netns` name or path (e.g. /run/netns/lab-node-a).
    /// Default: the one the agent was started in (the host network in a DaemonSet). Unlike
    /// `ip netns exec`, this keeps the host's mounts, so the cgroup v2 mount stays visible.
    #[arg(long, env = "OBSERVER_NETNS")]
    pub netns: Option<String>,

    /// Be the agent of node `--node` of the lab `observer-lab up --name NAME` built: its network
    /// namespace, the lab's names file, and /flows where that file says (the node's loopback,
    /// with the lab's token), so `observer observe|explain --lab NAME` find it. Flags given
    /// override each.
    #[arg(long, env = "OBSERVER_AGENT_LAB", value_name = "NAME")]
    pub lab: Option<String>,

    /// Node uplink (the node-to-node wire); repeatable. Default: every interface that carries a
    /// gateway route (default route or a route via another node).
    #[arg(long = "uplink", env = "OBSERVER_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,

    /// Pods' host-side interfaces: `auto` (default), every veth whose peer is in another network
    /// namespace, whatever the CNI names it (Calico `cali*`, Cilium `lxc*`, GKE `gke*`, AWS
    /// `eni*`, bridge CNIs' `veth*`); or a glob such as `cali*` to narrow it. Uplinks are
    /// excluded. Looked for again when rtnetlink announces a link change (and every second), so
    /// a new pod's veth is attached before its first packets and a deleted one forgotten; the
    /// agent says at start which it found.
    #[arg(long, env = "OBSERVER_POD_IFACE", default_value = "auto")]
    pub pod_iface: String,

    /// cgroup v2 directory for the socket hooks. Default: the cgroup v2 mount point.
    #[arg(long, env = "OBSERVER_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Do not attach the cgroup socket hooks (records then carry no pid/comm).
    #[arg(long, env = "OBSERVER_NO_SOCKET_HOOKS")]
    pub no_socket_hooks: bool,

    /// Where JSON flow records go, one object a line: a file (appended) or `-` for stdout.
    #[arg(long, env = "OBSERVER_FLOW_LOG", default_value = "-")]
    pub flow_log: String,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "OBSERVER_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,

    /// Serve the recent flow records at /flows on this address, for `observer explain
    /// http://ADDR/flows`. Off by default: they name every pod's connections, processes and
    /// labels. Needs --flows-token-file, or --flows-auth kubernetes.
    #[arg(long, env = "OBSERVER_FLOWS_ADDR")]
    pub flows_addr: Option<SocketAddr>,

    /// Who may read /flows: `token`, the holder of the bearer token in --flows-token-file;
    /// `kubernetes`, a user whose token (for --flows-token-audience) the API server accepts
    /// (TokenReview) and whom RBAC lets `get` the non-resource URL /flows
    /// (SubjectAccessReview). `kubernetes` needs --kubernetes or --kubeconfig.
    #[arg(long, env = "OBSERVER_FLOWS_AUTH", value_enum, default_value_t = FlowsAuthMode::Token, requires = "flows_addr")]
    pub flows_auth: FlowsAuthMode,

    /// File holding the bearer token a /flows client must send (`Authorization: Bearer ...`;
    /// `observer explain --token-file`), e.g. a mounted Secret; read on each request, so a
    /// rotated token needs no restart.
    #[arg(long, env = "OBSERVER_FLOWS_TOKEN_FILE", requires = "flows_addr")]
    pub flows_token_file: Option<PathBuf>,

    /// With --flows-auth kubernetes, the audience a reader's token must be issued for
    /// (`kubectl create token SA --audience observer`): a token for the API server itself is
    /// refused, so a token sent to /flows is of no use against the API.
    #[arg(
        long,
        env = "OBSERVER_FLOWS_TOKEN_AUDIENCE",
        default_value = "observer"
    )]
    pub flows_token_audience: String,

    /// Records queued for each client following /flows (`observe -f`); a client that lets this
    /// many pile up is disconnected and counted (observer_flows_followers_dropped_total), so a
    /// stalled reader costs at most this many records of memory.
    #[arg(
        long,
        env = "OBSERVER_FLOWS_FOLLOW_QUEUE",
        default_value_t = crate::export::recent::FOLLOW_QUEUE,
        requires = "flows_addr"
    )]
    pub flows_follow_queue: usize,

    /// Also send every record to this OTLP/gRPC receiver, e.g. an OpenTelemetry Collector
    /// (`http://otel-collector.observability:4317`), as a log record: the JSON record as body,
    /// its fields as attributes (docs/shipping-logs.md). The flow log stays as it is.
    #[arg(long, env = "OBSERVER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Records queued for the OTLP receiver while it is down or slow; beyond that they are
    /// counted lost (observer_records_lost_total{reason="otlp_queue_full"}).
    #[arg(
        long,
        env = "OBSERVER_OTLP_QUEUE",
        default_value_t = 100_000,
        requires = "otlp_endpoint"
    )]
    pub otlp_queue: usize,

    /// Interval between interim records of long-lived connections.
    #[arg(long, env = "OBSERVER_FLUSH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// A connection with no packet for this long is ended (UDP, ICMP, unanswered TCP).
    #[arg(long, env = "OBSERVER_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Idle limit for answered TCP connections that did not close (FIN/RST end them sooner).
    #[arg(long, env = "OBSERVER_TCP_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// How often kernel counters are read.
    #[arg(long, env = "OBSERVER_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Capacity of the in-kernel flow map (one entry per flow direction per observation point).
    #[arg(long, env = "OBSERVER_MAX_FLOWS", default_value_t = observer_common::FLOWS_MAX_ENTRIES)]
    pub max_flows: u32,

    /// Do not read packets' conntrack entries: pre/post-NAT tuples are then joined by client
    /// endpoint only, and records say so (`translation.evidence: client_endpoint`). For
    /// measuring what the read costs (`cargo xtask bench`).
    #[arg(long, env = "OBSERVER_NO_NAT_STATE")]
    pub no_nat_state: bool,

    /// Do not link the netfilter programs around the filter table: `policy_view` is then
    /// derived from the tc points around it, and records say so (`policy_view.source: derived`).
    /// For kernels without BPF netfilter links (before 6.4), and for measuring what they cost.
    #[arg(long, env = "OBSERVER_NO_FILTER_HOOK")]
    pub no_filter_hook: bool,

    /// Name the netfilter rule behind each drop (`drop.rule`: chain, rule and comment): the next
    /// packets of a dropped client/backend pair are traced with nftables' own trace, from a table
    /// of the agent's that only sets the trace mark, removed right after. Needs `nft` (and
    /// `iptables` for iptables-nft's comments); one trace at a time, each pair once a minute.
    #[arg(long, env = "OBSERVER_TRACE_DROP_RULES")]
    pub trace_drop_rules: bool,

    /// Name pods and Services in records from this names file (docs/names-file.md), where
    /// there is no Kubernetes API: bare metal, VMs, the lab (`observer-lab names`).
    #[arg(long, env = "OBSERVER_NAMES", conflicts_with_all = ["kubeconfig", "kubernetes"])]
    pub names: Option<PathBuf>,

    /// Name pods and Services from the Kubernetes API, with this kubeconfig.
    #[arg(long, env = "OBSERVER_KUBECONFIG", conflicts_with = "kubernetes")]
    pub kubeconfig: Option<String>,

    /// Name pods and Services from the Kubernetes API, in-cluster (service account).
    #[arg(long, env = "OBSERVER_KUBERNETES")]
    pub kubernetes: bool,

    /// How tc programs are attached.
    #[arg(long, env = "OBSERVER_TC_MODE", value_enum, default_value_t = TcMode::Auto)]
    pub tc_mode: TcMode,

    /// Directory on a bpf filesystem where the flow map is pinned, so a restarted agent keeps
    /// the counters of open flows. Default: /sys/fs/bpf/observer/<netns name, or `host`>, used
    /// only if /sys/fs/bpf is a bpf filesystem (a warning says so otherwise).
    #[arg(long, env = "OBSERVER_PIN_DIR", conflicts_with = "no_pin")]
    pub pin_dir: Option<PathBuf>,

    /// Do not pin: counters live as long as the agent, and SIGTERM ends every open flow.
    #[arg(long, env = "OBSERVER_NO_PIN")]
    pub no_pin: bool,

    /// How long to wait for a previous agent (a rolling update's old pod) to release the pin
    /// directory.
    #[arg(long, env = "OBSERVER_PIN_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub pin_wait: Duration,
}

/// Run as `kubectl observer ...` (the binary, or a link to it, named `kubectl-observer` on the
/// PATH), `observe` and `explain` find the agents with the kubeconfig kubectl uses ($KUBECONFIG,
/// else ~/.kube/config) unless told otherwise.
pub fn as_kubectl_plugin(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let invoked = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "kubectl-observer");
    let sub = args.get(1).and_then(|a| a.to_str());
    if !invoked || !matches!(sub, Some("observe" | "explain")) {
        return args;
    }
    let told = args.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a.starts_with("--kubeconfig") || a == "--kubernetes")
    });
    let kubeconfig = std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).next())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")));
    if let Some(k) = kubeconfig.filter(|_| !told) {
        args.splice(2..2, ["--kubeconfig".into(), k.into_os_string()]);
    }
    args
}

/// Who may read /flows (`--flows-auth`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlowsAuthMode {
    Token,
    Kubernetes,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 1m)"))
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    #[test]
    fn as_a_kubectl_plugin_observe_and_explain_use_kubectls_kubeconfig() {
        let args = |v: &[&str]| {
            v.iter()
                .map(Into::into)
                .collect::<Vec<std::ffi::OsString>>()
        };
        // SAFETY: no other test reads KUBECONFIG.
        unsafe { std::env::set_var("KUBECONFIG", "/k/one:/k/two") };
        assert_eq!(
            super::as_kubectl_plugin(args(&["/usr/bin/kubectl-observer", "observe", "-f"])),
            args(&[
                "/usr/bin/kubectl-observer",
                "observe",
                "--kubeconfig",
                "/k/one",
                "-f"
            ])
        );
        for unchanged in [
            &["observer", "observe", "-f"][..],
            &["kubectl-observer", "observe", "--kubernetes"],
            &["kubectl-observer", "explain", "--kubeconfig=/x"],
            &["kubectl-observer", "agent"],
        ] {
            assert_eq!(super::as_kubectl_plugin(args(unchanged)), args(unchanged));
        }
    }

    /// Every agent flag can be set from the environment (a DaemonSet's `env:`), and
    /// docs/config.md lists it with that variable.
    #[test]
    fn every_agent_flag_has_an_env_var_and_a_line_in_config_md() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config.md"))
                .expect("docs/config.md");
        let cmd = Cli::command();
        let agent = cmd.find_subcommand("agent").expect("agent subcommand");
        let mut checked = 0;
        for arg in agent.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["help", "version"].contains(&long) {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no env var"))
                .to_string_lossy()
                .into_owned();
            let line = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `--{long}")))
                .unwrap_or_else(|| panic!("--{long} is not in docs/config.md"));
            assert!(line.contains(&format!("`{env}`")), "{long}: {line}");
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} flags seen");
    }
}

#[cfg(test)]
mod fuzz {
    use clap::Parser as _;
    use proptest::prelude::*;

    use super::Cli;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any words after `observer agent` or `observer explain`: parsed or refused by clap.
        #[test]
        fn any_flags_parse_or_are_refused(
            sub in prop_oneof![Just("agent"), Just("observe"), Just("explain"), Just("suggest")],
            words in prop::collection::vec(
                prop_oneof![
                    "--[a-z-]{1,16}",
                    "--(flush-interval|idle-timeout|max-flows|metrics-addr|service|client|format)",
                    "\\PC{0,12}",
                ],
                0..6,
            ),
        ) {
            let args = std::iter::once("observer").chain([sub]).chain(words.iter().map(String::as_str));
            if let Err(e) = Cli::try_parse_from(args) {
                use clap::error::ErrorKind::*;
                let shown = e.render().to_string();
                prop_assert!(
                    matches!(e.kind(), DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand)
                        || shown.starts_with("error: "),
                    "{shown}"
                );
            }
        }
    }
}
