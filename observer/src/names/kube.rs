//! Names from the Kubernetes API: watch Pods, Services and Namespaces and keep only what a
//! record needs: pod IP -> namespace, name, labels, node; Service cluster IP and port -> names;
//! namespace -> labels.
//! Memory is a few hundred bytes per pod (labels dominate), independent of object size.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
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

/// Keep `names` in step with the cluster until the process exits; reconnects on errors.
pub async fn watch(client: Client, names: Arc<RwLock<Names>>) {
    let pods = watch_kind(
        Api::<Pod>::all(client.clone()),
        names.clone(),
        |n: &mut Names, p: &Pod, add: bool| {
            for (ip, name) in pod_entries(p) {
                if add {
                    n.pods.insert(ip, name);
                } else {
                    n.pods.remove(&ip);
                }
            }
        },
        |n: &mut Names| n.pods.clear(),
        "pods",
    );
    let namespaces = watch_kind(
        Api::<Namespace>::all(client.clone()),
        names.clone(),
        |n: &mut Names, ns: &Namespace, add: bool| {
            let name = ns.metadata.name.clone().unwrap_or_default();
            if add {
                n.namespaces
                    .insert(name, ns.metadata.labels.clone().unwrap_or_default());
            } else {
                n.namespaces.remove(&name);
            }
        },
        |n: &mut Names| n.namespaces.clear(),
        "namespaces",
    );
    let services = watch_kind(
        Api::<Service>::all(client),
        names,
        |n: &mut Names, s: &Service, add: bool| {
            for (key, name) in service_entries(s) {
                if add {
                    n.services.insert(key, name);
                } else {
                    n.services.remove(&key);
                }
            }
        },
        |n: &mut Names| n.services.clear(),
        "services",
    );
    futures_util::join!(pods, services, namespaces);
}

async fn watch_kind<K>(
    api: Api<K>,
    names: Arc<RwLock<Names>>,
    apply: impl Fn(&mut Names, &K, bool),
    clear: impl Fn(&mut Names),
    what: &str,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
    // Objects of a (re)list, applied at once when it is complete.
    let mut relist: Vec<K> = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(Event::Init)) => relist.clear(),
            Ok(Some(Event::InitApply(o))) => relist.push(o),
            Ok(Some(Event::InitDone)) => {
                let mut n = names.write().expect("not poisoned");
                clear(&mut n);
                for o in relist.drain(..) {
                    apply(&mut n, &o, true);
                }
                info!(
                    "kubernetes: {what} listed ({} pods, {} service ports known)",
                    n.pods.len(),
                    n.services.len()
                );
            }
            Ok(Some(Event::Apply(o))) => apply(&mut names.write().expect("not poisoned"), &o, true),
            Ok(Some(Event::Delete(o))) => {
                apply(&mut names.write().expect("not poisoned"), &o, false)
            }
            Ok(None) => return,
            Err(e) => {
                warn!("kubernetes: watching {what}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}
