//! Fixes in the stopping layer's own terms: a NetworkPolicy on the backend pods and the
//! targetPort (never the Service IP or port), or a firewall rule for the wire tuple.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use super::{Names, Story};
use crate::names::PodName;
use crate::record::{ServiceRef, TupleView};

#[derive(Debug, Clone, Serialize)]
pub struct Fix {
    /// `network_policy`, `firewall` or `service`.
    pub kind: String,
    pub summary: String,
    /// NetworkPolicy YAML to add.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<String>,
    /// `gcloud compute firewall-rules create ...`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcloud: Option<String>,
    /// The same rule for the lab's VPC (`nft`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nft: Option<String>,
    /// The same rule as a lab Firewall rule (for `observer-lab apply`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lab_firewall_rule: Option<serde_json::Value>,
    /// What to look at with kubectl.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubectl: Option<String>,
    /// Commands that list the rules on the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspect: Option<String>,
}

impl Fix {
    fn new(kind: &str, summary: String) -> Fix {
        Fix {
            kind: kind.into(),
            summary,
            network_policy: None,
            gcloud: None,
            nft: None,
            lab_firewall_rule: None,
            kubectl: None,
            inspect: None,
        }
    }
}

/// kube-proxy rejects a Service port without ready endpoints before any translation: the fix is
/// endpoints, not a policy or a firewall rule.
pub fn service_fix(svc: &ServiceRef) -> Fix {
    let mut f = Fix::new(
        "service",
        format!(
            "give Service {}/{} ready endpoints: no ready pod backs port {}, so kube-proxy rejects every connection to it (no NetworkPolicy or firewall rule can help)",
            svc.namespace, svc.name, svc.port
        ),
    );
    f.kubectl = Some(format!(
        "kubectl get endpointslices -n {} -l kubernetes.io/service-name={}\nkubectl get service -n {} {} -o jsonpath='{{.spec.selector}}'",
        svc.namespace, svc.name, svc.namespace, svc.name
    ));
    f
}

fn peer(p: &Option<PodName>, ip: &str) -> serde_json::Value {
    match p {
        Some(p) => json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": p.namespace}},
            "podSelector": {"matchLabels": p.labels},
        }),
        None => {
            json!({"ipBlock": {"cidr": format!("{ip}/{}", if ip.contains(':') { 128 } else { 32 })}})
        }
    }
}

fn policy(
    name: &str,
    ns: &str,
    selected: &BTreeMap<String, String>,
    egress: bool,
    peers: Vec<serde_json::Value>,
    ports: Vec<(String, u16)>,
) -> String {
    let ports: Vec<_> = ports
        .into_iter()
        .map(|(proto, port)| json!({"protocol": proto, "port": port}))
        .collect();
    let rule = if egress {
        json!({"to": peers, "ports": ports})
    } else {
        json!({"from": peers, "ports": ports})
    };
    let doc = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": selected},
            "policyTypes": [if egress { "Egress" } else { "Ingress" }],
            (if egress { "egress" } else { "ingress" }): [rule],
        },
    });
    format!(
        "---\n{}",
        serde_norway::to_string(&doc).expect("JSON values serialise as YAML")
    )
}

/// Allow the connection in the client's egress or the server's ingress policy. `saw` is what the
/// filter evaluated: the backend pod and the targetPort.
pub fn policy_fix(story: &Story, egress: bool, saw: &TupleView, names: &Names) -> Option<Fix> {
    let proto = story
        .sender
        .as_ref()
        .or(story.receiver.as_ref())?
        .proto
        .clone();
    let client = names.pod(&saw.src);
    let server = names.pod(&saw.dst);
    let (me, other, other_ip) = if egress {
        (client.as_ref()?, &server, &saw.dst)
    } else {
        (server.as_ref()?, &client, &saw.src)
    };
    let other_name = other
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_else(|| other_ip.replace([':', '.'], "-"));
    let name = if egress {
        format!("allow-{}-to-{}-{}", me.name, other_name, saw.dport)
    } else {
        format!("allow-{}-from-{}-{}", me.name, other_name, saw.dport)
    };
    let yaml = policy(
        &name,
        &me.namespace,
        &me.labels,
        egress,
        vec![peer(other, other_ip)],
        vec![(proto.clone(), saw.dport)],
    );
    // A masqueraded source (a NodePort's client, a hostNetwork client) is the node's IP there.
    let masqueraded = match names.node(other_ip) {
        Some(node) if !egress => format!(
            "; the source the filter saw is {node}'s IP: the client was masqueraded on {node}, so only an ipBlock on that address admits it (and every client masqueraded there)"
        ),
        _ => String::new(),
    };
    let mut f = Fix::new(
        "network_policy",
        format!(
            "allow {} of {}/{} {} {} on {}/{} (the targetPort; not the Service IP or port){masqueraded}",
            if egress { "egress" } else { "ingress" },
            me.namespace,
            me.name,
            if egress { "to" } else { "from" },
            names.label(other_ip),
            proto,
            saw.dport
        ),
    );
    f.network_policy = Some(yaml);
    Some(f)
}

/// Both pods on one node: their egress and ingress policies are evaluated in the same FORWARD
/// pass, so either may have dropped it; both rules, the one that is missing suffices.
pub fn policy_fix_either(story: &Story, saw: &TupleView, names: &Names) -> Option<Fix> {
    let egress = policy_fix(story, true, saw, names);
    let ingress = policy_fix(story, false, saw, names);
    match (egress, ingress) {
        (Some(e), Some(i)) => {
            let mut f = Fix::new(
                "network_policy",
                format!(
                    "{}; or {} (both pods are on one node, where either policy may have dropped it: add the one whose namespace has a policy selecting its pod)",
                    e.summary, i.summary
                ),
            );
            f.network_policy = Some(format!(
                "{}---\n{}",
                e.network_policy.unwrap_or_default(),
                i.network_policy.unwrap_or_default()
            ));
            Some(f)
        }
        (e, i) => e.or(i),
    }
}

