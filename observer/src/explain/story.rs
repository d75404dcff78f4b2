//! One connection across nodes: the client node's record and the server node's record.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::{Names, fix};
use crate::record::{FlowRecord, ObservedAs, ServiceRef, TupleView};

#[derive(Debug, Clone, Default)]
pub struct Story {
    /// Record of the node where the client lives (has `pre_dnat`), or where an outside
    /// client's connection entered and was translated (a NodePort).
    pub sender: Option<FlowRecord>,
    /// Record of the node where the server pod lives (arrived already translated).
    pub receiver: Option<FlowRecord>,
}

/// Where the connection stopped and why, in the terms of the layer that stopped it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub outcome: String,
    pub last_seen: crate::record::LastSeen,
    /// The layer that stopped it: `service` (kube-proxy: no endpoints), `network_policy_egress`,
    /// `network_policy_ingress`, `network_policy` (both pods on one node: either),
    /// `host_firewall_egress`/`_ingress` (filter OUTPUT/INPUT), `netfilter` (a netfilter drop
    /// outside the filter table), `firewall_between_nodes`, `kernel` (another drop reason),
    /// `application`.
    pub layer: Option<String>,
    pub explanation: String,
    pub fix: Option<fix::Fix>,
}

/// What a selector names: `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl Endpoint {
    /// For clap: a one-line error that shows the accepted forms.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        s.parse()
    }

    fn matches(&self, (ip, port): (&str, u16)) -> bool {
        ip.parse::<IpAddr>().is_ok_and(|ip| ip == self.ip) && self.port.is_none_or(|p| p == port)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Endpoint {
                ip: sa.ip(),
                port: Some(sa.port()),
            });
        }
        let bare = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s);
        bare.parse::<IpAddr>()
            .map(|ip| Endpoint { ip, port: None })
            .map_err(|_| {
                format!("{s:?}: expected IP, IP:PORT, [IPv6] or [IPv6]:PORT (e.g. 100.64.0.10:443, [fd00::10]:443)")
            })
    }
}

/// Writes verdicts that share where the connection was last seen.
struct Judge {
    last: crate::record::LastSeen,
}

impl Judge {
    fn say(
        &self,
        outcome: &str,
        layer: Option<&str>,
        explanation: String,
        fix: Option<fix::Fix>,
    ) -> Verdict {
        Verdict {
            outcome: outcome.into(),
            last_seen: self.last.clone(),
            layer: layer.map(str::to_owned),
            explanation,
            fix,
        }
    }
}

/// The Service a dropped packet was still addressed to: NetworkPolicy only ever sees translated
/// tuples, so a netfilter drop of a Service address is kube-proxy's own (no endpoints).
fn untranslated_service(r: &FlowRecord, dropped: &TupleView, names: &Names) -> Option<ServiceRef> {
    names
        .service(&dropped.dst, dropped.dport, &r.proto, None)
        .or_else(|| {
            r.service
                .clone()
                .filter(|_| !r.translated && r.pre_dnat.as_ref() == Some(dropped))
        })
}

/// The layer of a drop in the filter table, from the hook where it happened: the node's own
/// filtering at OUTPUT and INPUT; at FORWARD the client's egress policy on its node, the
/// server's ingress policy on its node, and either one when both pods share the node, unless the
/// rule the kernel's trace named says whose. Returns (layer, where in words, egress?).
fn filter_layer(
    hook: &str,
    r: &FlowRecord,
    d: &crate::record::Drop,
    egress: bool,
) -> (&'static str, &'static str, bool) {
    let traced = d.rule.as_ref().and_then(policy_direction);
    let local = r.observed_as == ObservedAs::Local;
    let egress = match traced {
        Some(dir) if local => dir == "egress",
        _ => egress,
    };
    let (layer, dir) = match hook {
        "output" => (
            "host_firewall_egress",
            "filter OUTPUT, where the node's own traffic is filtered (a host firewall or a host-endpoint policy; NetworkPolicy does not select hostNetwork pods)",
        ),
        "input" => (
            "host_firewall_ingress",
            "filter INPUT, where traffic to the node's own processes is filtered (a host firewall or a host-endpoint policy)",
        ),
        _ if local && traced.is_none() => (
            "network_policy",
            "filter FORWARD, where both the client pod's egress policy and the server pod's ingress policy are evaluated on this node (the hook does not tell which of the two)",
        ),
        _ if egress => (
            "network_policy_egress",
            "filter FORWARD, the NetworkPolicy egress of the client pod",
        ),
        _ => (
            "network_policy_ingress",
            "filter FORWARD, the NetworkPolicy ingress of the server pod",
        ),
    };
    (layer, dir, egress)
}

