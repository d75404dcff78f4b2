//! The VPC between the nodes: a router namespace with an nftables firewall that behaves like a
//! cloud VPC firewall (GCP): stateful, ingress rules by source range, protocol and port, and an
//! implied deny for what no rule allows. Default: GKE's `gke-<cluster>-all` rule, pod range to
//! everything.

use std::fmt::Write as _;

use serde::Deserialize;

use crate::{
    config::LabConfig,
    model::{Cidr, Metadata},
};

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Firewall {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub rules: Vec<FirewallRule>,
}

/// One ingress rule, in `gcloud compute firewall-rules` terms.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirewallRule {
    pub name: String,
    pub source_ranges: Vec<Cidr>,
    /// `allow` or `deny`.
    #[serde(default = "allow")]
    pub action: String,
    /// `tcp:8443`, `udp:53`, `tcp:8000-9000`, `tcp`, `all`.
    pub rules: Vec<String>,
}

fn allow() -> String {
    "allow".into()
}

pub const API_VERSION: &str = "lab.observer/v1";

impl Firewall {
    /// GKE's default: the pod ranges may reach anything.
    pub fn gke_default(cfg: &LabConfig) -> Firewall {
        Firewall {
            api_version: API_VERSION.into(),
            kind: "Firewall".into(),
            metadata: Metadata::named("vpc"),
            rules: vec![FirewallRule {
                name: "gke-lab-all".into(),
                source_ranges: std::iter::once(cfg.cluster_cidr)
                    .chain(cfg.cluster_cidr6)
                    .collect(),
                action: "allow".into(),
                rules: vec!["all".into()],
            }],
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.api_version != API_VERSION || self.kind != "Firewall" {
            return Err(format!("expected apiVersion {API_VERSION}, kind Firewall"));
        }
        for r in &self.rules {
            if r.action != "allow" && r.action != "deny" {
                return Err(format!(
                    "rule {}: action {:?} (allow or deny)",
                    r.name, r.action
                ));
            }
            for spec in &r.rules {
                parse_spec(spec).map_err(|e| format!("rule {}: {e}", r.name))?;
            }
        }
        Ok(())
    }
}

/// `tcp:8443` -> ("tcp", Some("8443")); `all` -> ("all", None).
fn parse_spec(spec: &str) -> Result<(&str, Option<&str>), String> {
    let (proto, ports) = match spec.split_once(':') {
        Some((p, ports)) => (p, Some(ports)),
        None => (spec, None),
    };
    if !["tcp", "udp", "icmp", "all"].contains(&proto) {
        return Err(format!(
            "protocol {proto:?} in {spec:?} (tcp, udp, icmp, all)"
        ));
    }
    if let Some(ports) = ports {
        let ok =
            ports.split('-').all(|p| p.parse::<u16>().is_ok()) && ports.split('-').count() <= 2;
        if !ok || proto == "all" || proto == "icmp" {
            return Err(format!("ports in {spec:?}"));
        }
    }
    Ok((proto, ports))
}

/// The nftables ruleset of the VPC router (`nft -f` input); replaces the previous one.
pub fn nft_ruleset(fw: &Firewall) -> String {
    let mut s = String::from("table inet vpc\ndelete table inet vpc\ntable inet vpc {\n");
    s.push_str("  chain forward {\n    type filter hook forward priority 0; policy accept;\n");
    s.push_str("    ct state established,related accept comment \"stateful: replies of allowed connections\"\n");
    let _ = writeln!(
        s,
        "    oifname \"{}\" accept comment \"implied allow egress: out of the VPC\"",
        crate::outside::VPC_PORT
    );
    for r in &fw.rules {
        let verdict = if r.action == "allow" {
            "accept"
        } else {
            "drop"
        };
        for src in &r.source_ranges {
            let fam = if src.addr.is_ipv4() { "ip" } else { "ip6" };
            for spec in &r.rules {
                let (proto, ports) = parse_spec(spec).expect("checked");
                let l4 = match (proto, ports) {
                    ("all", _) => String::new(),
                    ("icmp", _) => " meta l4proto { icmp, ipv6-icmp }".to_owned(),
                    (p, None) => format!(" meta l4proto {p}"),
                    (p, Some(ports)) => format!(" {p} dport {ports}"),
                };
                let _ = writeln!(
                    s,
                    "    {fam} saddr {src}{l4} {verdict} comment \"{}\"",
                    r.name
                );
            }
        }
    }
    s.push_str("    meta nfproto { ipv4, ipv6 } drop comment \"implied deny ingress\"\n  }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gke_default_allows_the_pod_ranges_and_denies_the_rest() {
        let cfg = LabConfig::story();
        let fw = Firewall::gke_default(&cfg);
        fw.check().unwrap();
        let nft = nft_ruleset(&fw);
        assert!(
            nft.contains("ip saddr 10.244.0.0/16 accept comment \"gke-lab-all\""),
            "{nft}"
        );
        assert!(nft.contains("ip6 saddr fd00:10:244::/48 accept"));
        assert!(nft.contains("ct state established,related accept"));
        assert!(nft.trim_end().ends_with("}\n}"));
    }

    #[test]
    fn port_rules_and_bad_specs() {
        let mut fw = Firewall::gke_default(&LabConfig::story());
        fw.rules[0].rules = vec!["tcp:443".into(), "udp:5353".into(), "tcp:8000-9000".into()];
        let nft = nft_ruleset(&fw);
        assert!(nft.contains("ip saddr 10.244.0.0/16 tcp dport 443 accept"));
        assert!(nft.contains("tcp dport 8000-9000 accept"));
        fw.rules[0].rules = vec!["sctp:1".into()];
        assert!(fw.check().unwrap_err().contains("sctp"));
        fw.rules[0].rules = vec!["tcp:http".into()];
        assert!(fw.check().is_err());
    }
}
