//! The interface follower: when rtnetlink announces a link change (and every second), attach to
//! pod veths that appeared and forget the ones that went away, and tell correlation each interface's name and which IPs are this node's pods.
//! It owns the [`Hooks`]; when it stops (or its task is dropped, on any exit path), the hooks go
//! with it and detach.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use log::{info, warn};
use tokio::{
    sync::watch,
    time::{MissedTickBehavior, interval},
};

use super::{
    Hooks, Role,
    ifaces::{self, glob_match},
    netlink::{self, Link},
};
use crate::export::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(1);

/// What correlation needs to know of the node's interfaces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interfaces {
    pub names: HashMap<u32, String>,
    /// IPs routed to this node's pod veths.
    pub local_pods: HashSet<IpAddr>,
}

/// What one scan decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pod interfaces to attach to (attaching twice is a no-op).
    pub attach: Vec<String>,
    /// Attached interfaces that no longer exist under that name and index.
    pub gone: Vec<String>,
}

/// Which interfaces are pods' (`--pod-iface`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodIfaces {
    /// A veth (or netkit device) whose peer is in another network namespace: how every CNI
    /// that gives pods their own namespace connects them (Calico `cali*`, Cilium `lxc*`, GKE
    /// `gke*`, AWS VPC CNI `eni*`, bridge CNIs' `veth*`).
    Auto,
    Glob(String),
}

impl PodIfaces {
    pub fn parse(s: &str) -> PodIfaces {
        if s == "auto" {
            PodIfaces::Auto
        } else {
            PodIfaces::Glob(s.to_owned())
        }
    }

    fn admits(&self, l: &Link) -> bool {
        match self {
            PodIfaces::Auto => {
                l.peer_elsewhere && matches!(l.kind.as_deref(), Some("veth" | "netkit"))
            }
            PodIfaces::Glob(g) => glob_match(g, &l.name),
        }
    }
}

impl std::fmt::Display for PodIfaces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodIfaces::Auto => write!(f, "veths whose peer is in another network namespace"),
            PodIfaces::Glob(g) => write!(f, "matching {g:?}"),
        }
    }
}

/// Decide from the interfaces `present` now and those `attached` (name -> index).
pub fn plan(
    present: &[Link],
    attached: &BTreeMap<String, u32>,
    uplinks: &[String],
    pods: &PodIfaces,
) -> Plan {
    Plan {
        attach: present
            .iter()
            .filter(|l| !uplinks.contains(&l.name) && pods.admits(l))
            .map(|l| l.name.clone())
            .collect(),
        gone: attached
            .iter()
            .filter(|(name, idx)| !present.iter().any(|l| &l.name == *name && l.index == **idx))
            .map(|(name, _)| name.clone())
            .collect(),
    }
}

/// The namespace's interfaces; without rtnetlink (never seen), names only, so only globs match.
fn present() -> Vec<Link> {
    netlink::links().unwrap_or_else(|e| {
        warn!("listing interfaces over rtnetlink: {e}; pod interfaces are then found by --pod-iface globs only");
        ifaces::list()
            .into_iter()
            .map(|(index, name)| Link {
                index,
                name,
                kind: None,
                peer_elsewhere: false,
            })
            .collect()
    })
}

pub struct Follower {
    pub hooks: Hooks,
    pub uplinks: Vec<String>,
    pub pods: PodIfaces,
    pub metrics: Arc<Metrics>,
}

impl Follower {
    /// One scan: attach, forget, and say what the node's interfaces are now.
    pub fn sync(&mut self) -> Interfaces {
        let present = present();
        let attached: BTreeMap<String, u32> = self
            .hooks
            .attached()
            .iter()
            .map(|(n, a)| (n.clone(), a.ifindex))
            .collect();
        let plan = plan(&present, &attached, &self.uplinks, &self.pods);
        // Forget first: an interface deleted and created again under its name (a restarted pod)
        // is then attached again in this same scan, not one scan later.
        for name in &plan.gone {
            info!("{name} went away; forgetting it");
            self.hooks.detach_iface(name, true);
        }
        for name in &plan.attach {
            if let Err(e) = self.hooks.attach_iface(name, Role::Pod) {
                // It may have vanished since the listing; retried on the next scan otherwise.
                warn!("{e}");
            }
        }
        let local_pods = ifaces::pod_routes(&self.hooks.pod_ifaces())
            .into_iter()
            .map(|(ip, _)| ip)
            .collect();
        for role in [Role::Pod, Role::Uplink] {
            let n = self
                .hooks
                .attached()
                .values()
                .filter(|a| a.role == role)
                .count();
            self.metrics
                .interfaces_attached
                .with_label_values(&[role.as_str()])
                .set(n as i64);
        }
        Interfaces {
            names: present.into_iter().map(|l| (l.index, l.name)).collect(),
            local_pods,
        }
    }

