//! kube-proxy nftables-mode rules, in kube-proxy's own shape (kubernetes `pkg/proxy/nftables`,
//! GA in 1.33): `table ip kube-proxy` (`ip6` for IPv6) whose `nat-prerouting`/`nat-output`
//! chains (priority dstnat) jump to `services`, which looks the destination up in the
//! `service-ips` verdict map; a per-Service-port chain marks off-cluster clients for masquerade
//! and picks an endpoint with `numgen random mod N vmap`; per-endpoint chains `dnat to` it.
//! `masquerading` in `nat-postrouting` (srcnat) masquerades what was marked 0x4000. In the
//! filter chains (`filter-forward`, `filter-input`, `filter-output`, at dstnat - 10, before any
//! DNAT), `service-endpoints-check` rejects Services without endpoints through
//! `no-endpoint-services`, and `cluster-ips-check` rejects other ports of a ClusterIP and drops
//! unallocated ClusterIPs (for local processes after DNAT, in `filter-output-post-dnat`).
//!
//! Chain names follow kube-proxy's: `service-<HASH>-<ns>/<svc>/<proto>/<port name>` and
//! `endpoint-<HASH>-<ns>/<svc>/<proto>/<port name>__<ip>/<port>`; the hash digits differ.

use std::{fmt::Write as _, net::IpAddr};

use crate::{
    config::{LabConfig, Service, ServicePort},
    kubeproxy::chain_hash,
    model::Family,
};

fn name(s: &Service, p: &ServicePort) -> String {
    format!(
        "{}/{}/{}/{}",
        s.namespace,
        s.name,
        p.protocol.lower(),
        p.name.as_deref().unwrap_or("")
    )
}

fn service_chain(s: &Service, p: &ServicePort) -> String {
    let n = name(s, p);
    format!("service-{}-{n}", &chain_hash(&n)[..8])
}

fn endpoint_chain(s: &Service, p: &ServicePort, ep: IpAddr) -> String {
    // A chain name may not hold a colon: kube-proxy writes an IPv6 endpoint with dots.
    let ip = addr(ep).replace(':', ".");
    let n = format!("{}__{ip}/{}", name(s, p), p.target_port);
    format!("endpoint-{}-{n}", &chain_hash(&n)[..8])
}

/// An address as nft writes it in a rule (IPv6 without brackets).
fn addr(ip: IpAddr) -> String {
    ip.to_string()
}

fn dnat_to(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}:{port}"),
        IpAddr::V6(v) => format!("[{v}]:{port}"),
    }
}