/// Whose policy a rule is, from how the dataplanes name their chains: Calico's `cali-tw-` (to a
/// workload: its ingress) and `cali-fw-` (from a workload: its egress), projectcalico
/// `felix/rules`; the lab's `OBS-TW-`/`OBS-FW-` follow them; else the rule's comment.
fn policy_direction(rule: &crate::record::DropRule) -> Option<&'static str> {
    let chain = rule.chain.to_ascii_lowercase();
    let comment = rule.comment.as_deref().unwrap_or("").to_ascii_lowercase();
    if chain.starts_with("cali-tw-") || chain.starts_with("obs-tw-") || comment.contains("ingress")
    {
        Some("ingress")
    } else if chain.starts_with("cali-fw-")
        || chain.starts_with("obs-fw-")
        || comment.contains("egress")
    {
        Some("egress")
    } else {
        None
    }
}

/// A rule in kube-proxy's own chains: `KUBE-*` in iptables mode, `table ip kube-proxy` in
/// nftables mode (`cluster-ips-check`, `no-endpoint-services`), kubernetes
/// `pkg/proxy/{iptables,nftables}/proxier.go`.
fn is_kube_proxys(rule: &crate::record::DropRule) -> bool {
    rule.chain.starts_with("KUBE-") || rule.table.ends_with(" kube-proxy")
}

fn client_key(r: &FlowRecord) -> Option<(String, String, u16)> {
    let t = r.client_tuple().or(r.wire_view.as_ref())?;
    Some((r.proto.clone(), t.src.clone(), t.sport))
}

/// Group the records of all nodes by connection: one story per connection, the latest when a
/// client port was reused. The client's side (its node, or the node where an outside client's
/// connection entered and was translated) is keyed by the client endpoint; a receiving node's
/// record joins the story whose client side sent exactly its tuple onto the wire (which also
/// holds when the source was masqueraded on the way), else the client endpoint, which DNAT alone
/// keeps. Each node's newest record counts, final or not: a connection still open (or open when
/// its agent stopped) is told from its interim records.
pub fn stitch(records: &[FlowRecord]) -> Vec<Story> {
    let client_side = |r: &FlowRecord| match r.observed_as {
        ObservedAs::Sender | ObservedAs::Local => true,
        ObservedAs::Transit => r.translated,
        ObservedAs::Receiver => false,
    };
    let mut by_key: BTreeMap<(String, String, u16), Story> = BTreeMap::new();
    let (senders, receivers): (Vec<&FlowRecord>, Vec<&FlowRecord>) =
        records.iter().partition(|r| client_side(r));
    for r in senders {
        let Some(key) = client_key(r) else { continue };
        keep_newest(&mut by_key.entry(key).or_default().sender, r);
    }
    let on_wire: BTreeMap<(String, TupleView), (String, String, u16)> = by_key
        .iter()
        .filter_map(|(k, s)| {
            let r = s.sender.as_ref()?;
            Some(((r.proto.clone(), r.post_dnat.clone()?), k.clone()))
        })
        .collect();
    for r in receivers {
        let sent = r
            .post_dnat
            .clone()
            .and_then(|t| on_wire.get(&(r.proto.clone(), t)).cloned());
        let Some(key) = sent.or_else(|| client_key(r)) else {
            continue;
        };
        keep_newest(&mut by_key.entry(key).or_default().receiver, r);
    }
    by_key.into_values().collect()
}

/// Newest first by its last packet, then a final record over an interim one of the same moment
/// (the final one is written last).
fn keep_newest(slot: &mut Option<FlowRecord>, r: &FlowRecord) {
    if slot
        .as_ref()
        .is_none_or(|old| (&old.end, old.is_final) <= (&r.end, r.is_final))
    {
        *slot = Some(r.clone());
    }
}

impl Story {
    fn any(&self) -> &FlowRecord {
        self.sender
            .as_ref()
            .or(self.receiver.as_ref())
            .expect("non-empty story")
    }

