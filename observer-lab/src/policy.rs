//! NetworkPolicy (networking.k8s.io/v1) enforced the way Calico's iptables dataplane does it:
//! in filter FORWARD, a per-pod "from workload" chain for the pod's egress policies on its node
//! and a per-pod "to workload" chain for its ingress policies, default deny for selected pods,
//! an accept mark passed between them so a packet must satisfy both. Because filter FORWARD runs
//! after nat PREROUTING, these rules see the Service's backend (Pod IP, targetPort), as Calico's do.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use serde::Deserialize;

pub use crate::model::Metadata;
use crate::{
    config::LabConfig,
    config::Pod,
    firewall::Firewall,
    model::{Cidr, Family, Protocol},
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("NetworkPolicy YAML: {0}")]
    Yaml(String),
    #[error("NetworkPolicy {name}: {what}")]
    Unsupported { name: String, what: String },
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub pod_selector: Selector,
    pub policy_types: Option<Vec<PolicyType>>,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyType {
    Ingress,
    Egress,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// An ingress rule (`from`) or egress rule (`to`): peers and ports.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, alias = "to")]
    pub from: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Peer {
    pub pod_selector: Option<Selector>,
    pub namespace_selector: Option<Selector>,
    pub ip_block: Option<IpBlock>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: Cidr,
    #[serde(default)]
    pub except: Vec<Cidr>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyPort {
    #[serde(default = "tcp")]
    pub protocol: String,
    pub port: Option<PortRef>,
    pub end_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// What the lab enforces: NetworkPolicies in the nodes, a firewall in the VPC between them.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub network_policies: Vec<NetworkPolicy>,
    /// None: GKE's default rule.
    pub firewall: Option<Firewall>,
}

/// Parse `---`-separated documents: `networking.k8s.io/v1` NetworkPolicies and at most one
/// `lab.observer/v1` Firewall; refuse what this lab cannot enforce.
pub fn parse(text: &str) -> Result<Policies, PolicyError> {
    let mut out = Policies::default();
    let yaml = |e: serde_norway::Error| PolicyError::Yaml(e.to_string());
    for doc in serde_norway::Deserializer::from_str(text) {
        let v = serde_norway::Value::deserialize(doc).map_err(yaml)?;
        if v.is_null() {
            continue;
        }
        if v.get("kind").and_then(|k| k.as_str()) == Some("Firewall") {
            let fw: Firewall = serde_norway::from_value(v).map_err(yaml)?;
            fw.check().map_err(|what| PolicyError::Unsupported {
                name: format!("Firewall {}", fw.metadata.name),
                what,
            })?;
            if out.firewall.replace(fw).is_some() {
                return Err(PolicyError::Yaml("more than one Firewall document".into()));
            }
            continue;
        }
        let p: NetworkPolicy = serde_norway::from_value(v).map_err(yaml)?;
        check(&p)?;
        out.network_policies.push(p);
    }
    Ok(out)
}

fn check(p: &NetworkPolicy) -> Result<(), PolicyError> {
    let bad = |what: String| {
        Err(PolicyError::Unsupported {
            name: format!("{}/{}", p.metadata.namespace, p.metadata.name),
            what,
        })
    };
    if p.api_version != "networking.k8s.io/v1" || p.kind != "NetworkPolicy" {
        return bad(format!(
            "{} {} is not networking.k8s.io/v1 NetworkPolicy",
            p.api_version, p.kind
        ));
    }
    let rules = p
        .spec
        .ingress
        .iter()
        .flatten()
        .chain(p.spec.egress.iter().flatten());
    let selectors = std::iter::once(&p.spec.pod_selector).chain(
        rules.clone().flat_map(|r| &r.from).flat_map(|peer| {
            peer.pod_selector
                .iter()
                .chain(peer.namespace_selector.iter())
        }),
    );
    for s in selectors {
        for r in &s.match_expressions {
            if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&r.operator.as_str()) {
                return bad(format!("selector operator {:?}", r.operator));
            }
        }
    }
    for r in rules {
        for peer in &r.from {
            if peer.ip_block.is_some()
                && (peer.pod_selector.is_some() || peer.namespace_selector.is_some())
            {
                return bad("a peer with ipBlock and a selector".into());
            }
            if peer.ip_block.is_none()
                && peer.pod_selector.is_none()
                && peer.namespace_selector.is_none()
            {
                return bad("an empty peer".into());
            }
        }
        for port in &r.ports {
            if port.protocol != "TCP" && port.protocol != "UDP" {
                return bad(format!(
                    "protocol {} (the lab carries TCP and UDP)",
                    port.protocol
                ));
            }
            if port.end_port.is_some() && !matches!(port.port, Some(PortRef::Number(_))) {
                return bad("endPort without a numeric port".into());
            }
        }
    }
    Ok(())
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let v = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => v.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => !v.is_some_and(|v| r.values.contains(v)),
                    "Exists" => v.is_some(),
                    _ => v.is_none(),
                }
            })
    }
}

