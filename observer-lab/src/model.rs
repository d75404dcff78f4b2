//! The lab's vocabulary, shared by its description, policies, firewall and kube-proxy rules:
//! address prefixes, protocols, address families, object metadata, and how lab members are named.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Which kube-proxy mode programs the Services on every node.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadBalancer {
    /// kube-proxy's iptables mode (the default): KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT.
    #[default]
    Iptables,
    /// kube-proxy's nftables mode (GA in Kubernetes 1.33): `table ip kube-proxy`, a
    /// `service-ips` verdict map, `numgen` endpoint choice, `dnat to`.
    Nftables,
    /// A socket-level load balancer (cgroup connect/sendmsg/recvmsg programs, like Cilium's and
    /// Calico's eBPF kube-proxy replacements) for the pods' ClusterIPs; kube-proxy's iptables
    /// rules for the rest (NodePorts, the nodes' own processes).
    Socket,
}

impl LoadBalancer {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancer::Iptables => "iptables",
            LoadBalancer::Nftables => "nftables",
            LoadBalancer::Socket => "socket",
        }
    }
}

/// The VPC router namespace between the nodes (`<lab>-vpc`).
pub const VPC: &str = "vpc";
/// The /24 network of `ip`: the lab's node network and the outside host's are /24s.
pub fn net24(ip: std::net::Ipv4Addr) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(ip) & !0xff)
}

/// The host outside the cluster, beyond the VPC (`<lab>-outside`).
pub const OUTSIDE: &str = "outside";

#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum Family {
    V4,
    V6,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// An address prefix, written `10.244.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected ADDR/LEN"))?;
        let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, len })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn bits(ip: IpAddr) -> u128 {
            match ip {
                IpAddr::V4(v) => u32::from(v) as u128,
                IpAddr::V6(v) => u128::from(v),
            }
        }
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let width = if ip.is_ipv4() { 32 } else { 128 };
        if self.len == 0 {
            return true;
        }
        let shift = width - self.len as u32;
        bits(ip) >> shift == bits(self.addr) >> shift
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Accepted so that real manifests parse; they do not change enforcement.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code, reason = "accepted, not used")]
    pub annotations: BTreeMap<String, String>,
}

fn default_namespace() -> String {
    "default".into()
}

impl Metadata {
    pub fn named(name: &str) -> Metadata {
        Metadata {
            name: name.into(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// Host-side veth name for a pod: `veth` + 8 hex digits, as CNI plugins name them.
pub fn host_veth(pod: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in pod.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("veth{h:08x}")
}
