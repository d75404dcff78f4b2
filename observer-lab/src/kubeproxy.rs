//! kube-proxy iptables-mode rules, in kube-proxy's own shape: nat PREROUTING/OUTPUT ->
//! KUBE-SERVICES -> KUBE-SVC-* -> (statistic random) KUBE-SEP-* -> DNAT.
//!
//! Chain suffixes are a hash of the service port name like kube-proxy's (which uses SHA-256 +
//! base32); the digits differ, the structure does not.

use std::{fmt::Write as _, net::IpAddr};

pub use crate::model::Family;
use crate::{
    config::{LabConfig, Service, ServicePort},
    model::Protocol,
};

pub(crate) fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..2u8 {
        for b in s.bytes().chain([round]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for i in 0..8 {
            out.push(ALPHABET[((h >> (i * 5)) & 31) as usize] as char);
        }
    }
    out
}

pub(crate) fn port_name(s: &Service, p: &ServicePort) -> String {
    format!(
        "{}/{}:{}",
        s.namespace,
        s.name,
        p.name.as_deref().unwrap_or("")
    )
}

pub fn svc_chain(s: &Service, p: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&(port_name(s, p) + p.protocol.lower()))
    )
}

pub fn sep_chain(s: &Service, p: &ServicePort, ep: IpAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!(
            "{}{}{ep}:{}",
            port_name(s, p),
            p.protocol.lower(),
            p.target_port
        ))
    )
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

fn dnat_target(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}:{port}"),
        IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

/// The nat table for one address family, as `iptables-restore` / `ip6tables-restore` input.
/// kube-proxy programs every Service on every node, so this is the same on all nodes.
pub fn nat_table(cfg: &LabConfig, family: Family) -> String {
    let v6 = family == Family::V6;
    let cluster_cidr = if v6 {
        cfg.cluster_cidr6.map(|c| c.to_string())
    } else {
        Some(cfg.cluster_cidr.to_string())
    };
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
    ];
    let mut rules = String::new();
    let r = &mut rules;
    r.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    r.push_str("-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    r.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    r.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    r.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    r.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    r.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");

    for s in cfg.services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6) {
        for p in &s.ports {
            let proto = p.protocol.lower();
            let name = port_name(s, p);
            let svc = svc_chain(s, p);
            let eps = cfg.endpoint_ips(s, v6);
            if eps.is_empty() {
                // Rejected in the filter table instead (`filter_table`).
                continue;
            }
            chains.push(svc.clone());
            let _ = writeln!(
                r,
                "-A KUBE-SERVICES -d {} -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {} -j {svc}",
                host(s.cluster_ip),
                p.port
            );
            if let Some(cc) = &cluster_cidr {
                let _ = writeln!(
                    r,
                    "-A {svc} ! -s {cc} -d {} -p {proto} -m comment --comment \"{name} cluster IP\" -m {proto} --dport {} -j KUBE-MARK-MASQ",
                    host(s.cluster_ip),
                    p.port
                );
            }
            let n = eps.len();
            for (i, ep) in eps.iter().enumerate() {
                let sep = sep_chain(s, p, *ep);
                chains.push(sep.clone());
                let dest = dnat_target(*ep, p.target_port);
                if i + 1 < n {
                    let _ = writeln!(
                        r,
                        "-A {svc} -m comment --comment \"{name} -> {dest}\" -m statistic --mode random --probability {:.10} -j {sep}",
                        1.0 / (n - i) as f64
                    );
                } else {
                    let _ = writeln!(
                        r,
                        "-A {svc} -m comment --comment \"{name} -> {dest}\" -j {sep}"
                    );
                }
                let _ = writeln!(
                    r,
                    "-A {sep} -s {} -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                    host(*ep)
                );
                let _ = writeln!(
                    r,
                    "-A {sep} -p {proto} -m comment --comment \"{name}\" -m {proto} -j DNAT --to-destination {dest}"
                );
            }
        }
    }
    node_ports(cfg, v6, &mut chains, r);
    let mut out = String::from("*nat\n");
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// NodePorts (`externalTrafficPolicy: Cluster`): on any local address, masquerade and then the
/// Service's own chain. The jump to KUBE-NODEPORTS is the last rule of KUBE-SERVICES.
fn node_ports(cfg: &LabConfig, v6: bool, chains: &mut Vec<String>, r: &mut String) {
    let mut any = false;
    for s in cfg.services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6) {
        for p in s.ports.iter().filter(|p| p.node_port.is_some()) {
            if cfg.endpoint_ips(s, v6).is_empty() {
                continue;
            }
            let (np, proto, name) = (
                p.node_port.expect("filtered"),
                p.protocol.lower(),
                port_name(s, p),
            );
            let ext = format!("KUBE-EXT-{}", &svc_chain(s, p)["KUBE-SVC-".len()..]);
            chains.push(ext.clone());
            let _ = writeln!(
                r,
                "-A KUBE-NODEPORTS -p {proto} -m comment --comment \"{name}\" -m {proto} --dport {np} -j {ext}"
            );
            let _ = writeln!(
                r,
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(r, "-A {ext} -j {}", svc_chain(s, p));
            any = true;
        }
    }
    if any {
        chains.push("KUBE-NODEPORTS".to_owned());
        r.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    }
}

