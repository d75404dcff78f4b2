//! Enrichment: who an address is. Pods, Services, namespaces and ranges, today from the lab
//! description; Kubernetes names come next through the same interface. Used by the agent to name
//! both ends of a record, and by `explain` to write fixes in Kubernetes terms.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    lab::{
        Lab, LabError,
        config::{LabConfig, Pod, Protocol},
    },
    record::{FlowRecord, PodRef, ServiceRef},
};

#[derive(Default)]
pub struct Names {
    cfg: Option<LabConfig>,
}

#[derive(Clone, Debug)]
pub struct PodName {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
}

impl Names {
    /// Names from a running lab's description.
    pub fn from_lab(name: &str) -> Result<Names, LabError> {
        let cfg = Lab::new(name)?.load_config()?;
        Ok(Names { cfg: Some(cfg) })
    }

    pub fn pod(&self, ip: &str) -> Option<PodName> {
        let ip: IpAddr = ip.parse().ok()?;
        let cfg = self.cfg.as_ref()?;
        cfg.pods
            .iter()
            .find(|p| IpAddr::V4(p.ip) == ip || p.ip6.map(IpAddr::V6) == Some(ip))
            .map(|p: &Pod| PodName {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                labels: p.labels.clone(),
                node: p.node.clone(),
            })
    }

    /// Addresses of the pod called `name`.
    pub fn ips_of(&self, name: &str) -> Vec<String> {
        self.cfg
            .iter()
            .flat_map(|c| &c.pods)
            .filter(|p| p.name == name)
            .flat_map(|p| std::iter::once(p.ip.to_string()).chain(p.ip6.map(|i| i.to_string())))
            .collect()
    }

    /// The pod range a firewall rule should admit: the cluster CIDR, or the client alone.
    pub fn pod_range(&self, client_ip: &str) -> String {
        let v6 = client_ip.contains(':');
        match &self.cfg {
            Some(c) if !v6 => c.cluster_cidr.to_string(),
            Some(c) if c.cluster_cidr6.is_some() => c.cluster_cidr6.expect("checked").to_string(),
            _ => format!("{client_ip}/{}", if v6 { 128 } else { 32 }),
        }
    }

    pub fn label(&self, ip: &str) -> String {
        match self.pod(ip) {
            Some(p) => format!("{}/{} ({ip})", p.namespace, p.name),
            None => ip.to_owned(),
        }
    }
}

impl Names {
    /// The Service port behind `ip:port` (a ClusterIP and a Service port).
    pub fn service(&self, ip: &str, port: u16, proto: &str) -> Option<ServiceRef> {
        let ip: IpAddr = ip.parse().ok()?;
        let cfg = self.cfg.as_ref()?;
        cfg.services
            .iter()
            .filter(|s| s.cluster_ip == ip)
            .find_map(|s| {
                s.ports
                    .iter()
                    .find(|p| p.port == port && (p.protocol == Protocol::Tcp) == (proto == "TCP"))
                    .map(|p| ServiceRef {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                        port_name: p.name.clone(),
                        port: p.port,
                        target_port: p.target_port,
                    })
            })
    }

    /// Name both ends of a record, and the Service the client asked for.
    pub fn enrich(&self, r: &mut FlowRecord) {
        if self.cfg.is_none() {
            return;
        }
        let pod = |ip: &str| {
            self.pod(ip).map(|p| PodRef {
                namespace: p.namespace,
                name: p.name,
                labels: p.labels,
                node: p.node,
            })
        };
        // The client as it sent, the server as it was reached or aimed at after DNAT.
        let client = r
            .pre_dnat
            .as_ref()
            .or(r.post_dnat.as_ref())
            .map(|t| t.src.clone());
        let server = r
            .post_dnat
            .as_ref()
            .map(|t| t.dst.clone())
            .or_else(|| r.drop.as_ref().map(|d| d.tuple.dst.clone()))
            .or_else(|| r.policy_view.as_ref().map(|p| p.tuple.dst.clone()));
        r.src_pod = client.as_deref().and_then(pod);
        r.dst_pod = server.as_deref().and_then(pod);
        r.service = r
            .pre_dnat
            .as_ref()
            .and_then(|t| self.service(&t.dst, t.dport, &r.proto));
    }
}
