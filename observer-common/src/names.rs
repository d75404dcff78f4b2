//! The static names file: who an address is, for nodes without a Kubernetes API (bare metal,
//! VMs, the lab). The agent reads it with `--names FILE`, `explain`/`suggest` with `--names`;
//! the lab writes one for itself. Format: YAML (JSON is YAML too), documented in
//! `docs/names-file.md`.

use std::{collections::BTreeMap, net::IpAddr, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "observer/v1";
pub const KIND: &str = "Names";

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamesFile {
    pub api_version: String,
    pub kind: String,
    /// The pod ranges (`10.244.0.0/16`), for firewall fixes that admit the pod network.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceEntry>,
    #[serde(default)]
    pub pods: Vec<PodEntry>,
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
    /// The nodes' own addresses: what a masqueraded connection (a NodePort's client, a
    /// hostNetwork pod) carries as its source, for fixes that must name them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeEntry>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeEntry {
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Where the node's agent serves /flows, for `observe`/`explain` to find it without a
    /// Kubernetes API (the lab writes one per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentEntry>,
}

/// A node's agent as a reader reaches it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentEntry {
    /// Its /flows URL, `http://HOST:PORT/flows`; the agent listens on HOST:PORT.
    pub flows: String,
    /// The network namespace (`ip netns` name or path) the agent observes and is reached in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The file holding the bearer token /flows wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespaceEntry {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodEntry {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortEntry>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePortEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// Numeric targetPort; absent for a named one (the observed DNAT then says which).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `TCP` or `UDP`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_namespace() -> String {
    "default".into()
}

fn default_protocol() -> String {
    "TCP".into()
}

impl NamesFile {
    pub fn new() -> NamesFile {
        NamesFile {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            ..Default::default()
        }
    }

    /// What a reader must refuse: another kind or version, a protocol it does not know.
    pub fn check(&self) -> Result<(), String> {
        if self.api_version != API_VERSION || self.kind != KIND {
            return Err(std::format!(
                "expected apiVersion {API_VERSION}, kind {KIND}; got {} {}",
                self.api_version,
                self.kind
            ));
        }
        if let Some(c) = self.pod_cidrs.iter().find(|c| parse_cidr(c).is_none()) {
            return Err(std::format!("podCIDRs: {c:?} is not ADDR/LEN"));
        }
        for s in &self.services {
            for p in &s.ports {
                if p.protocol != "TCP" && p.protocol != "UDP" {
                    return Err(std::format!(
                        "service {}/{} port {}: protocol {:?} (TCP or UDP)",
                        s.namespace,
                        s.name,
                        p.port,
                        p.protocol
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `ADDR/LEN` with a prefix length that fits the address.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= if addr.is_ipv4() { 32 } else { 128 }).then_some((addr, len))
}
