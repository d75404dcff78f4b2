//! The interface follower: every second, attach to pod veths that appeared and forget the ones
//! that went away, and tell correlation each interface's name and which IPs are this node's pods.
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

/// Decide from the interfaces `present` now (index, name) and those `attached` (name -> index).
pub fn plan(
    present: &[(u32, String)],
    attached: &BTreeMap<String, u32>,
    uplinks: &[String],
    pod_glob: &str,
) -> Plan {
    Plan {
        attach: present
            .iter()
            .filter(|(_, n)| !uplinks.contains(n) && glob_match(pod_glob, n))
            .map(|(_, n)| n.clone())
            .collect(),
        gone: attached
            .iter()
            .filter(|(name, idx)| !present.iter().any(|(i, n)| n == *name && i == *idx))
            .map(|(name, _)| name.clone())
            .collect(),
    }
}

pub struct Follower {
    pub hooks: Hooks,
    pub uplinks: Vec<String>,
    pub pod_glob: String,
    pub metrics: Arc<Metrics>,
}

impl Follower {
    /// One scan: attach, forget, and say what the node's interfaces are now.
    pub fn sync(&mut self) -> Interfaces {
        let present = ifaces::list();
        let attached: BTreeMap<String, u32> = self
            .hooks
            .attached()
            .iter()
            .map(|(n, a)| (n.clone(), a.ifindex))
            .collect();
        let plan = plan(&present, &attached, &self.uplinks, &self.pod_glob);
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
        let pod_ifaces: Vec<&str> = self
            .hooks
            .attached()
            .iter()
            .filter(|(_, a)| a.role == Role::Pod)
            .map(|(n, _)| n.as_str())
            .collect();
        let local_pods = ifaces::pod_routes(&pod_ifaces)
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
            names: present.into_iter().collect(),
            local_pods,
        }
    }

    /// Scan every second until told to stop; hand the hooks back for an orderly detach.
    pub async fn run(
        mut self,
        tx: watch::Sender<Interfaces>,
        mut stop: watch::Receiver<bool>,
    ) -> Hooks {
        let mut tick = interval(EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = self.sync();
                    tx.send_if_modified(|old| {
                        let changed = *old != now;
                        *old = now;
                        changed
                    });
                }
                _ = stop.changed() => return self.hooks,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_attached_by_glob_and_a_recreated_interface_counts_as_gone() {
        let present = vec![
            (1, "lo".to_owned()),
            (2, "eth0".to_owned()),
            (7, "veth0a".to_owned()),
            (9, "veth0b".to_owned()),
            (11, "vethup".to_owned()),
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
            "veth*",
        );
        assert_eq!(p.attach, ["veth0a", "veth0b"], "uplinks are never pods");
        assert_eq!(p.gone, ["veth0b", "vethgone"]);
    }
}
