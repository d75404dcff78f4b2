//! Enrichment: who an address is. Pods and Services by address, from a static names file
//! (`--names`, format in `observer_common::names`) or from the Kubernetes API (`names/kube.rs`),
//! behind one interface. Used by the agent to name both ends of a record, and by `explain` to
//! write fixes in Kubernetes terms.

pub mod kube;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use std::path::{Path, PathBuf};

use observer_common::names::{NamesFile, parse_cidr};

use crate::record::{FlowRecord, PodRef, ServiceRef};

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error("names file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("names file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    #[error("names file {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

#[derive(Clone, Debug)]
pub struct PodName {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub node: String,
}

/// One Service port on one cluster IP.
#[derive(Clone, Debug)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    /// The spec's numeric targetPort, when it is a number.
    pub target_port: Option<u16>,
}

/// A label set as stored: sorted pairs of shared strings (keys repeat across the cluster).
type Labels = Arc<[(Arc<str>, Arc<str>)]>;

/// A pod as stored. What many pods share (namespace, node, a ReplicaSet's label set, label
/// keys) is kept once, so a cluster's worth of pods costs little more than their names
/// (measured: `cargo xtask bench --only kube`).
#[derive(Clone, Debug)]
struct PodEntry {
    name: Box<str>,
    namespace: Arc<str>,
    labels: Labels,
    node: Arc<str>,
}

impl PodEntry {
    fn to_name(&self) -> PodName {
        PodName {
            name: self.name.to_string(),
            namespace: self.namespace.to_string(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node: self.node.to_string(),
        }
    }
}

#[derive(Default, Clone, Debug)]
struct Interner {
    strs: HashSet<Arc<str>>,
    labels: HashSet<Labels>,
}

impl Interner {
    fn str(&mut self, s: String) -> Arc<str> {
        if let Some(a) = self.strs.get(s.as_str()) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.strs.insert(a.clone());
        a
    }

    fn labels(&mut self, l: BTreeMap<String, String>) -> Labels {
        let pairs: Vec<(Arc<str>, Arc<str>)> = l
            .into_iter()
            .map(|(k, v)| (self.str(k), self.str(v)))
            .collect();
        if let Some(a) = self.labels.get(pairs.as_slice()) {
            return a.clone();
        }
        let a: Labels = pairs.into();
        self.labels.insert(a.clone());
        a
    }

    /// Forget what no pod refers to any more: label sets first, then the strings only they held.
    fn sweep(&mut self) {
        self.labels.retain(|a| Arc::strong_count(a) > 1);
        self.strs.retain(|a| Arc::strong_count(a) > 1);
    }
}

#[derive(Default, Clone, Debug)]
pub struct Names {
    pods: HashMap<IpAddr, PodEntry>,
    interned: Interner,
    /// Pod removals since the interner was last swept.
    removed: usize,
    /// (cluster IP, port, protocol) -> Service port.
    pub services: HashMap<(IpAddr, u16, String), ServicePortName>,
    /// Pod ranges (`ADDR/LEN`), for firewall fixes.
    pub pod_ranges: Vec<String>,
    /// Namespace -> its labels.
    pub namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Node address -> node name.
    pub nodes: BTreeMap<IpAddr, String>,
}

/// A names file, read and checked.
pub fn read_file(path: &Path) -> Result<NamesFile, NamesError> {
    let text = std::fs::read_to_string(path).map_err(|source| NamesError::Io {
        path: path.to_owned(),
        source,
    })?;
    let file: NamesFile = serde_norway::from_str(&text).map_err(|source| NamesError::Parse {
        path: path.to_owned(),
        source,
    })?;
    file.check().map_err(|what| NamesError::Invalid {
        path: path.to_owned(),
        what,
    })?;
    Ok(file)
}

impl Names {
    /// Names from a static names file (YAML or JSON).
    pub fn from_file(path: &Path) -> Result<Names, NamesError> {
        Ok(Names::from_names_file(read_file(path)?))
    }

    pub fn from_names_file(f: NamesFile) -> Names {
        let mut n = Names {
            pod_ranges: f.pod_cidrs,
            ..Default::default()
        };
        for p in f.pods {
            let name = PodName {
                name: p.name,
                namespace: p.namespace,
                labels: p.labels,
                node: p.node,
            };
            for ip in p.ips {
                n.insert_pod(ip, name.clone());
            }
        }
        for ns in f.namespaces {
            n.namespaces.insert(ns.name, ns.labels);
        }
        for node in f.nodes {
            for ip in node.ips {
                n.nodes.insert(ip, node.name.clone());
            }
        }
        for s in f.services {
            for ip in &s.cluster_ips {
                for p in &s.ports {
                    n.services.insert(
                        (*ip, p.port, p.protocol.clone()),
                        ServicePortName {
                            namespace: s.namespace.clone(),
                            name: s.name.clone(),
                            port_name: p.name.clone(),
                            target_port: p.target_port,
                        },
                    );
                }
            }
        }
        n
    }