/// The filter table's part of kube-proxy: a Service port without endpoints is rejected
/// (`KUBE-SERVICES` in filter, jumped to from INPUT, FORWARD and OUTPUT for new connections,
/// commented `ns/svc:port has no endpoints`), as kube-proxy's iptables proxier writes it. Such a
/// packet is never translated: it is dropped still addressed to the Service.
pub fn filter_table(cfg: &LabConfig, family: Family) -> String {
    let v6 = family == Family::V6;
    let mut out = String::from("*filter\n:KUBE-SERVICES - [0:0]\n");
    for hook in ["INPUT", "FORWARD", "OUTPUT"] {
        let _ = writeln!(
            out,
            "-A {hook} -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        );
    }
    for s in cfg.services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6) {
        if cfg.endpoints(s).next().is_some() {
            continue;
        }
        for p in &s.ports {
            let proto = p.protocol.lower();
            let reject = if v6 {
                "icmp6-port-unreachable"
            } else {
                "icmp-port-unreachable"
            };
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -d {} -p {proto} -m comment --comment \"{} has no endpoints\" -m {proto} --dport {} -j REJECT --reject-with {reject}",
                host(s.cluster_ip),
                port_name(s, p),
                p.port
            );
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Everything kube-proxy programs for one address family, as `iptables-restore --noflush` input.
pub fn tables(cfg: &LabConfig, family: Family) -> String {
    nat_table(cfg, family) + &filter_table(cfg, family)
}

/// Protocol of a service port, for display.
pub fn proto_upper(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn story_rules_have_kube_proxy_shape() {
        let cfg = LabConfig::story();
        let v4 = nat_table(&cfg, Family::V4);
        assert!(v4.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        assert!(v4.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(v4.contains(
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(v4.contains("-d 100.64.0.10/32 -p tcp"));
        assert!(v4.contains("-j DNAT --to-destination 10.244.2.10:8443"));
        assert!(v4.contains("-p udp -m comment --comment \"payments/dns:dns\" -m udp -j DNAT --to-destination 10.244.2.53:5353"));
        // Two endpoints: the first is chosen with probability 1/2, the last unconditionally.
        assert!(v4.contains("--mode random --probability 0.5000000000"));
        assert!(!v4.contains("fd00"));
        let v6 = nat_table(&cfg, Family::V6);
        assert!(v6.contains("-d fd00:100:64::10/128"));
        assert!(v6.contains("--to-destination [fd00:10:244:2::10]:8443"));
        assert!(v4.ends_with("COMMIT\n"));
        // The NodePort of payments/web: masquerade, then the Service chain; the jump to it last.
        assert!(v4.contains("-A KUBE-NODEPORTS -p tcp -m comment --comment \"payments/web:https\" -m tcp --dport 30443 -j KUBE-EXT-"), "{v4}");
        let last_service_rule = v4
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(
            last_service_rule.ends_with("-j KUBE-NODEPORTS"),
            "{last_service_rule}"
        );
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        let cfg = LabConfig::story();
        let names: std::collections::BTreeSet<String> = cfg
            .services
            .iter()
            .flat_map(|s| s.ports.iter().map(move |p| svc_chain(s, p)))
            .collect();
        let ports: usize = cfg.services.iter().map(|s| s.ports.len()).sum();
        assert_eq!(names.len(), ports);
        for n in &names {
            assert_eq!(n.len(), "KUBE-SVC-".len() + 16);
        }
    }
}