    pub fn end(&self) -> &str {
        &self.any().end
    }

    /// Told from an interim record: the connection was open when its agent last wrote.
    pub fn open(&self) -> bool {
        [&self.sender, &self.receiver]
            .into_iter()
            .flatten()
            .any(|r| !r.is_final)
    }

    /// What the client asked for (pre-DNAT), else the first tuple known.
    pub fn asked(&self) -> Option<&TupleView> {
        let a = self.any();
        a.client_tuple().or(a.wire_view.as_ref())
    }

    /// Where it was going after DNAT: the filter's view, the wire, or the delivery.
    pub fn backend(&self) -> Option<TupleView> {
        self.sender
            .as_ref()
            .and_then(FlowRecord::backend_tuple)
            .or_else(|| self.receiver.as_ref().and_then(FlowRecord::backend_tuple))
            .cloned()
    }

    pub fn matches(&self, service: Option<&Endpoint>, client: Option<&Endpoint>) -> bool {
        let asked = self.asked();
        let hit = |e: Option<&Endpoint>, side: fn(&TupleView) -> (&str, u16)| {
            e.is_none_or(|e| asked.is_some_and(|t| e.matches(side(t))))
        };
        hit(service, |t| (&t.dst, t.dport)) && hit(client, |t| (&t.src, t.sport))
    }

    /// The client or the backend is one of `ips`.
    pub fn involves(&self, ips: &[String]) -> bool {
        self.asked().is_some_and(|a| ips.contains(&a.src))
            || self.backend().is_some_and(|b| ips.contains(&b.dst))
    }

    pub fn verdict(&self, nodes: &[String], names: &Names) -> Verdict {
        let answered = self
            .sender
            .as_ref()
            .or(self.receiver.as_ref())
            .is_some_and(|r| r.totals.reply_packets > 0);
        let last = self
            .receiver
            .as_ref()
            .filter(|r| r.last_seen.point != "socket")
            .or(self.sender.as_ref())
            .expect("non-empty")
            .last_seen
            .clone();
        let v = Judge { last };
        if answered {
            return v.say(
                "answered",
                None,
                "the server answered; every layer let it through".into(),
                None,
            );
        }
        for (rec, egress) in [(&self.sender, true), (&self.receiver, false)] {
            if let Some((r, d)) = rec.as_ref().and_then(|r| Some((r, r.drop.as_ref()?))) {
                return self.dropped(&v, r, d, egress, names);
            }
        }
        self.undropped(&v, nodes, names)
    }