/// The node's own filtering (filter OUTPUT or INPUT) dropped it: a host firewall or a
/// host-endpoint policy, which no NetworkPolicy changes. Which rule, its chain says.
pub fn host_firewall_fix(hook: &str, saw: &TupleView, proto: &str) -> Fix {
    let chain = hook.to_uppercase();
    let mut f = Fix::new(
        "host_firewall",
        format!(
            "allow {proto} from {} to {}:{} in the node's filter {chain} (host firewall, or a host-endpoint policy such as Calico's HostEndpoint): it matches the backend and targetPort, not the Service",
            saw.src, saw.dst, saw.dport
        ),
    );
    f.inspect = Some(format!(
        "iptables -L {chain} -v -n --line-numbers\nnft list ruleset | grep -B2 -A20 'hook {}'",
        match hook {
            "input" => "input",
            _ => "output",
        }
    ));
    f
}

/// Admit the wire tuple's port from the source the wire really carried: the pod range for a
/// pod's connection, the nodes' addresses for one masqueraded to a node's IP (a NodePort's
/// client, a hostNetwork client), else that address alone.
pub fn firewall_fix(wire: &TupleView, proto: &str, names: &Names) -> Fix {
    let p = proto.to_ascii_lowercase();
    let v6 = wire.src.contains(':');
    let host = format!("{}/{}", wire.src, if v6 { 128 } else { 32 });
    let (ranges, from, name) = match names.node(&wire.src) {
        Some(node) => {
            let nodes = names.node_ranges(v6);
            (
                if nodes.is_empty() { vec![host] } else { nodes },
                format!(
                    "the nodes' addresses (the wire's source is {node}'s IP {}: the connection was masqueraded on {node}, so a rule for the pod range does not match it)",
                    wire.src
                ),
                format!("allow-nodes-to-{p}-{}", wire.dport),
            )
        }
        None => {
            let range = names.pod_range(&wire.src);
            (
                vec![range.clone()],
                format!("the pod range {range}"),
                format!("allow-pods-to-{p}-{}", wire.dport),
            )
        }
    };
    let fam = if v6 { "ip6" } else { "ip" };
    let mut f = Fix::new(
        "firewall",
        format!(
            "allow {p}:{} from {from} between the nodes (the wire carries the targetPort)",
            wire.dport
        ),
    );
    f.gcloud = Some(format!(
        "gcloud compute firewall-rules create {name} --network=NETWORK --direction=INGRESS --action=ALLOW --rules={p}:{} --source-ranges={} --target-tags=NODE_TAG",
        wire.dport,
        ranges.join(",")
    ));
    let saddr = match ranges.as_slice() {
        [one] => one.clone(),
        many => format!("{{ {} }}", many.join(", ")),
    };
    f.nft = Some(format!(
        "nft insert rule inet vpc forward {fam} saddr {saddr} {p} dport {} accept",
        wire.dport
    ));
    f.lab_firewall_rule = Some(
        json!({"name": name, "sourceRanges": ranges, "rules": [format!("{p}:{}", wire.dport)]}),
    );
    f
}

/// NetworkPolicies that allow exactly the observed connections between known pods: egress for
/// each client pod, ingress for each server pod, on the targetPorts seen after DNAT.
pub fn suggest_policies(stories: &[Story], names: &Names) -> String {
    /// (namespace, pod) -> the pod and its observed peers (peer, protocol, targetPort).
    type Seen = BTreeMap<(String, String), (PodName, Vec<(PodName, String, u16)>)>;
    let mut egress = Seen::new();
    let mut ingress = Seen::new();
    for s in stories {
        let (Some(b), Some(r)) = (s.backend(), s.sender.as_ref().or(s.receiver.as_ref())) else {
            continue;
        };
        let (Some(c), Some(sv)) = (names.pod(&b.src), names.pod(&b.dst)) else {
            continue;
        };
        let e = egress
            .entry((c.namespace.clone(), c.name.clone()))
            .or_insert_with(|| (c.clone(), Vec::new()));
        e.1.push((sv.clone(), r.proto.clone(), b.dport));
        let i = ingress
            .entry((sv.namespace.clone(), sv.name.clone()))
            .or_insert_with(|| (sv.clone(), Vec::new()));
        i.1.push((c.clone(), r.proto.clone(), b.dport));
    }
    let mut out = String::new();
    for (egress_dir, map) in [(true, egress), (false, ingress)] {
        for (_, (me, mut peers)) in map {
            peers.sort_by(|a, b| (&a.0.name, &a.1, a.2).cmp(&(&b.0.name, &b.1, b.2)));
            peers.dedup_by(|a, b| a.0.name == b.0.name && a.1 == b.1 && a.2 == b.2);
            // One rule per peer pod, with the ports seen to or from it.
            let mut rules: BTreeMap<String, (PodName, Vec<(String, u16)>)> = BTreeMap::new();
            for (p, proto, port) in peers {
                rules
                    .entry(p.name.clone())
                    .or_insert_with(|| (p.clone(), Vec::new()))
                    .1
                    .push((proto, port));
            }
            for (_, (p, ports)) in rules {
                let name = format!(
                    "observed-{}-{}-{}",
                    me.name,
                    if egress_dir { "to" } else { "from" },
                    p.name
                );
                out.push_str(&policy(
                    &name,
                    &me.namespace,
                    &me.labels,
                    egress_dir,
                    vec![peer(&Some(p.clone()), "")],
                    ports,
                ));
            }
        }
    }
    out
}
