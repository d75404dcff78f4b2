//! Names from the Kubernetes API: watch Pods, Services and Namespaces and keep only what a
//! record needs: pod IP -> namespace, name, labels, node; Service cluster IP and port -> names;
//! namespace -> labels.
//! Pods are field-selected (live ones), namespaces metadata-only; every object is reduced to
//! its entries on arrival. Measured: `cargo xtask bench --kube` (docs/benchmarks.md).

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures_util::TryStreamExt as _;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    core::PartialObjectMeta,
    runtime::watcher::{self, Event},
};
use log::{info, warn};

use super::{Names, PodName, ServicePortName};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file, or in-cluster (service account) when `path` is None.
pub async fn client(path: Option<&str>) -> Result<Client, KubeError> {
    let config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|source| KubeError::Kubeconfig {
                path: p.to_owned(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

fn pod_entries(p: &Pod) -> Vec<(IpAddr, PodName)> {
    let spec = p.spec.as_ref();
    // Host-network pods share the node's IP: not a pod identity.
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Vec::new();
    }
    let name = PodName {
        name: p.metadata.name.clone().unwrap_or_default(),
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
    };
    let status = p.status.as_ref();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|i| i.ip.clone()).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|i| vec![i]))
        .unwrap_or_default();
    ips.iter()
        .filter_map(|i| i.parse().ok())
        .map(|ip| (ip, name.clone()))
        .collect()
}

type ServiceKey = (IpAddr, u16, String);

fn service_entries(s: &Service) -> Vec<(ServiceKey, ServicePortName)> {
    let Some(spec) = &s.spec else {
        return Vec::new();
    };
    let ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|i| vec![i]))
        .unwrap_or_default();
    let mut out = Vec::new();
    for ip in ips.iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
        for p in spec.ports.iter().flatten() {
            let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let target = match &p.target_port {
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(_)) => None,
                None => u16::try_from(p.port).ok(),
            };
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            out.push((
                (ip, port, proto),
                ServicePortName {
                    namespace: s.metadata.namespace.clone().unwrap_or_default(),
                    name: s.metadata.name.clone().unwrap_or_default(),
                    port_name: p.name.clone(),
                    target_port: target,
                },
            ));
        }
    }
    out
}

/// How one kind of object lands in [`Names`].
trait Indexed: Sized {
    type Key: std::hash::Hash + Eq;
    /// Put the object's entries in; returns their keys.
    fn upsert(&self, n: &mut Names) -> Vec<Self::Key>;
    fn remove(&self, n: &mut Names);
    /// After a relist: drop the entries it did not return.
    fn retain(n: &mut Names, listed: &HashSet<Self::Key>);
}

impl Indexed for Pod {
    type Key = IpAddr;

    fn upsert(&self, n: &mut Names) -> Vec<IpAddr> {
        pod_entries(self)
            .into_iter()
            .map(|(ip, name)| {
                n.insert_pod(ip, name);
                ip
            })
            .collect()
    }

    fn remove(&self, n: &mut Names) {
        for (ip, name) in pod_entries(self) {
            n.remove_pod(ip, &name.namespace, &name.name);
        }
    }

    fn retain(n: &mut Names, listed: &HashSet<IpAddr>) {
        n.retain_pods(|ip| listed.contains(ip));
    }
}

impl Indexed for Service {
    type Key = ServiceKey;

    fn upsert(&self, n: &mut Names) -> Vec<ServiceKey> {
        service_entries(self)
            .into_iter()
            .map(|(key, name)| {
                n.services.insert(key.clone(), name);
                key
            })
            .collect()
    }

    fn remove(&self, n: &mut Names) {
        for (key, _) in service_entries(self) {
            n.services.remove(&key);
        }
    }

    fn retain(n: &mut Names, listed: &HashSet<ServiceKey>) {
        n.services.retain(|k, _| listed.contains(k));
    }
}

/// Namespaces are watched metadata-only: their labels are all a record needs.
impl Indexed for PartialObjectMeta<Namespace> {
    type Key = String;

    fn upsert(&self, n: &mut Names) -> Vec<String> {
        let name = self.metadata.name.clone().unwrap_or_default();
        n.namespaces.insert(
            name.clone(),
            self.metadata.labels.clone().unwrap_or_default(),
        );
        vec![name]
    }

    fn remove(&self, n: &mut Names) {
        n.namespaces
            .remove(self.metadata.name.as_deref().unwrap_or_default());
    }

    fn retain(n: &mut Names, listed: &HashSet<String>) {
        n.namespaces.retain(|k, _| listed.contains(k));
    }
}

/// Pods that ended gave their IP back: the API server leaves them out.
const LIVE_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Keep `names` in step with the cluster until the process exits; reconnects on errors.
///
/// Memory stays bounded: lists are paged (500 objects, kube-rs's default, read from etcd rather
/// than one unpaged answer from the watch cache) and every object is reduced to its entries as
/// it arrives, so no full object outlives its event.
pub async fn watch(client: Client, names: Arc<RwLock<Names>>) {
    let pods = watch_kind(
        watcher::watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(LIVE_PODS),
        ),
        names.clone(),
        "pods",
    );
    let namespaces = watch_kind(
        // `Api<PartialObjectMeta<_>>` makes metadata-only requests.
        watcher::watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        ),
        names.clone(),
        "namespaces",
    );
    let services = watch_kind(
        watcher::watcher(Api::<Service>::all(client), watcher::Config::default()),
        names,
        "services",
    );
    futures_util::join!(pods, services, namespaces);
}

async fn watch_kind<K: Indexed>(
    stream: impl futures_util::Stream<Item = watcher::Result<Event<K>>> + Send,
    names: Arc<RwLock<Names>>,
    what: &str,
) {
    let mut stream = std::pin::pin!(stream);
    // Keys a (re)list returned; entries are updated in place as pages arrive, so names stay
    // available during a relist, and what it did not return goes at its end.
    let mut listed: HashSet<K::Key> = HashSet::new();
    loop {
        match stream.try_next().await {
            Ok(Some(Event::Init)) => listed.clear(),
            Ok(Some(Event::InitApply(o))) => {
                listed.extend(o.upsert(&mut names.write().expect("not poisoned")));
            }
            Ok(Some(Event::InitDone)) => {
                let mut n = names.write().expect("not poisoned");
                K::retain(&mut n, &listed);
                info!(
                    "kubernetes: {what} listed ({} of them; {} pods, {} service ports known)",
                    listed.len(),
                    n.pod_count(),
                    n.services.len()
                );
                listed = HashSet::new();
                drop(n);
                // A list passes hundreds of MiB of JSON through this thread's malloc arena;
                // give the freed pages back, or they stay in the agent's RSS.
                // SAFETY: malloc_trim only releases free memory.
                unsafe { libc::malloc_trim(0) };
            }
            Ok(Some(Event::Apply(o))) => {
                o.upsert(&mut names.write().expect("not poisoned"));
            }
            Ok(Some(Event::Delete(o))) => o.remove(&mut names.write().expect("not poisoned")),
            Ok(None) => return,
            Err(e) => {
                warn!("kubernetes: watching {what}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
