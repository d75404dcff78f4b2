//! One connection across nodes: the client node's record and the server node's record.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Names, fix};
use crate::record::{FlowRecord, ObservedAs, TupleView};

#[derive(Debug, Clone)]
pub struct Story {
    /// Record of the node where the client pod lives (has `pre_dnat`).
    pub sender: Option<FlowRecord>,
    /// Record of the node where the server pod lives (arrived already translated).
    pub receiver: Option<FlowRecord>,
}

/// Where the connection stopped and why, in the terms of the layer that stopped it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub outcome: String,
    pub last_seen: crate::record::LastSeen,
    /// The layer that stopped it: `network_policy_egress`, `network_policy_ingress`,
    /// `firewall_between_nodes`, `kernel` (another drop reason), `application`.
    pub layer: Option<String>,
    pub explanation: String,
    pub fix: Option<fix::Fix>,
}

fn client_key(r: &FlowRecord) -> Option<(String, String, u16)> {
    let t = r.client_tuple().or(r.wire_view.as_ref())?;
    Some((r.proto.clone(), t.src.clone(), t.sport))
}

/// Group final records of all nodes by connection (protocol and client endpoint, which DNAT
/// keeps): one story per connection, the latest when a client port was reused.
pub fn stitch(records: &[FlowRecord]) -> Vec<Story> {
    let mut by_key: BTreeMap<(String, String, u16), Story> = BTreeMap::new();
    for r in records.iter().filter(|r| r.is_final) {
        let Some(key) = client_key(r) else { continue };
        let s = by_key.entry(key).or_insert(Story {
            sender: None,
            receiver: None,
        });
        let slot = match r.observed_as {
            ObservedAs::Sender | ObservedAs::Local => &mut s.sender,
            ObservedAs::Receiver | ObservedAs::Transit => &mut s.receiver,
        };
        if slot.as_ref().is_none_or(|old| old.end <= r.end) {
            *slot = Some(r.clone());
        }
    }
    by_key.into_values().collect()
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

    pub fn matches(&self, service: Option<&str>, client: Option<&str>) -> bool {
        let asked = self.asked();
        let svc_ok = service.is_none_or(|s| {
            asked.is_some_and(|t| {
                let (ip, port) = s.rsplit_once(':').unwrap_or((s, ""));
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                t.dst == ip && (port.is_empty() || t.dport.to_string() == port)
            })
        });
        let client_ok = client.is_none_or(|c| {
            asked.is_some_and(|t| {
                let (ip, port) = c
                    .rsplit_once(':')
                    .filter(|_| !c.contains("::"))
                    .unwrap_or((c, ""));
                t.src == ip && (port.is_empty() || t.sport.to_string() == port)
            })
        });
        svc_ok && client_ok
    }

    /// The client or the backend is one of `ips`.
    pub fn involves(&self, ips: &[String]) -> bool {
        self.asked().is_some_and(|a| ips.contains(&a.src))
            || self.backend().is_some_and(|b| ips.contains(&b.dst))
    }

    pub fn verdict(&self, nodes: &[String], names: &Names) -> Verdict {
        let backend = self.backend();
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
        let v = |outcome: &str, layer: Option<&str>, explanation: String, fix: Option<fix::Fix>| {
            Verdict {
                outcome: outcome.into(),
                last_seen: last.clone(),
                layer: layer.map(str::to_owned),
                explanation,
                fix,
            }
        };
        if answered {
            return v(
                "answered",
                None,
                "the server answered; every layer let it through".into(),
                None,
            );
        }
        for (rec, egress) in [(&self.sender, true), (&self.receiver, false)] {
            let Some(r) = rec else { continue };
            if let Some(d) = &r.drop {
                let seen = format!(
                    "{}:{} -> {}:{}",
                    d.tuple.src, d.tuple.sport, d.tuple.dst, d.tuple.dport
                );
                if d.reason.starts_with("NETFILTER") {
                    let (layer, dir) = if egress {
                        ("network_policy_egress", "egress of the client pod")
                    } else {
                        ("network_policy_ingress", "ingress of the server pod")
                    };
                    return v(
                        "dropped",
                        Some(layer),
                        format!(
                            "dropped on {} by netfilter ({} at {}), the filter table's NetworkPolicy {dir}; it evaluated {seen}: the backend pod and targetPort {}, not the Service",
                            d.node, d.reason, d.location, d.tuple.dport
                        ),
                        fix::policy_fix(self, egress, &d.tuple, names),
                    );
                }
                return v(
                    "dropped",
                    Some("kernel"),
                    format!(
                        "dropped on {} by the kernel: {} at {} ({seen})",
                        d.node, d.reason, d.location
                    ),
                    None,
                );
            }
        }
        let sender_node = self.sender.as_ref().map(|s| s.node.clone());
        match (&self.sender, &self.receiver) {
            (Some(s), None) if s.wire_view.is_some() => {
                let others: Vec<&String> = nodes
                    .iter()
                    .filter(|n| Some(*n) != sender_node.as_ref())
                    .collect();
                let w = s.wire_view.as_ref().expect("checked");
                if others.is_empty() {
                    return v(
                        "unknown",
                        None,
                        format!(
                            "left {} on the wire as {}:{} -> {}:{} and was not answered; give the server node's records to see whether it arrived",
                            s.node, w.src, w.sport, w.dst, w.dport
                        ),
                        None,
                    );
                }
                v(
                    "lost_between_nodes",
                    Some("firewall_between_nodes"),
                    format!(
                        "left {} on the wire as {}:{} -> {}:{} and never reached {}: something between the nodes (a VPC firewall) dropped it; it filters the wire tuple, so it must allow port {} from the pod range",
                        s.node,
                        w.src,
                        w.sport,
                        w.dst,
                        w.dport,
                        others
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        w.dport
                    ),
                    Some(fix::firewall_fix(w, &s.proto, names)),
                )
            }
            (_, Some(r)) if r.last_seen.point == "pod_egress" => v(
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
            _ => v(
                "unknown",
                None,
                format!(
                    "last seen at {} on {}; no drop was recorded",
                    last.point, last.node
                ),
                None,
            ),
        }
    }
}