    /// The names agents already wrote into records (`src_pod`, `dst_pod`), for reading logs of
    /// a cluster without access to its API.
    pub fn from_records(records: &[FlowRecord]) -> Names {
        let mut n = Names::default();
        for r in records {
            let client = r.client_tuple().map(|t| &t.src);
            let server = r.backend_tuple().map(|t| &t.dst);
            for (ip, pod) in [(client, &r.src_pod), (server, &r.dst_pod)] {
                if let (Some(ip), Some(p)) = (ip.and_then(|i| i.parse().ok()), pod) {
                    n.insert_pod(
                        ip,
                        PodName {
                            name: p.name.clone(),
                            namespace: p.namespace.clone(),
                            labels: p.labels.clone(),
                            node: p.node.clone(),
                        },
                    );
                }
            }
        }
        n
    }

    pub fn insert_pod(&mut self, ip: IpAddr, p: PodName) {
        let entry = PodEntry {
            name: p.name.into_boxed_str(),
            namespace: self.interned.str(p.namespace),
            labels: self.interned.labels(p.labels),
            node: self.interned.str(p.node),
        };
        self.pods.insert(ip, entry);
    }

    /// Forget `ip` if it still belongs to that pod (a new pod may have taken the address).
    pub fn remove_pod(&mut self, ip: IpAddr, namespace: &str, name: &str) {
        if self
            .pods
            .get(&ip)
            .is_some_and(|e| &*e.namespace == namespace && &*e.name == name)
        {
            self.pods.remove(&ip);
            self.removed += 1;
            if self.removed >= 10_000 {
                self.sweep();
            }
        }
    }

    /// Keep only the pods `keep` says are still there (after a relist).
    pub fn retain_pods(&mut self, keep: impl Fn(&IpAddr) -> bool) {
        self.pods.retain(|ip, _| keep(ip));
        self.sweep();
    }

    fn sweep(&mut self) {
        self.interned.sweep();
        self.removed = 0;
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Addresses of the pod called `name`.
    pub fn ips_of(&self, name: &str) -> Vec<String> {
        let mut ips: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| &*p.name == name)
            .map(|(ip, _)| ip.to_string())
            .collect();
        ips.sort();
        ips
    }

    pub fn pod(&self, ip: &str) -> Option<PodName> {
        self.pods.get(&ip.parse().ok()?).map(PodEntry::to_name)
    }

    /// The pod range a firewall rule should admit: the cluster CIDR, or the client alone.
    pub fn pod_range(&self, client_ip: &str) -> String {
        let v6 = client_ip.contains(':');
        self.pod_ranges
            .iter()
            .find(|c| parse_cidr(c).is_some_and(|(a, _)| a.is_ipv6() == v6))
            .cloned()
            .unwrap_or_else(|| format!("{client_ip}/{}", if v6 { 128 } else { 32 }))
    }

    pub fn label(&self, ip: &str) -> String {
        match (self.pod(ip), self.node(ip)) {
            (Some(p), _) => format!("{}/{} ({ip})", p.namespace, p.name),
            (None, Some(n)) => format!("node {n}'s IP ({ip})"),
            (None, None) => ip.to_owned(),
        }
    }

    /// The node whose own address `ip` is.
    pub fn node(&self, ip: &str) -> Option<&str> {
        self.nodes.get(&ip.parse().ok()?).map(String::as_str)
    }

    /// The nodes' addresses of `ip`'s family as `/32` or `/128` ranges: the source a firewall
    /// rule must admit for masqueraded traffic.
    pub fn node_ranges(&self, v6: bool) -> Vec<String> {
        self.nodes
            .keys()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| format!("{a}/{}", if v6 { 128 } else { 32 }))
            .collect()
    }

    /// The Service port behind `ip:port`; `reached` is the port DNAT sent it to, if known.
    pub fn service(
        &self,
        ip: &str,
        port: u16,
        proto: &str,
        reached: Option<u16>,
    ) -> Option<ServiceRef> {
        let s = self
            .services
            .get(&(ip.parse().ok()?, port, proto.to_owned()))?;
        Some(ServiceRef {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            port_name: s.port_name.clone(),
            port,
            // A named targetPort resolves per endpoint: what DNAT chose is the truth.
            target_port: reached.or(s.target_port).unwrap_or(0),
        })
    }