/// The whole `table <family> kube-proxy`, as `nft -f` input (it replaces any previous one).
pub fn ruleset(cfg: &LabConfig, family: Family) -> String {
    let (fam, ip, addr_type) = match family {
        Family::V4 => ("ip", "ip", "ipv4_addr"),
        Family::V6 => ("ip6", "ip6", "ipv6_addr"),
    };
    let v6 = family == Family::V6;
    let cluster_cidr = if v6 {
        cfg.cluster_cidr6.map(|c| c.to_string())
    } else {
        Some(cfg.cluster_cidr.to_string())
    };
    let t = format!("{fam} kube-proxy");
    let mut out = String::new();
    let o = &mut out;
    // Declaring then deleting makes the load idempotent: the new table replaces the old one.
    let _ = writeln!(o, "add table {t}\ndelete table {t}");
    declare(o, &t, addr_type);
    let service_cidr = if v6 {
        None
    } else {
        Some(cfg.service_cidr.to_string())
    };
    let base = [
        format!("cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
        service_cidr.map_or_else(String::new, |c| {
            format!("cluster-ips-check {ip} daddr {{ {c} }} drop comment \"Drop traffic to unallocated ClusterIPs\"")
        }),
        "filter-forward ct state new jump service-endpoints-check".into(),
        "filter-forward ct state new jump cluster-ips-check".into(),
        "filter-input ct state new jump service-endpoints-check".into(),
        "filter-output ct state new jump service-endpoints-check".into(),
        "filter-output-post-dnat ct state new jump cluster-ips-check".into(),
        "mark-for-masquerade mark set mark or 0x4000".into(),
        "masquerading mark and 0x4000 == 0 return".into(),
        "masquerading mark set mark xor 0x4000".into(),
        "masquerading masquerade fully-random".into(),
        "nat-output jump services".into(),
        "nat-postrouting jump masquerading".into(),
        "nat-prerouting jump services".into(),
        "reject-chain reject".into(),
        format!("services {ip} daddr . meta l4proto . th dport vmap @service-ips"),
        if v6 {
            "services fib daddr type local meta l4proto . th dport vmap @service-nodeports".into()
        } else {
            "services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports".into()
        },
        format!("service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    ];
    for rule in base.iter().filter(|r| !r.is_empty()) {
        let _ = writeln!(o, "add rule {t} {rule}");
    }
    for s in cfg.services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6) {
        let _ = writeln!(
            o,
            "add element {t} cluster-ips {{ {} }}",
            addr(s.cluster_ip)
        );
        for p in &s.ports {
            service_port(o, &t, cfg, s, p, ip, cluster_cidr.as_deref(), v6);
        }
    }
    out
}

/// The table, its set and maps, and every fixed chain (base chains with their hooks).
fn declare(o: &mut String, t: &str, addr_type: &str) {
    let _ = writeln!(o, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(
        o,
        "add set {t} cluster-ips {{ type {addr_type} ; comment \"Active ClusterIPs\" ; }}"
    );
    for (map, what) in [
        (
            "no-endpoint-services",
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "service-ips",
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
    ] {
        let _ = writeln!(
            o,
            "add map {t} {map} {{ type {addr_type} . inet_proto . inet_service : verdict ; comment \"{what}\" ; }}"
        );
    }
    let _ = writeln!(
        o,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    for (chain, hook) in [
        // Before DNAT (dstnat - 10), so they see what the client asked for.
        ("filter-forward", Some("filter hook forward priority -110")),
        ("filter-input", Some("filter hook input priority -110")),
        ("filter-output", Some("filter hook output priority -110")),
        (
            "filter-output-post-dnat",
            Some("filter hook output priority -90"),
        ),
        ("nat-output", Some("nat hook output priority -100")),
        ("nat-postrouting", Some("nat hook postrouting priority 100")),
        ("nat-prerouting", Some("nat hook prerouting priority -100")),
        ("cluster-ips-check", None),
        ("mark-for-masquerade", None),
        ("masquerading", None),
        ("reject-chain", None),
        ("services", None),
        ("service-endpoints-check", None),
    ] {
        match hook {
            Some(h) => {
                let _ = writeln!(o, "add chain {t} {chain} {{ type {h} ; }}");
            }
            None => {
                let _ = writeln!(o, "add chain {t} {chain}");
            }
        }
    }
}

/// The chains and map elements of one Service port.
#[expect(
    clippy::too_many_arguments,
    reason = "one Service port in its table and family"
)]
fn service_port(
    o: &mut String,
    t: &str,
    cfg: &LabConfig,
    s: &Service,
    p: &ServicePort,
    ip: &str,
    cluster_cidr: Option<&str>,
    v6: bool,
) {
    let proto = p.protocol.lower();
    let key = format!("{} . {proto} . {}", addr(s.cluster_ip), p.port);
    let eps = cfg.endpoint_ips(s, v6);
    if eps.is_empty() {
        let _ = writeln!(
            o,
            "add element {t} no-endpoint-services {{ {key} comment \"{}\" : goto reject-chain }}",
            crate::kubeproxy::port_name(s, p)
        );
        return;
    }
    let svc = service_chain(s, p);
    // Every chain exists before a verdict map names it.
    let _ = writeln!(o, "add chain {t} {svc}");
    for ep in &eps {
        let _ = writeln!(o, "add chain {t} {}", endpoint_chain(s, p, *ep));
    }
    if let Some(cc) = cluster_cidr {
        let _ = writeln!(
            o,
            "add rule {t} {svc} {ip} daddr {} {ip} saddr != {cc} jump mark-for-masquerade",
            addr(s.cluster_ip)
        );
    }
    let choices: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", endpoint_chain(s, p, *ep)))
        .collect();
    let _ = writeln!(
        o,
        "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
        eps.len(),
        choices.join(" , ")
    );
    for ep in &eps {
        let chain = endpoint_chain(s, p, *ep);
        let _ = writeln!(
            o,
            "add rule {t} {chain} {ip} saddr {} jump mark-for-masquerade",
            addr(*ep)
        );
        let _ = writeln!(
            o,
            "add rule {t} {chain} meta l4proto {proto} dnat to {}",
            dnat_to(*ep, p.target_port)
        );
    }
    let _ = writeln!(o, "add element {t} service-ips {{ {key} : goto {svc} }}");
    if let Some(np) = p.node_port {
        // externalTrafficPolicy: Cluster: masquerade, then any endpoint.
        let ext = format!("external-{}", &svc["service-".len()..]);
        let _ = writeln!(o, "add chain {t} {ext}");
        let _ = writeln!(o, "add rule {t} {ext} jump mark-for-masquerade");
        let _ = writeln!(o, "add rule {t} {ext} goto {svc}");
        let _ = writeln!(
            o,
            "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_story_in_nftables_mode_has_kube_proxys_shape() {
        let cfg = LabConfig::story();
        let r = ruleset(&cfg, Family::V4);
        assert!(r.contains(
            "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"
        ));
        assert!(r.contains(
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips"
        ));
        // Two endpoints of payments/api: one numgen choice each, each chain DNATs to targetPort.
        let api = r
            .lines()
            .find(|l| l.contains("service-") && l.contains("payments/api/tcp/http numgen"))
            .expect("the api Service chooses an endpoint");
        assert!(
            api.contains("numgen random mod 2 vmap { 0 : goto endpoint-"),
            "{api}"
        );
        assert!(r.contains("meta l4proto tcp dnat to 10.244.1.20:8080"));
        assert!(r.contains("meta l4proto tcp dnat to 10.244.2.20:8080"));
        // A Service without endpoints is rejected, not translated.
        assert!(r.contains("no-endpoint-services { 100.64.0.30 . tcp . 80 comment \"payments/orders:http\" : goto reject-chain }"), "{r}");
        let v6 = ruleset(&cfg, Family::V6);
        assert!(v6.contains("add table ip6 kube-proxy"));
        assert!(v6.contains("dnat to [fd00:10:244:2::10]:8443"));
        assert!(
            v6.contains("__fd00.10.244.2..10/8443"),
            "IPv6 endpoints named with dots"
        );
        assert!(
            !v6.contains("100.64.0.10"),
            "IPv4 Services stay in the ip table"
        );
    }
}