    /// Scan when rtnetlink announces a link change, and every second in any case, until told to
    /// stop; hand the hooks back for an orderly detach.
    pub async fn run(
        mut self,
        tx: watch::Sender<Interfaces>,
        mut stop: watch::Receiver<bool>,
    ) -> Hooks {
        let mut tick = interval(EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut events = netlink::LinkEvents::subscribe()
            .inspect_err(|e| {
                warn!("no link notifications ({e}): pod interfaces are looked for each second only")
            })
            .ok();
        loop {
            let announced = async {
                match &events {
                    Some(ev) => ev.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                r = announced => {
                    if let Err(e) = r {
                        warn!("link notifications failed ({e}): pod interfaces are looked for each second only");
                        events = None;
                    }
                }
                _ = stop.changed() => return self.hooks,
            }
            let now = self.sync();
            tx.send_if_modified(|old| {
                let changed = *old != now;
                *old = now;
                changed
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>, peer_elsewhere: bool) -> Link {
        Link {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            peer_elsewhere,
        }
    }

    #[test]
    fn pods_are_veths_with_their_peer_elsewhere_whatever_the_cni_names_them() {
        let present = vec![
            link(1, "lo", None, false),
            link(2, "eth0", None, false),
            link(3, "cali0a1b2c3d4e5", Some("veth"), true),
            link(4, "lxc12ab", Some("veth"), true),
            link(5, "gke9f8e7d", Some("veth"), true),
            link(6, "eni1a2b3c", Some("veth"), true),
            link(7, "veth1234", Some("veth"), true),
            // Both ends on the node (e.g. a node-local pair), a bridge, a tunnel: no pod.
            link(8, "vethlocal", Some("veth"), false),
            link(9, "cni0", Some("bridge"), false),
            link(10, "vxlan.calico", Some("vxlan"), false),
            link(11, "lxc_health", Some("veth"), true),
        ];
        let p = plan(&present, &BTreeMap::new(), &[], &PodIfaces::Auto);
        assert_eq!(
            p.attach,
            [
                "cali0a1b2c3d4e5",
                "lxc12ab",
                "gke9f8e7d",
                "eni1a2b3c",
                "veth1234",
                "lxc_health"
            ]
        );
        let glob = plan(&present, &BTreeMap::new(), &[], &PodIfaces::parse("cali*"));
        assert_eq!(glob.attach, ["cali0a1b2c3d4e5"], "a glob overrides");
    }

    #[test]
    fn pods_are_attached_by_glob_and_a_recreated_interface_counts_as_gone() {
        let present = vec![
            link(1, "lo", None, false),
            link(2, "eth0", None, false),
            link(7, "veth0a", Some("veth"), true),
            link(9, "veth0b", Some("veth"), true),
            link(11, "vethup", Some("veth"), true),
        ];
        let attached: BTreeMap<String, u32> = [
            ("eth0".to_owned(), 2),
            ("veth0a".to_owned(), 7),
            // Deleted and created again under the same name: a new index, new links needed.
            ("veth0b".to_owned(), 8),
            ("vethgone".to_owned(), 5),
        ]
        .into();
        let p = plan(
            &present,
            &attached,
            &["eth0".into(), "vethup".into()],
            &PodIfaces::parse("veth*"),
        );
        assert_eq!(p.attach, ["veth0a", "veth0b"], "uplinks are never pods");
        assert_eq!(p.gone, ["veth0b", "vethgone"]);
    }
}
