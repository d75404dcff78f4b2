//! The lab description: nodes, namespaces, pods, Services (TOML).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};

pub use crate::model::{Cidr, LoadBalancer, Protocol};
use crate::model::{VPC, net24};

pub const STORY: &str = include_str!("../../lab/story.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("lab description is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("lab description: {0}")]
    Invalid(String),
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LabConfig {
    /// kube-proxy's mode on every node (`iptables` when absent).
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// How pods' host-side veths are named: `veth` (default), `calico` (`cali*`) or `cilium`
    /// (`lxc*`).
    #[serde(default)]
    pub pod_ifaces: crate::model::PodIfaceNames,
    pub cluster_cidr: Cidr,
    pub cluster_cidr6: Option<Cidr>,
    pub service_cidr: Cidr,
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// YAML, `---`-separated: networking.k8s.io/v1 NetworkPolicies (enforced in the nodes the
    /// way Calico's iptables dataplane does) and at most one lab.observer/v1 Firewall (the VPC
    /// between the nodes; GKE's default when absent). `observer-lab apply FILE` replaces them.
    #[serde(default)]
    pub policies: String,
    /// A host outside the cluster, beyond the VPC (the Internet side).
    pub outside: Option<Outside>,
}

/// A host outside the cluster: it reaches NodePorts on the node IPs, and pods reach it through
/// their node's masquerade (ip-masq-agent's rules: everything not bound for the cluster, the
/// Service range or the node network leaves with the node's address).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Outside {
    pub ip: Ipv4Addr,
    /// TCP ports it serves.
    #[serde(default)]
    pub tcp: Vec<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    pub pod_cidr: Cidr,
    pub pod_cidr6: Option<Cidr>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named container ports, for NetworkPolicy named ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    /// `type: NodePort` (with `externalTrafficPolicy: Cluster`): this port on every node's IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: IpAddr,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

impl LabConfig {
    /// `pod`'s host-side veth, named as this lab's CNI would.
    pub fn host_veth(&self, pod: &str) -> String {
        self.pod_ifaces.host_veth(pod)
    }