    /// Name both ends of a record, and the Service the client asked for.
    pub fn enrich(&self, r: &mut FlowRecord) {
        if self.pods.is_empty() && self.services.is_empty() {
            return;
        }
        let pod = |ip: &str| {
            self.pod(ip).map(|p| PodRef {
                namespace_labels: self
                    .namespaces
                    .get(&p.namespace)
                    .cloned()
                    .unwrap_or_default(),
                namespace: p.namespace,
                name: p.name,
                labels: p.labels,
                node: p.node,
            })
        };
        // The client as it sent, the server as it was reached or aimed at after DNAT.
        let client = r.client_tuple().map(|t| t.src.clone());
        let server = r.backend_tuple().map(|t| (t.dst.clone(), t.dport));
        r.src_pod = client.as_deref().and_then(pod);
        r.dst_pod = server.as_ref().and_then(|(ip, _)| pod(ip));
        r.service = r.pre_dnat.as_ref().and_then(|t| {
            self.service(&t.dst, t.dport, &r.proto, server.as_ref().map(|(_, p)| *p))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> PodName {
        PodName {
            name: name.into(),
            namespace: "shop".into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            node: "node-a".into(),
        }
    }

    #[test]
    fn replicas_share_their_label_set_and_names_go_with_the_last_pod() {
        let mut n = Names::default();
        let ip = |i: u8| IpAddr::from([10, 244, 1, i]);
        n.insert_pod(ip(1), pod("web-1", "web"));
        n.insert_pod(ip(2), pod("web-2", "web"));
        n.insert_pod(ip(3), pod("db-1", "db"));
        assert_eq!(n.interned.labels.len(), 2, "one set per distinct label map");
        assert_eq!(
            n.interned.strs.len(),
            5,
            "namespace, node, the key app and its values web and db, once each"
        );
        // The address went to another pod since: a late delete of the old one leaves it.
        n.insert_pod(ip(1), pod("web-9", "web"));
        n.remove_pod(ip(1), "shop", "web-1");
        assert_eq!(n.pod("10.244.1.1").unwrap().name, "web-9");
        n.retain_pods(|i| *i == ip(1));
        assert_eq!(n.pod_count(), 1);
        assert_eq!(n.interned.labels.len(), 1, "db's label set is forgotten");
        assert_eq!(n.interned.strs.len(), 4, "and the string db with it");
        assert_eq!(n.pod("10.244.1.1").unwrap().labels["app"], "web");
    }

    #[test]
    fn a_names_file_names_pods_services_and_ranges() {
        let dir = std::env::temp_dir().join(format!("observer-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("names.yaml");
        std::fs::write(
            &path,
            "apiVersion: observer/v1\nkind: Names\npodCIDRs: [10.244.0.0/16, fd00:10:244::/48]\n\
             namespaces: [{name: shop, labels: {team: a}}]\n\
             pods: [{name: web-1, namespace: shop, node: n1, ips: [10.244.1.5, 'fd00:10:244::5'], labels: {app: web}}]\n\
             services: [{name: web, namespace: shop, clusterIPs: [100.64.0.10], ports: [{port: 443, targetPort: 8443}]}]\n",
        )
        .unwrap();
        let n = Names::from_file(&path).expect("valid file");
        assert_eq!(n.pod("fd00:10:244::5").unwrap().name, "web-1");
        assert_eq!(n.pod_range("10.244.9.9"), "10.244.0.0/16");
        assert_eq!(n.pod_range("fd00::1"), "fd00:10:244::/48");
        let s = n.service("100.64.0.10", 443, "TCP", None).expect("service");
        assert_eq!((s.name.as_str(), s.target_port), ("web", 8443));
        assert_eq!(n.namespaces["shop"]["team"], "a");

        std::fs::write(&path, "apiVersion: observer/v2\nkind: Names\n").unwrap();
        let e = Names::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("expected apiVersion observer/v1"), "{e}");
        std::fs::write(
            &path,
            "apiVersion: observer/v1\nkind: Names\npodCIDRs: [banana]\n",
        )
        .unwrap();
        let e = Names::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("\"banana\" is not ADDR/LEN"), "{e}");
        std::fs::write(
            &path,
            "apiVersion: observer/v1\nkind: Names\npods: [{name: x}]\n",
        )
        .unwrap();
        let e = Names::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("missing field `ips`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever a names file holds: names or a one-line error naming the file, never a panic.
        #[test]
        fn any_names_file_is_read_or_refused_in_one_line(
            text in prop_oneof![
                "\\PC{0,200}",
                "apiVersion: observer/v1\nkind: Names\n(pods|services|namespaces|podCIDRs): \\PC{0,80}",
            ]
        ) {
            let dir = std::env::temp_dir().join(format!("observer-names-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("names.yaml");
            std::fs::write(&path, &text).unwrap();
            if let Err(e) = Names::from_file(&path) {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("names file "), "{msg}");
            }
        }
    }
}