impl NetworkPolicy {
    fn types(&self) -> Vec<PolicyType> {
        self.spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec![PolicyType::Ingress];
            if self.spec.egress.is_some() {
                t.push(PolicyType::Egress);
            }
            t
        })
    }

    fn selects(&self, pod: &Pod, ty: PolicyType) -> bool {
        pod.namespace == self.metadata.namespace
            && self.spec.pod_selector.matches(&pod.labels)
            && self.types().contains(&ty)
    }

    fn rules(&self, ty: PolicyType) -> &[Rule] {
        match ty {
            PolicyType::Ingress => self.spec.ingress.as_deref().unwrap_or(&[]),
            PolicyType::Egress => self.spec.egress.as_deref().unwrap_or(&[]),
        }
    }
}

fn ip_of(pod: &Pod, family: Family) -> Option<IpAddr> {
    match family {
        Family::V4 => Some(IpAddr::V4(pod.ip)),
        Family::V6 => pod.ip6.map(IpAddr::V6),
    }
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// One peer of a rule, resolved: pods (by address), or a CIDR with exceptions.
enum Target<'a> {
    Any,
    Pods(Vec<&'a Pod>),
    Block(&'a IpBlock),
}

fn targets<'a>(cfg: &'a LabConfig, policy: &NetworkPolicy, rule: &'a Rule) -> Vec<Target<'a>> {
    if rule.from.is_empty() {
        return vec![Target::Any];
    }
    rule.from
        .iter()
        .map(|peer| {
            if let Some(b) = &peer.ip_block {
                return Target::Block(b);
            }
            let ns_ok = |ns: &str| match &peer.namespace_selector {
                Some(sel) => cfg
                    .namespaces
                    .iter()
                    .find(|n| n.name == ns)
                    .is_some_and(|n| sel.matches(&n.labels)),
                None => ns == policy.metadata.namespace,
            };
            Target::Pods(
                cfg.pods
                    .iter()
                    .filter(|p| ns_ok(&p.namespace))
                    .filter(|p| {
                        peer.pod_selector
                            .as_ref()
                            .is_none_or(|s| s.matches(&p.labels))
                    })
                    .collect(),
            )
        })
        .collect()
}

/// `-p proto -m proto --dport N[:M]` for a numeric port; named ports resolve per pod.
fn port_match(port: &PolicyPort, number: Option<u16>) -> String {
    let proto = port.protocol.to_ascii_lowercase();
    match (number, port.end_port) {
        (Some(n), Some(end)) => format!("-p {proto} -m {proto} --dport {n}:{end}"),
        (Some(n), None) => format!("-p {proto} -m {proto} --dport {n}"),
        (None, _) => format!("-p {proto}"),
    }
}

fn named_port(pod: &Pod, name: &str, protocol: &str) -> Option<u16> {
    pod.ports
        .iter()
        .find(|p| p.name == name && p.protocol == proto_of(protocol))
        .map(|p| p.port)
}

fn proto_of(s: &str) -> Protocol {
    if s == "UDP" {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}

const ACCEPT_MARK: &str = "0x10000/0x10000";

fn chain_name(kind: &str, pod: &str) -> String {
    format!("OBS-{kind}-{pod}")
}

fn sub_chain(seed: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in seed.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("OBS-X-{h:08x}")
}

/// The filter table for one node and address family, as `iptables-restore --noflush` input.
/// Returns the text and the chains it defines.
pub fn filter_table(
    cfg: &LabConfig,
    policies: &[NetworkPolicy],
    node: &str,
    family: Family,
) -> (String, BTreeSet<String>) {
    let mut chains = BTreeSet::from(["OBS-FORWARD".to_owned()]);
    let mut rules = String::new();
    let r = &mut rules;
    let _ = writeln!(
        r,
        "-A OBS-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"return traffic of allowed connections\" -j ACCEPT"
    );
    let local: Vec<&Pod> = cfg
        .pods
        .iter()
        .filter(|p| p.node == node && ip_of(p, family).is_some())
        .collect();
    for (ty, kind, dir_flag, peer_flag) in [
        (PolicyType::Egress, "FW", "-i", "-d"),
        (PolicyType::Ingress, "TW", "-o", "-s"),
    ] {
        for pod in &local {
            let selecting: Vec<&NetworkPolicy> =
                policies.iter().filter(|p| p.selects(pod, ty)).collect();
            if selecting.is_empty() {
                continue;
            }
            let chain = chain_name(kind, &pod.name);
            chains.insert(chain.clone());
            let _ = writeln!(
                r,
                "-A OBS-FORWARD {dir_flag} {} -m comment --comment \"{} {}/{}\" -j {chain}",
                cfg.host_veth(&pod.name),
                if ty == PolicyType::Egress {
                    "from workload"
                } else {
                    "to workload"
                },
                pod.namespace,
                pod.name
            );
            let _ = writeln!(r, "-A {chain} -j MARK --set-xmark 0x0/0x10000");
            for pol in &selecting {
                let name = format!("{}/{}", pol.metadata.namespace, pol.metadata.name);
                for (i, rule) in pol.rules(ty).iter().enumerate() {
                    let comment =
                        format!("-m comment --comment \"{name} {:?} rule {i}\"", ty).to_lowercase();
                    let ports: Vec<Option<&PolicyPort>> = if rule.ports.is_empty() {
                        vec![None]
                    } else {
                        rule.ports.iter().map(Some).collect()
                    };
                    for target in targets(cfg, pol, rule) {
                        for port in &ports {
                            emit(
                                r,
                                &mut chains,
                                &chain,
                                &comment,
                                peer_flag,
                                &target,
                                *port,
                                pod,
                                ty,
                                family,
                                &cfg.pods,
                            );
                        }
                    }
                }
            }
            let _ = writeln!(r, "-A {chain} -m mark --mark {ACCEPT_MARK} -j RETURN");
            let _ = writeln!(
                r,
                "-A {chain} -m comment --comment \"default deny: {} policies select {}/{}\" -j DROP",
                if ty == PolicyType::Egress {
                    "egress"
                } else {
                    "ingress"
                },
                pod.namespace,
                pod.name
            );
        }
    }
    let mut out = String::from("*filter\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    (out, chains)
}

/// One rule line for `target` and `port` in the pod's chain.
#[allow(
    clippy::too_many_arguments,
    reason = "one rule line needs all of its parts"
)]
fn emit(
    r: &mut String,
    chains: &mut BTreeSet<String>,
    chain: &str,
    comment: &str,
    peer_flag: &str,
    target: &Target<'_>,
    port: Option<&PolicyPort>,
    pod: &Pod,
    ty: PolicyType,
    family: Family,
    all_pods: &[Pod],
) {
    let accept = format!("-j MARK --set-xmark {ACCEPT_MARK}");
    let named = matches!(port.and_then(|p| p.port.as_ref()), Some(PortRef::Name(_)));
    // A named port is resolved on the pod that owns it: the peer for egress, the selected pod
    // for ingress. A pod without that name matches nothing.
    let line = |r: &mut String, peer: Option<String>, on: &Pod, tail: &str| {
        let pm = match port {
            None => String::new(),
            Some(p) => match &p.port {
                None => port_match(p, None),
                Some(PortRef::Number(n)) => port_match(p, Some(*n)),
                Some(PortRef::Name(name)) => match named_port(on, name, &p.protocol) {
                    Some(n) => port_match(p, Some(n)),
                    None => return,
                },
            },
        };
        let peer = peer.map(|a| format!("{peer_flag} {a}")).unwrap_or_default();
        let parts = [
            format!("-A {chain}"),
            peer,
            pm,
            comment.to_owned(),
            tail.to_owned(),
        ];
        let parts: Vec<&str> = parts
            .iter()
            .map(String::as_str)
            .filter(|p| !p.is_empty())
            .collect();
        let _ = writeln!(r, "{}", parts.join(" "));
    };
    let peers: Vec<&Pod> = match target {
        Target::Block(b) => {
            if b.cidr.addr.is_ipv4() != (family == Family::V4)
                || (named && ty == PolicyType::Egress)
            {
                return;
            }
            if b.except.is_empty() {
                line(r, Some(b.cidr.to_string()), pod, &accept);
            } else {
                let sub = sub_chain(&format!("{chain}{comment}{}", b.cidr));
                chains.insert(sub.clone());
                line(r, Some(b.cidr.to_string()), pod, &format!("-j {sub}"));
                for e in &b.except {
                    let _ = writeln!(r, "-A {sub} {peer_flag} {e} -j RETURN");
                }
                let _ = writeln!(r, "-A {sub} {accept}");
            }
            return;
        }
        Target::Any if !(named && ty == PolicyType::Egress) => {
            line(r, None, pod, &accept);
            return;
        }
        Target::Any => all_pods.iter().collect(),
        Target::Pods(p) => p.clone(),
    };
    for peer in peers {
        let Some(ip) = ip_of(peer, family) else {
            continue;
        };
        let on = if ty == PolicyType::Egress { peer } else { pod };
        line(r, Some(host(ip)), on, &accept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn story() -> LabConfig {
        LabConfig::story()
    }

    fn scenario(name: &str) -> Vec<NetworkPolicy> {
        let path = format!(
            "{}/../lab/scenarios/{name}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        parse(&std::fs::read_to_string(path).unwrap())
            .unwrap()
            .network_policies
    }

    #[test]
    fn egress_on_the_service_port_compiles_to_rules_that_never_see_the_service() {
        let (t, chains) = filter_table(
            &story(),
            &scenario("egress-service-port"),
            "node-a",
            Family::V4,
        );
        assert!(chains.contains("OBS-FW-pod-a"));
        assert!(t.contains("-A OBS-FORWARD -i vethf3204136"));
        // Port 443 to the payments pods: after DNAT no packet to a pod carries 443.
        assert!(t.contains("-d 10.244.2.10/32 -p tcp -m tcp --dport 443"));
        assert!(
            !t.contains("100.64."),
            "policy rules never name the Service IP"
        );
        assert!(t.contains("default deny: egress policies select shop/pod-a\" -j DROP"));
        // Nothing for node-b: pod-a is not there.
        let (tb, _) = filter_table(
            &story(),
            &scenario("egress-service-port"),
            "node-b",
            Family::V4,
        );
        assert!(!tb.contains("OBS-FW-"));
    }

    #[test]
    fn named_ports_resolve_on_the_pod_that_defines_them() {
        let (t, _) = filter_table(
            &story(),
            &scenario("egress-target-port"),
            "node-a",
            Family::V4,
        );
        assert!(
            t.contains("-d 10.244.2.10/32 -p tcp -m tcp --dport 8443"),
            "{t}"
        );
        assert!(!t.contains("--dport https"));
    }

    #[test]
    fn ingress_chains_live_on_the_receiving_node() {
        let pols = scenario("ingress-deny");
        let (a, _) = filter_table(&story(), &pols, "node-a", Family::V4);
        assert!(!a.contains("OBS-TW-"));
        let (b, chains) = filter_table(&story(), &pols, "node-b", Family::V4);
        assert!(chains.contains("OBS-TW-pod-b"));
        assert!(b.contains("-o vethf2203fa3"));
        // Only payments pods may connect, on 8443.
        assert!(b.contains("-s 10.244.2.53/32 -p tcp -m tcp --dport 8443"));
        assert!(!b.contains("-s 10.244.1.10/32"));
        let (b6, _) = filter_table(&story(), &pols, "node-b", Family::V6);
        assert!(b6.contains("OBS-TW-pod-b"), "IPv6 gets the same policy");
    }

    #[test]
    fn ip_blocks_with_exceptions_use_a_sub_chain() {
        let pols = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\n\
             spec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [frontend]}]}\n  policyTypes: [Egress]\n  \
             egress:\n  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]\n",
        )
        .unwrap()
        .network_policies;
        let (t, chains) = filter_table(&story(), &pols, "node-a", Family::V4);
        let sub = chains
            .iter()
            .find(|c| c.starts_with("OBS-X-"))
            .expect("sub-chain");
        assert!(
            t.contains(&format!(
                "-d 10.244.0.0/16 -m comment --comment \"shop/p egress rule 0\" -j {sub}"
            )),
            "{t}"
        );
        assert!(t.contains(&format!("-A {sub} -d 10.244.2.0/24 -j RETURN")));
    }

    #[test]
    fn what_the_lab_cannot_enforce_is_refused_by_name() {
        let base = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {}\n";
        let err = parse(&format!(
            "{base}  ingress: [{{ports: [{{protocol: SCTP, port: 7}}]}}]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("protocol SCTP"), "{err}");
        let err = parse(&format!("{base}  egressz: []\n")).unwrap_err();
        assert!(err.to_string().contains("egressz"), "{err}");
        let err =
            parse("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {podSelector: {}}\n")
                .unwrap_err();
        assert!(
            err.to_string()
                .contains("not networking.k8s.io/v1 NetworkPolicy"),
            "{err}"
        );
        assert!(parse("# nothing\n").unwrap().network_policies.is_empty());
    }
}