    /// The kernel dropped it: whose drop it was, from the dropped tuple and the drop reason.
    fn dropped(
        &self,
        v: &Judge,
        r: &FlowRecord,
        d: &crate::record::Drop,
        egress: bool,
        names: &Names,
    ) -> Verdict {
        let seen = format!(
            "{}:{} -> {}:{}",
            d.tuple.src, d.tuple.sport, d.tuple.dst, d.tuple.dport
        );
        if !d.reason.starts_with("NETFILTER") {
            return v.say(
                "dropped",
                Some("kernel"),
                format!(
                    "dropped on {} by the kernel: {} at {} ({seen})",
                    d.node, d.reason, d.location
                ),
                None,
            );
        }
        // The rule the kernel's trace named (`--trace-drop-rules`).
        let rule = match &d.rule {
            Some(rule) => format!(
                "; the rule: {rule}{}",
                rule.comment
                    .as_ref()
                    .map(|c| format!(" (\"{c}\")"))
                    .unwrap_or_default()
            ),
            None => String::new(),
        };
        if let Some(svc) = untranslated_service(r, &d.tuple, names) {
            return v.say(
                "dropped",
                Some("service"),
                format!(
                    "rejected on {} by kube-proxy in the filter table ({} at {}): Service {}/{} port {} has no ready endpoints, so {seen} was never translated and no NetworkPolicy saw it{rule}",
                    d.node, d.reason, d.location, svc.namespace, svc.name, svc.port
                ),
                Some(fix::service_fix(&svc)),
            );
        }
        if d.rule.as_ref().is_some_and(is_kube_proxys) {
            return v.say(
                "dropped",
                Some("service"),
                format!(
                    "rejected on {} by kube-proxy's own rules ({} at {}): {seen} is addressed to a Service address on no Service port, or to a Service without endpoints{rule}",
                    d.node, d.reason, d.location
                ),
                None,
            );
        }
        let filter = r.policy_view.as_ref().filter(|p| p.source == "filter_hook");
        let hooks_saw_it_pass = filter.is_some_and(|p| p.verdict.as_deref() == Some("passed"));
        if hooks_saw_it_pass || (r.policy_view.is_none() && r.schema != "observer.flow/v1") {
            return v.say(
                "dropped",
                Some("netfilter"),
                format!(
                    "dropped on {} by netfilter ({} at {}) outside the filter table: the agent's hooks around that table {} it; a raw, mangle or nat rule, or a chain at another priority (kube-proxy's nftables chains run at -110), dropped {seen}{rule}",
                    d.node,
                    d.reason,
                    d.location,
                    if hooks_saw_it_pass { "let it through" } else { "never saw" }
                ),
                None,
            );
        }
        let hook = filter.and_then(|p| p.hook.as_deref()).unwrap_or("forward");
        let (layer, dir, egress) = filter_layer(hook, r, d, egress);
        let measured = match filter {
            Some(p) => format!(
                " (measured: {} packets reached the table, {} came out)",
                p.packets.unwrap_or(0),
                p.passed.unwrap_or(0)
            ),
            None => String::new(),
        };
        let fix = match layer {
            "network_policy" => fix::policy_fix_either(self, &d.tuple, names),
            "network_policy_egress" | "network_policy_ingress" => {
                fix::policy_fix(self, egress, &d.tuple, names)
            }
            _ => Some(fix::host_firewall_fix(hook, &d.tuple, &r.proto)),
        };
        v.say(
            "dropped",
            Some(layer),
            format!(
                "dropped on {} by netfilter ({} at {}) in {dir}{measured}; it evaluated {seen}: the backend and targetPort {}, not the Service{rule}",
                d.node, d.reason, d.location, d.tuple.dport
            ),
            fix,
        )
    }

    /// Not answered and no drop recorded: lost between the nodes, not answered by the server,
    /// or not enough records to tell.
    fn undropped(&self, v: &Judge, nodes: &[String], names: &Names) -> Verdict {
        let backend = self.backend();
        match (&self.sender, &self.receiver) {
            (Some(s), None) if s.wire_view.is_some() => {
                let w = s.wire_view.as_ref().expect("checked");
                let others: Vec<&str> = nodes
                    .iter()
                    .filter(|n| **n != s.node)
                    .map(String::as_str)
                    .collect();
                if others.is_empty() {
                    return v.say(
                        "unknown",
                        None,
                        format!(
                            "left {} on the wire as {}:{} -> {}:{} and was not answered; give the server node's records to see whether it arrived",
                            s.node, w.src, w.sport, w.dst, w.dport
                        ),
                        None,
                    );
                }
                v.say(
                    "lost_between_nodes",
                    Some("firewall_between_nodes"),
                    format!(
                        "left {} on the wire as {}:{} -> {}:{} and never reached {}: something between the nodes (a VPC firewall) dropped it; it filters the wire tuple, so it must allow port {} from {}",
                        s.node,
                        w.src,
                        w.sport,
                        w.dst,
                        w.dport,
                        others.join(", "),
                        w.dport,
                        match names.node(&w.src) {
                            Some(n) => format!(
                                "{n}'s IP {}: the connection was masqueraded on {n}, so the pod range or the client's address would not match",
                                w.src
                            ),
                            None => "the pod range".to_owned(),
                        }
                    ),
                    Some(fix::firewall_fix(w, &s.proto, names)),
                )
            }
            (_, Some(r)) if r.last_seen.point == "pod_egress" => v.say(
                "not_answered",
                Some("application"),
                format!(
                    "delivered to {} but never answered: is anything listening on {}?",
                    backend
                        .as_ref()
                        .map(|b| names.label(&b.dst))
                        .unwrap_or_default(),
                    backend.as_ref().map(|b| b.dport).unwrap_or(0)
                ),
                None,
            ),
            _ => v.say(
                "unknown",
                None,
                format!(
                    "last seen at {} on {}; no drop was recorded",
                    v.last.point, v.last.node
                ),
                None,
            ),
        }
    }
}
