//! The flow record: what one connection looked like at every layer of one node.
//!
//! Versioned by [`SCHEMA`]; documented in docs/flow-schema.md and docs/flow-schema.json (the
//! tests validate real output against the latter). Adding a field is compatible; renaming or
//! changing the meaning of one bumps the version.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "observer.flow/v3";
/// Earlier versions this build still reads (`explain`, `suggest`).
pub const SCHEMA_READ: &[&str] = &["observer.flow/v1", "observer.flow/v2", SCHEMA];

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TupleView {
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ObservedAs {
    /// The client pod is on this node: the record has the pre-DNAT tuple.
    Sender,
    /// Only the server side is on this node: the flow arrived already translated.
    Receiver,
    /// Client and server pods are both on this node.
    Local,
    /// Neither end is a pod of this node (routed through).
    Transit,
}

impl ObservedAs {
    pub fn as_str(&self) -> &'static str {
        match self {
            ObservedAs::Sender => "sender",
            ObservedAs::Receiver => "receiver",
            ObservedAs::Local => "local",
            ObservedAs::Transit => "transit",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client to server.
    Orig,
    /// Server to client.
    Reply,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// `socket`, `pod_ingress`, `pod_egress`, `uplink_ingress`, `uplink_egress`, or where the
    /// filter table evaluated it: `filter_forward`, `filter_input`, `filter_output` (and
    /// `filter_*_passed` for packets seen only after the table).
    pub point: String,
    pub iface: Option<String>,
    pub node: String,
    pub dir: Direction,
    /// The tuple as this hop saw it.
    pub tuple: TupleView,
    /// Not counted at `socket`.
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    pub first_seen: String,
    pub last_seen: String,
    /// TCP flags seen at this hop, e.g. "SYN|ACK|FIN".
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tcp_flags: Option<String>,
    /// Filter points (`filter_forward`, `filter_input`, `filter_output`): how many of `packets`
    /// the filter table let through.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub passed: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Node where the destination was rewritten.
    pub node: String,
    /// Last hop that saw the pre-DNAT tuple, and first hop that saw the post-DNAT tuple: the
    /// rewrite happened in the node's IP stack between the two (netfilter, where kube-proxy's
    /// KUBE-SERVICES chains hang off nat PREROUTING). With the filter hooks, a filter point:
    /// DNAT before the filter table, SNAT after it.
    pub after: String,
    pub before: String,
    /// What joined the pre- and post-DNAT tuples: `conntrack` (the kernel's NAT state, read from
    /// the packet's conntrack entry at the egress point, names the pre-DNAT tuple as the
    /// original), `conntrack_mismatch` (it names another one: the join by client endpoint was
    /// wrong), or `client_endpoint` (no NAT state was read: inferred from the unchanged client
    /// IP and port). Absent in records of older agents.
    #[serde(default = "inferred")]
    pub evidence: String,
    /// What was rewritten: `dnat` (the destination), `snat` (the source: masquerade), or
    /// `dnat_snat` (both, e.g. a hairpin or a NodePort with `externalTrafficPolicy: Cluster`).
    /// Since v2; v1 records translated the destination only.
    #[serde(default = "dnat")]
    pub kind: String,
    /// Who rewrote it, when the kernel said so: `netfilter` (a conntrack NAT entry, in
    /// `ct_zone`) or `socket` (a socket load balancer, in connect()/sendmsg()). Absent when the
    /// join was inferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ct_zone: Option<u16>,
}

fn dnat() -> String {
    "dnat".into()
}

fn inferred() -> String {
    "client_endpoint".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SocketInfo {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// Destination passed to connect()/sendmsg().
    pub asked: TupleView,
}

/// The last observation point on this node that saw the client's packets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LastSeen {
    pub node: String,
    pub point: String,
}

/// The tuple the filter table (NetworkPolicy) evaluated on this node, and how we know it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PolicyView {
    pub node: String,
    pub tuple: TupleView,
    /// `filter_hook`: measured by the agent's netfilter programs just before the filter table
    /// (and just after it, for `passed`). `drop`: the packet netfilter dropped, read at the drop.
    /// `derived`: inferred without those programs, from the client's source as it entered
    /// (pod_ingress or uplink_ingress) and the destination as it left (uplink_egress or
    /// pod_egress): DNAT happens before the filter table, SNAT after it. Records of schema v1 and
    /// v2 call the derived view `egress_hop` or `ingress_hop`.
    pub source: String,
    /// `filter_hook` only: the netfilter hook, `forward` (routed: a pod's traffic), `input` (to a
    /// process of the node) or `output` (from one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// `filter_hook` only: client packets that reached the filter table, and those it let through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed: Option<u64>,
    /// `filter_hook` only: `passed`, `dropped` or `partly_dropped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

impl PolicyView {
    /// Measured by the filter hooks or read at a drop, as opposed to derived.
    pub fn is_measured(&self) -> bool {
        matches!(self.source.as_str(), "filter_hook" | "drop")
    }
}

/// Where and why the kernel dropped packets of this connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Drop {
    pub node: String,
    /// `enum skb_drop_reason` name without its prefix, e.g. `NETFILTER_DROP`.
    pub reason: String,
    /// The layer, from the dropping function: `netfilter`, `tc`, `ip`, `tcp`, `udp`, or the
    /// function's name.
    pub point: String,
    /// Kernel function that dropped it, e.g. `nft_do_chain+0x3e8` (netfilter).
    pub location: String,
    /// Device the packet was on.
    pub iface: Option<String>,
    /// The tuple of the dropped packet: what the dropping layer saw.
    pub tuple: TupleView,
    pub packets: u64,
    pub last_seen: String,
    /// The rule that dropped it, traced by the kernel (`--trace-drop-rules`; netfilter drops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<DropRule>,
}

/// A netfilter rule, as the kernel's nftables trace named it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DropRule {
    /// Family and table, e.g. `ip filter`.
    pub table: String,
    pub chain: String,
    /// The rule: `iptables -S` form for a table iptables-nft manages, else nft's (counters left
    /// out); `policy drop` for the chain's policy.
    pub rule: String,
    /// Its comment, where kube-proxy and Calico name the Service or policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl std::fmt::Display for DropRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.table, self.chain, self.rule)
    }
}

