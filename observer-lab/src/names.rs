//! The lab's names file: its pods, Services and namespaces in the agent's `--names` format
//! (`observer_common::names`), so agents and `explain` name lab members the way they name a
//! cluster's.

use std::net::IpAddr;

use observer_common::names::{
    AgentEntry, NamesFile, NamespaceEntry, NodeEntry, PodEntry, ServiceEntry, ServicePortEntry,
};

use crate::{Lab, config::LabConfig, lab::AGENT_FLOWS, model::Protocol};

/// The lab as names, each node with where its agent is when started with `observer agent --lab`.
pub fn from_config(cfg: &LabConfig, lab: &Lab) -> NamesFile {
    let mut f = NamesFile::new();
    f.pod_cidrs = std::iter::once(cfg.cluster_cidr)
        .chain(cfg.cluster_cidr6)
        .map(|c| c.to_string())
        .collect();
    f.nodes = cfg
        .nodes
        .iter()
        .map(|n| NodeEntry {
            name: n.name.clone(),
            ips: std::iter::once(IpAddr::V4(n.ip))
                .chain(n.ip6.map(IpAddr::V6))
                .collect(),
            agent: Some(AgentEntry {
                flows: format!("http://{AGENT_FLOWS}/flows"),
                netns: Some(lab.ns(&n.name)),
                token_file: Some(lab.flows_token_path().display().to_string()),
            }),
        })
        .collect();
    f.namespaces = cfg
        .namespaces
        .iter()
        .map(|n| NamespaceEntry {
            name: n.name.clone(),
            labels: n.labels.clone(),
        })
        .collect();
    f.pods = cfg
        .pods
        .iter()
        .map(|p| PodEntry {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            node: p.node.clone(),
            ips: std::iter::once(IpAddr::V4(p.ip))
                .chain(p.ip6.map(IpAddr::V6))
                .collect(),
            labels: p.labels.clone(),
        })
        .collect();
    f.services = cfg
        .services
        .iter()
        .map(|s| ServiceEntry {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            cluster_ips: vec![s.cluster_ip],
            ports: s
                .ports
                .iter()
                .map(|p| ServicePortEntry {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: Some(p.target_port),
                    protocol: match p.protocol {
                        Protocol::Tcp => "TCP",
                        Protocol::Udp => "UDP",
                    }
                    .to_owned(),
                })
                .collect(),
        })
        .collect();
    f
}

pub fn yaml(cfg: &LabConfig, lab: &Lab) -> String {
    let body = serde_norway::to_string(&from_config(cfg, lab)).expect("names serialise");
    format!(
        "# Written by `observer-lab`; read by `observer agent --names|--lab` and `observer explain|observe --names|--lab`.\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_story_names_every_pod_and_service_port_and_reads_back() {
        let cfg = LabConfig::story();
        let text = yaml(&cfg, &Lab::new("t").unwrap());
        let back: NamesFile = serde_norway::from_str(&text).expect("reads back");
        back.check().expect("valid");
        assert_eq!(back.pods.len(), cfg.pods.len());
        let ports: usize = cfg.services.iter().map(|s| s.ports.len()).sum();
        assert_eq!(
            back.services.iter().map(|s| s.ports.len()).sum::<usize>(),
            ports
        );
        let a = back.pods.iter().find(|p| p.name == "pod-a").expect("pod-a");
        assert!(a.ips.contains(&"10.244.1.10".parse().unwrap()), "{a:?}");
        assert_eq!(back.pod_cidrs[0], cfg.cluster_cidr.to_string());
        assert_eq!(back.nodes[0].ips[0].to_string(), "10.200.0.1");
        let agent = back.nodes[0]
            .agent
            .as_ref()
            .expect("where node-a's agent is");
        assert_eq!(agent.netns.as_deref(), Some("t-node-a"));
        assert_eq!(agent.flows, "http://127.0.0.1:9465/flows");
    }
}
