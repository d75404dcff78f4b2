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

/// How the CNI names a pod's host-side veth (the lab description's `pod_ifaces`), so the agent's
/// interface discovery is tested against each: all are veths whose peer is in the pod's network
/// namespace, only the names differ.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodIfaceNames {
    /// `veth` + 8 hex digits: bridge CNIs (flannel, kindnet) and the CNI plugins' default.
    #[default]
    Veth,
    /// `cali` + 11 hex digits, as Calico names them.
    Calico,
    /// `lxc` + 12 hex digits, as Cilium names them.
    Cilium,
}

impl PodIfaceNames {
    /// Host-side veth name for `pod`: a hash of its name, as CNIs hash the workload's.
    pub fn host_veth(self, pod: &str) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in pod.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        match self {
            PodIfaceNames::Veth => format!("veth{:08x}", fnv32(pod)),
            PodIfaceNames::Calico => format!("cali{:011x}", h >> 20),
            PodIfaceNames::Cilium => format!("lxc{:012x}", h >> 16),
        }
    }
}

fn fnv32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod pod_iface_tests {
    use super::PodIfaceNames;

    #[test]
    fn host_veths_are_named_as_each_cni_names_them_within_ifnamsiz() {
        for (names, prefix, len) in [
            (PodIfaceNames::Veth, "veth", 12),
            (PodIfaceNames::Calico, "cali", 15),
            (PodIfaceNames::Cilium, "lxc", 15),
        ] {
            let n = names.host_veth("pod-a");
            assert!(n.starts_with(prefix) && n.len() == len, "{n}");
            assert_ne!(n, names.host_veth("pod-b"));
        }
        // The names the lab always had.
        assert_eq!(PodIfaceNames::Veth.host_veth("pod-a"), "vethf3204136");
    }
}
