//! Who an address is: pods, namespaces and ranges from the lab description (Kubernetes names
//! come next, through the same interface).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Context as _;

use crate::lab::{
    Lab,
    config::{LabConfig, Pod},
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
}

impl Names {
    pub fn from_lab(name: &str) -> anyhow::Result<Names> {
        let lab = Lab::new(name)?;
        let cfg = lab
            .load_config()
            .with_context(|| format!("lab {name} is not up (its description names the pods)"))?;
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
