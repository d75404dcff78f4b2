//! `observer observe` arguments (the command line in `cli.rs` embeds them).

use std::path::PathBuf;

use clap::Args;

use super::{Color, Output};

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Filters: the values of one flag are alternatives (repeat it, or separate \
them with commas), different flags must all match, and a value written !VALUE excludes what it \
matches (quote it in a shell: --namespace '!kube-system').\n\nExamples:\n  \
observer observe -f node-a.jsonl node-b.jsonl --service shop/web\n  \
observer observe -f http://10.0.0.5:9465/flows --token-file token --verdict dropped\n  \
observer observe node-a.jsonl --last 20 --ip 10.244.0.0/16 --port 8443 -o wide"
)]
pub struct ObserveArgs {
    /// Flow logs (JSON lines) of one or more agents, or agents' endpoints (`--flows-addr`),
    /// e.g. http://10.0.0.5:9465/flows; none needed with --kubeconfig or --kubernetes, which find
    /// every agent of the cluster.
    #[arg(required_unless_present_any = ["kubeconfig", "kubernetes", "lab"], value_name = "LOG|URL")]
    pub sources: Vec<String>,
    /// Keep printing records as they are written: files are followed like `tail -F` (across
    /// rotation), agents streamed, and followed again after a restart.
    #[arg(short, long)]
    pub follow: bool,
    /// Print the last N matching records already written first (default: all of them without
    /// --follow, none with it).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// File with the bearer token the agents' /flows want (their --flows-token-file).
    #[arg(long, env = "OBSERVER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[arg(short, long, value_enum, default_value_t = Output::Compact)]
    pub output: Output,
    /// Colour the verdicts: on a terminal only (auto), always or never.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,

    #[command(flatten)]
    pub filters: FilterArgs,
    #[command(flatten)]
    pub discover: crate::flow_sources::discover::DiscoverArgs,
}

/// What `observe` selects; see [`super::filter::Filter`].
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Filters")]
pub struct FilterArgs {
    /// Only records written since: a time (2026-12-02T13:00:00Z) or a duration ago (5m).
    #[arg(long, value_name = "TIME|AGO")]
    pub since: Option<String>,
    /// Only records written until: a time or a duration ago.
    #[arg(long, value_name = "TIME|AGO")]
    pub until: Option<String>,
    /// Kubernetes namespace of either pod or of the Service.
    #[arg(long, value_delimiter = ',', value_name = "NS")]
    pub namespace: Vec<String>,
    /// Client or server pod: NAME in any namespace, or NS/NAME.
    #[arg(long, value_delimiter = ',', value_name = "[NS/]NAME")]
    pub pod: Vec<String>,
    /// The Service the client asked for: NS/NAME, NAME, or the address it asked for (VIP,
    /// VIP:PORT, [V6]:PORT).
    #[arg(long, value_delimiter = ',', value_name = "SVC|VIP[:PORT]")]
    pub service: Vec<String>,
    /// Node whose agent wrote the record.
    #[arg(long, value_delimiter = ',')]
    pub node: Vec<String>,
    /// An address or range on either side of any tuple the record holds (asked for, after
    /// DNAT, on the wire).
    #[arg(long, value_delimiter = ',', value_name = "IP|CIDR")]
    pub ip: Vec<String>,
    /// A port on either side of any tuple the record holds.
    #[arg(long, value_delimiter = ',')]
    pub port: Vec<String>,
    /// tcp, udp or icmp.
    #[arg(long, value_delimiter = ',')]
    pub protocol: Vec<String>,
    /// forwarded, dropped (the kernel dropped packets of it on this node) or open (an interim
    /// record of a connection still in progress).
    #[arg(long, value_delimiter = ',')]
    pub verdict: Vec<String>,
    /// The kernel's drop reason, e.g. NETFILTER_DROP (only dropped connections match).
    #[arg(long, value_delimiter = ',', value_name = "REASON")]
    pub drop_reason: Vec<String>,
    /// Translated (DNAT or SNAT on this node) or not: true or false.
    #[arg(long, value_name = "BOOL")]
    pub translated: Option<bool>,
    /// What the node was to the connection: sender, receiver, local or transit.
    #[arg(long, value_delimiter = ',', value_name = "ROLE")]
    pub observed_as: Vec<String>,
    /// The last point on the node that saw the client's packets, e.g. uplink_egress, pod_egress,
    /// filter_forward.
    #[arg(long, value_delimiter = ',', value_name = "POINT")]
    pub last_seen: Vec<String>,
}
