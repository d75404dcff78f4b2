//! `observer explain` and `observer suggest` arguments (the command line in `cli.rs` embeds them).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::Endpoint;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Mermaid,
}

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Flow logs (JSON lines) of one or more agents, e.g. node-a.jsonl node-b.jsonl, or agents'
    /// endpoints (`--flows-addr`), e.g. http://10.0.0.5:9465/flows (the last 1000 final
    /// records); none needed with --kubeconfig or --kubernetes, which find every agent.
    #[arg(required_unless_present_any = ["kubeconfig", "kubernetes", "lab"])]
    pub files: Vec<PathBuf>,
    /// File with the bearer token the agents' /flows endpoints want (their
    /// --flows-token-file).
    #[arg(long, env = "OBSERVER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Select by the Service the client asked for: VIP:PORT or VIP (IPv6: [VIP]:PORT).
    #[arg(long, value_parser = Endpoint::parse)]
    pub service: Option<Endpoint>,
    /// Select by client: IP or IP:PORT (IPv6: [IP]:PORT).
    #[arg(long, value_parser = Endpoint::parse)]
    pub client: Option<Endpoint>,
    /// Select connections from or to this pod (named by --names, or by the records' own names).
    #[arg(long)]
    pub pod: Option<String>,
    /// Name pods, Services and ranges from this names file (docs/names-file.md; the lab writes
    /// one: `observer-lab names`). Default: the names agents wrote into the records.
    #[arg(long)]
    pub names: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Every matching connection, not only the latest.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub discover: crate::flow_sources::discover::DiscoverArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SuggestArgs {
    /// Flow logs (JSON lines) of one or more agents.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Names file of the pods the flows are between (docs/names-file.md; the lab's:
    /// `observer-lab names`).
    #[arg(long)]
    pub names: PathBuf,
}