    pub fn parse(text: &str) -> Result<LabConfig, ConfigError> {
        let cfg: LabConfig = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[cfg(test)]
    pub fn story() -> LabConfig {
        LabConfig::parse(STORY).expect("the built-in story is valid")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.nodes.len() != 2 {
            return bad(format!(
                "the lab joins exactly two nodes with one wire; {} given",
                self.nodes.len()
            ));
        }
        let mut names = BTreeSet::new();
        for n in self
            .nodes
            .iter()
            .map(|n| &n.name)
            .chain(self.pods.iter().map(|p| &p.name))
        {
            if n == VPC {
                return bad(format!("{n:?} is the VPC namespace's name; pick another"));
            }
            if !valid_name(n) {
                return bad(format!("{n:?}: node and pod names are 1-20 of [a-z0-9-]"));
            }
            if !names.insert(n) {
                return bad(format!(
                    "{n:?} is used twice (node and pod names share one space)"
                ));
            }
        }
        for p in &self.pods {
            let Some(node) = self.node(&p.node) else {
                return bad(format!("pod {}: unknown node {:?}", p.name, p.node));
            };
            if !node.pod_cidr.contains(p.ip.into()) {
                return bad(format!(
                    "pod {}: {} is outside {}'s pod_cidr {}",
                    p.name, p.ip, node.name, node.pod_cidr
                ));
            }
            if let Some(ip6) = p.ip6 {
                match node.pod_cidr6 {
                    Some(c) if c.contains(ip6.into()) => {}
                    _ => {
                        return bad(format!(
                            "pod {}: {ip6} is outside {}'s pod_cidr6",
                            p.name, node.name
                        ));
                    }
                }
            }
            if !self.namespaces.iter().any(|n| n.name == p.namespace) {
                return bad(format!(
                    "pod {}: namespace {:?} is not declared",
                    p.name, p.namespace
                ));
            }
        }
        for s in &self.services {
            if s.cluster_ip.is_ipv4() && !self.service_cidr.contains(s.cluster_ip) {
                return bad(format!(
                    "service {}/{}: {} is outside service_cidr {}",
                    s.namespace, s.name, s.cluster_ip, self.service_cidr
                ));
            }
            if s.cluster_ip.is_ipv6() && self.cluster_cidr6.is_none() {
                return bad(format!(
                    "service {}/{}: IPv6 Service needs cluster_cidr6",
                    s.namespace, s.name
                ));
            }
            for ep in self.endpoints(s) {
                if s.cluster_ip.is_ipv6() && ep.ip6.is_none() {
                    return bad(format!(
                        "service {}/{}: endpoint {} has no ip6",
                        s.namespace, s.name, ep.name
                    ));
                }
            }
            for np in s.ports.iter().filter_map(|p| p.node_port) {
                // kube-proxy's default --service-node-port-range.
                if !(30000..=32767).contains(&np) || s.cluster_ip.is_ipv6() {
                    return bad(format!(
                        "service {}/{}: node_port {np} (30000-32767, IPv4 Services here)",
                        s.namespace, s.name
                    ));
                }
            }
        }
        self.validate_outside()
    }

    fn validate_outside(&self) -> Result<(), ConfigError> {
        let Some(o) = &self.outside else {
            return Ok(());
        };
        let ip = std::net::IpAddr::V4(o.ip);
        let node_net = |n: &Node| net24(n.ip) == net24(o.ip);
        if self.cluster_cidr.contains(ip)
            || self.service_cidr.contains(ip)
            || self.nodes.iter().any(node_net)
        {
            return Err(ConfigError::Invalid(format!(
                "outside {}: must be outside the cluster, Service and node ranges",
                o.ip
            )));
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Pods selected by a Service, in declaration order (as EndpointSlices would list them).
    pub fn endpoints<'a>(&'a self, s: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.iter().filter(move |p| {
            p.namespace == s.namespace && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
        })
    }

    /// The addresses of a Service's endpoints in one family (IPv6 or not), in endpoint order.
    pub fn endpoint_ips(&self, s: &Service, v6: bool) -> Vec<IpAddr> {
        self.endpoints(s)
            .filter_map(|pod| {
                if v6 {
                    pod.ip6.map(IpAddr::V6)
                } else {
                    Some(IpAddr::V4(pod.ip))
                }
            })
            .collect()
    }

    /// (target port, protocol) pairs a pod must serve.
    pub fn listeners(&self, pod: &Pod) -> BTreeSet<(u16, Protocol)> {
        self.services
            .iter()
            .filter(|s| self.endpoints(s).any(|p| p.name == pod.name))
            .flat_map(|s| s.ports.iter().map(|p| (p.target_port, p.protocol)))
            .collect()
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 20
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn story_is_valid_and_has_the_four_services() {
        let cfg = LabConfig::story();
        assert_eq!(cfg.nodes.len(), 2);
        let web = cfg.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.cluster_ip.to_string(), "100.64.0.10");
        assert_eq!(web.ports[0].target_port, 8443);
        let eps: Vec<_> = cfg.endpoints(web).map(|p| p.name.as_str()).collect();
        assert_eq!(eps, ["pod-b"]);
        let api = cfg.services.iter().find(|s| s.name == "api").unwrap();
        assert_eq!(cfg.endpoints(api).count(), 2);
        assert!(
            cfg.services
                .iter()
                .any(|s| s.ports[0].protocol == Protocol::Udp)
        );
        assert!(cfg.services.iter().any(|s| s.cluster_ip.is_ipv6()));
        let pod_b = cfg.pods.iter().find(|p| p.name == "pod-b").unwrap();
        assert!(cfg.listeners(pod_b).contains(&(8443, Protocol::Tcp)));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let text = STORY.replace("ip = \"10.244.2.10\"", "ip = \"10.244.9.10\"");
        let err = LabConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("outside node-b's pod_cidr"), "{err}");
        let text = STORY.replace("cluster_cidr = ", "clustr_cidr = ");
        assert!(LabConfig::parse(&text).is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.244.1.0/24".parse().unwrap();
        assert!(c.contains("10.244.1.200".parse().unwrap()));
        assert!(!c.contains("10.244.2.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let c6: Cidr = "fd00:10:244:1::/64".parse().unwrap();
        assert!(c6.contains("fd00:10:244:1::10".parse().unwrap()));
    }
}
