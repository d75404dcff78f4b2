//! A host outside the cluster, beyond the VPC (the Internet side of a cloud network), and the
//! nodes' masquerade towards it.
//!
//! It shows the two corners where the node's own address is on the wire: a NodePort reached from
//! outside (kube-proxy DNATs to a pod and, with `externalTrafficPolicy: Cluster`, masquerades to
//! the node's IP), and a pod leaving the cluster, masqueraded by ip-masq-agent's rules
//! (<https://github.com/kubernetes-sigs/ip-masq-agent>: every destination outside the
//! non-masquerade ranges leaves with the node's address). The VPC routes it and the firewall
//! lets traffic out to it (a cloud VPC's implied egress allow); what it may send in is the
//! firewall's rules' business.

use std::{fmt::Write as _, net::Ipv4Addr};

use crate::{
    Lab, LabError,
    config::{LabConfig, Outside},
    model::{OUTSIDE, VPC, net24},
    netns::{self, ip},
};

/// The VPC's port towards the outside host.
pub const VPC_PORT: &str = "ext";

/// The VPC's address on the outside host's /24 (`.1`, or `.254` if the host took `.1`).
fn gateway(o: &Outside) -> Ipv4Addr {
    let net = u32::from(net24(o.ip));
    let gw = Ipv4Addr::from(net | 1);
    if gw == o.ip {
        Ipv4Addr::from(net | 254)
    } else {
        gw
    }
}

fn subnet(o: &Outside) -> String {
    format!("{}/24", net24(o.ip))
}

impl Lab {
    /// The outside host's namespace, cabled to the VPC; each node routes its /24 to the VPC
    /// (on-link: the VPC answers ARP for it, as it does for the other node).
    pub(crate) fn add_outside(&self, cfg: &LabConfig, o: &Outside) -> Result<(), LabError> {
        let ns = self.new_ns(OUTSIDE)?;
        let vpc = self.ns(VPC);
        ip(
            &vpc,
            &[
                "link", "add", VPC_PORT, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        let gw = gateway(o);
        ip(&vpc, &["addr", "add", &format!("{gw}/24"), "dev", VPC_PORT])?;
        ip(&vpc, &["link", "set", VPC_PORT, "up"])?;
        ip(
            &ns,
            &["addr", "add", &format!("{}/24", o.ip), "dev", "eth0"],
        )?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        ip(&ns, &["route", "add", "default", "via", &gw.to_string()])?;
        for n in &cfg.nodes {
            ip(
                &self.ns(&n.name),
                &["route", "add", &subnet(o), "dev", "eth0"],
            )?;
        }
        Ok(())
    }
}

/// ip-masq-agent's nat rules for one node (`iptables-restore --noflush` input): the cluster's
/// pod range, the Service range and the node network are not masqueraded, the rest is.
pub fn ip_masq_rules(cfg: &LabConfig) -> String {
    let mut out = String::from("*nat\n:IP-MASQ - [0:0]\n");
    out.push_str("-A POSTROUTING -m comment --comment \"ip-masq-agent: ensure nat POSTROUTING directs all non-LOCAL destination traffic to our custom IP-MASQ chain\" -m addrtype ! --dst-type LOCAL -j IP-MASQ\n");
    let node_net = format!("{}/24", net24(cfg.nodes[0].ip));
    for range in [
        cfg.cluster_cidr.to_string(),
        cfg.service_cidr.to_string(),
        node_net,
    ] {
        let _ = writeln!(
            out,
            "-A IP-MASQ -d {range} -m comment --comment \"ip-masq-agent: local traffic is not subject to MASQUERADE\" -j RETURN"
        );
    }
    out.push_str("-A IP-MASQ -m comment --comment \"ip-masq-agent: outbound traffic is subject to MASQUERADE (must be last in chain)\" -j MASQUERADE\n");
    out.push_str("COMMIT\n");
    out
}

/// Program ip-masq-agent's rules in node namespace `ns`.
pub fn program_ip_masq(cfg: &LabConfig, ns: &str) -> Result<(), LabError> {
    netns::run_with_input(
        &["ip", "netns", "exec", ns, "iptables-restore", "--noflush"],
        Some(&ip_masq_rules(cfg)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_story_masquerades_only_what_leaves_the_cluster() {
        let cfg = LabConfig::story();
        let r = ip_masq_rules(&cfg);
        for range in ["10.244.0.0/16", "100.64.0.0/16", "10.200.0.0/24"] {
            assert!(r.contains(&format!("-A IP-MASQ -d {range} ")), "{r}");
        }
        assert!(
            r.ends_with("-j MASQUERADE\nCOMMIT\n"),
            "the catch-all is last: {r}"
        );
        let o = cfg.outside.as_ref().expect("the story has an outside host");
        assert_eq!(gateway(o).to_string(), "192.0.2.1");
        assert_eq!(subnet(o), "192.0.2.0/24");
    }
}