/// A pod, by its Kubernetes names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub node: String,
    /// Labels of the pod's namespace (what a NetworkPolicy namespaceSelector matches).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub namespace_labels: std::collections::BTreeMap<String, String>,
}

/// The Service port a client asked for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    pub schema: String,
    /// When this record was written.
    pub time: String,
    pub node: String,
    pub proto: String,
    pub family: String,
    pub observed_as: ObservedAs,
    /// Client to server as the client pod sent it (null when the client is not on this node).
    pub pre_dnat: Option<TupleView>,
    /// Client to server as it left the node's IP stack (null if it never left).
    pub post_dnat: Option<TupleView>,
    pub translated: bool,
    pub translation: Option<Translation>,
    pub socket: Option<SocketInfo>,
    pub hops: Vec<Hop>,
    /// Last point on this node that saw the client's packets.
    pub last_seen: LastSeen,
    /// The client -> server tuple on the node-to-node wire (uplink), null if it never was there.
    pub wire_view: Option<TupleView>,
    pub policy_view: Option<PolicyView>,
    /// Null when the kernel dropped none of its packets on this node (with a reason).
    pub drop: Option<Drop>,
    pub totals: Totals,
    /// TCP: syn_sent, established, closed, reset. Other protocols: active, ended.
    pub state: String,
    /// False for interim records of a connection still in progress.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// The client pod (when the agent knows names: `--names`, or Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<PodRef>,
    /// The server pod (after DNAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<PodRef>,
    /// The Service the client asked for, when it asked for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    pub start: String,
    pub end: String,
    /// Why its counts or hops may be incomplete: `flow_map_full` (the kernel's flow map refused a
    /// new key while it was active, so a hop may be missing), `reuse_race` (its client port was
    /// reused from a connection the agent was removing, and its first packets went with it:
    /// the kernel made the key again before the agent could put them back).
    /// Absent when complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<Vec<String>>,
    /// A time no program counted this connection's packets: the agent was restarted while it
    /// was open, and this one took the counters the previous one left pinned. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<Gap>,
}

/// Packets of the connection that passed in this window were not counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// When the previous agent's programs stopped counting (its orderly stop), or, after a
    /// crash, the last packet they counted on this node (the gap began then or later).
    pub from: String,
    /// When this agent's programs were attached.
    pub to: String,
    /// `stopped` (SIGTERM, e.g. a rolling update) or `crashed` (no orderly stop recorded).
    pub previous_agent: String,
}

impl FlowRecord {
    /// One connection on one node across its interim and final records: protocol, start, and
    /// the client's tuple (or the first one known).
    pub fn connection_id(&self) -> String {
        let t = self
            .client_tuple()
            .or(self.wire_view.as_ref())
            .or(self.post_dnat.as_ref());
        match t {
            Some(t) => format!(
                "{} {} {}:{} {}:{}",
                self.proto, self.start, t.src, t.sport, t.dst, t.dport
            ),
            None => format!("{} {}", self.proto, self.start),
        }
    }

    /// Client -> server as the client sent it (pre-DNAT), else as it left this node.
    pub fn client_tuple(&self) -> Option<&TupleView> {
        self.pre_dnat.as_ref().or(self.post_dnat.as_ref())
    }

    /// Client -> server after DNAT: as it left this node, else as the layer that dropped it
    /// saw it, else the filter table's view.
    pub fn backend_tuple(&self) -> Option<&TupleView> {
        self.post_dnat
            .as_ref()
            .or(self.drop.as_ref().map(|d| &d.tuple))
            .or(self.policy_view.as_ref().map(|p| &p.tuple))
    }
}
