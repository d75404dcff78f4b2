//! Prometheus metrics: one table, `observer_` prefix, bounded labels (points, protocols,
//! Service VIP:port and target port: never pod IPs or client ports).

use std::collections::BTreeMap;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use observer_common::{Point, Stat};

use crate::record::FlowRecord;

pub struct Metrics {
    pub registry: Registry,
    pub flows: IntCounterVec,
    pub translations: IntCounterVec,
    pub translation_evidence: IntCounterVec,
    pub nat: IntCounterVec,
    pub service_connections: IntCounterVec,
    pub packets: IntCounterVec,
    pub bytes: IntCounterVec,
    pub observations_active: IntGauge,
    pub kernel_events_lost: IntCounterVec,
    pub map_full: IntCounterVec,
    pub parse_errors: IntCounterVec,
    pub packets_untracked: IntCounterVec,
    pub packets_portless: IntCounterVec,
    pub socket_events: IntCounter,
    pub socket_events_unmatched: IntCounter,
    pub drop_rule_traces: IntCounterVec,
    pub correlation_ambiguous: IntCounter,
    pub reuse_races: IntCounterVec,
    pub packets_after_final: IntCounter,
    pub records: IntCounterVec,
    pub record_write_errors: IntCounter,
    pub records_lost: IntCounterVec,
    pub map_delete_errors: IntCounter,
    pub flows_adopted: IntCounter,
    pub interfaces_attached: IntGaugeVec,
    pub drops: IntCounterVec,
    pub pending_refused: IntCounterVec,
    pub tuple_reuses: IntCounterVec,
    pub flows_requests: IntCounterVec,
    pub flows_followers: IntGauge,
    pub flows_followers_dropped: IntCounter,
    pub otlp_exported: IntCounter,
    pub otlp_export_failures: IntCounter,
}

/// The counters of things lost: kernel events, map inserts, socket and drop events refused,
/// records not written, connections merged into one record (`tuple_reuses{outcome="merged"}`;
/// its `split` series is not a loss and is left out).
const LOSSES: &[&str] = &[
    KERNEL_EVENTS_LOST.0,
    MAP_FULL.0,
    PENDING_REFUSED.0,
    RECORDS_LOST.0,
    RECORD_WRITE_ERRORS.0,
    MAP_DELETE_ERRORS.0,
    TUPLE_REUSES.0,
    REUSE_RACES.0,
    PACKETS_AFTER_FINAL.0,
];

/// Says once per `every` what was lost since the last time, if anything: a loss shows in the
/// log as well as in `/metrics`, without a line per lost event.
pub async fn warn_losses(metrics: std::sync::Arc<Metrics>, every: std::time::Duration) {
    let mut seen = metrics.losses();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = metrics.losses();
        let grew: Vec<String> = now
            .iter()
            .filter_map(|(series, &v)| {
                let d = v.saturating_sub(seen.get(series).copied().unwrap_or(0));
                (d > 0).then(|| format!("{series} +{d}"))
            })
            .collect();
        if !grew.is_empty() {
            log::warn!(
                "lost in the last {}: {} (counted in /metrics)",
                humantime::format_duration(every),
                grew.join(", ")
            );
        }
        seen = now;
    }
}

/// One metric: name, help text, label names (none for a plain counter or gauge).
struct Def(&'static str, &'static str, &'static [&'static str]);

// The table: every metric the agent exports.
const FLOWS: Def = Def(
    "observer_flows_total",
    "Connections that ended (final records), by protocol, role of this node and whether the destination was translated.",
    &["proto", "observed_as", "translated"],
);
const SERVICE_CONNECTIONS: Def = Def(
    "observer_service_connections_total",
    "Connections that asked for a named Service, counted on the client's node when they end, by Service and outcome (answered: a reply came back; dropped: the kernel dropped them on this node; unanswered: neither).",
    &["proto", "namespace", "service", "port", "outcome"],
);
const TRANSLATIONS: Def = Def(
    "observer_translations_total",
    "Connections translated on this node, by Service VIP:port and the backend (target) port they were sent to.",
    &["proto", "service", "target_port"],
);
const TRANSLATION_EVIDENCE: Def = Def(
    "observer_translation_evidence_total",
    "Translated connections that ended, by what joined their pre- and post-DNAT tuples: conntrack (the kernel's NAT state), socket (the connect()/sendmsg() call against the socket's packets: a socket load balancer), conntrack_mismatch, or client_endpoint (no NAT state read: inferred).",
    &["evidence"],
);
const NAT: Def = Def(
    "observer_nat_translations_total",
    "Translated connections that ended, by what was rewritten (dnat, snat, dnat_snat) and who did it on the kernel's word (netfilter, socket), or inferred when no NAT state was read.",
    &["kind", "mechanism"],
);
const PACKETS: Def = Def(
    "observer_packets_total",
    "Packets seen by the kernel programs, by observation point and protocol.",
    &["point", "proto"],
);
const BYTES: Def = Def(
    "observer_bytes_total",
    "Bytes (L2 frame length) seen by the kernel programs, by observation point and protocol.",
    &["point", "proto"],
);
const OBSERVATIONS_ACTIVE: Def = Def(
    "observer_flow_observations_active",
    "Flow directions per observation point currently tracked in the kernel map.",
    &[],
);
const KERNEL_EVENTS_LOST: Def = Def(
    "observer_kernel_events_lost_total",
    "Ring-buffer events the kernel could not deliver (buffer full), by ring.",
    &["ring"],
);
const MAP_FULL: Def = Def(
    "observer_map_full_total",
    "Kernel map inserts that failed because the map was full, by map.",
    &["map"],
);
const PARSE_ERRORS: Def = Def(
    "observer_parse_errors_total",
    "Packets the kernel programs could not parse, by kind (truncated, malformed, ext_headers, kernel_read).",
    &["kind"],
);
const PACKETS_UNTRACKED: Def = Def(
    "observer_packets_untracked_total",
    "Packets not tracked as flows, by reason.",
    &["reason"],
);
const PACKETS_PORTLESS: Def = Def(
    "observer_packets_portless_total",
    "Packets tracked without ports (ICMP, IP fragments, other L4 protocols), by kind.",
    &["kind"],
);
const SOCKET_EVENTS: Def = Def(
    "observer_socket_events_total",
    "First-packet events from the cgroup socket hooks (all namespaces on the machine).",
    &[],
);
const SOCKET_EVENTS_UNMATCHED: Def = Def(
    "observer_socket_events_unmatched_total",
    "Socket events that matched no flow of this node before expiring (other nodes' pods, host sockets).",
    &[],
);
const DROP_RULE_TRACES: Def = Def(
    "observer_drop_rule_traces_total",
    "Netfilter drops handed to the rule tracer (--trace-drop-rules), by outcome: requested (traced unless the same target was traced in the last minute), busy (the tracer's queue was full: not traced), named (the rule was found).",
    &["outcome"],
);
const REUSE_RACES: Def = Def(
    "observer_reuse_races_total",
    "Connections whose client port was reused between the agent's read of their ended keys and its removal of them (recorded once), by what became of the next connection's first packets: restored (the removal found them in the key and put them back), start_lost (gone with the removal; that connection's record says incomplete: reuse_race).",
    &["outcome"],
);
const PACKETS_AFTER_FINAL: Def = Def(
    "observer_packets_after_final_total",
    "Packets the kernel counted to a connection's key after the read its final record was built from and before the key was removed (late retransmissions): missing from that record.",
    &[],
);
const CORRELATION_AMBIGUOUS: Def = Def(
    "observer_correlation_ambiguous_total",
    "Connections whose pre-DNAT/post-DNAT pairing had more than one candidate.",
    &[],
);
const RECORDS: Def = Def(
    "observer_records_total",
    "Flow records written, by kind (final, interim).",
    &["kind"],
);
const RECORD_WRITE_ERRORS: Def = Def(
    "observer_record_write_errors_total",
    "Batches of flow records that could not be written to the flow log.",
    &[],
);
const RECORDS_LOST: Def = Def(
    "observer_records_lost_total",
    "Flow records built but not exported, by reason (exporter_gone: the exporter stage had stopped; writer_gone: the flow-log writer had stopped; write_failed: the flow log could not be written, e.g. disk full).",
    &["reason"],
);
const MAP_DELETE_ERRORS: Def = Def(
    "observer_map_delete_errors_total",
    "Finished flows that could not be removed from the kernel map.",
    &[],
);
const TUPLE_REUSES: Def = Def(
    "observer_tuple_reuses_total",
    "New TCP connections on the 4-tuple of an ended one whose counters the kernel still held, by outcome (split: the old connection's counters were set aside and it got its own record; merged: an earlier set-aside connection was still unread and the two were counted as one).",
    &["outcome"],
);
const FLOWS_ADOPTED: Def = Def(
    "observer_flows_adopted_total",
    "Flow map entries a previous agent left pinned, adopted at start with their counters.",
    &[],
);
const INTERFACES_ATTACHED: Def = Def(
    "observer_interfaces_attached",
    "Interfaces with observer tc programs attached, by role.",
    &["role"],
);
const DROPS: Def = Def(
    "observer_drops_total",
    "Packets the kernel dropped in this node's network namespace, by drop reason (tp_btf/kfree_skb).",
    &["reason"],
);
const PENDING_REFUSED: Def = Def(
    "observer_pending_events_refused_total",
    "Socket or drop events not kept because the agent already held its maximum of unmatched ones, by kind.",
    &["kind"],
);
const FLOWS_REQUESTS: Def = Def(
    "observer_flows_requests_total",
    "Requests to /flows (--flows-addr), by outcome: served; unauthorized (no valid bearer token); forbidden (RBAC, --flows-auth kubernetes); unavailable (the API server could not check the token).",
    &["outcome"],
);
const FLOWS_FOLLOWERS: Def = Def(
    "observer_flows_followers",
    "Clients following /flows now (`/flows?follow=1`, `observer observe -f`).",
    &[],
);
const FLOWS_FOLLOWERS_DROPPED: Def = Def(
    "observer_flows_followers_dropped_total",
    "Clients following /flows that were disconnected because they fell behind (more records waiting for them than the per-client queue holds).",
    &[],
);
const OTLP_EXPORTED: Def = Def(
    "observer_otlp_records_exported_total",
    "Flow records the OTLP receiver (--otlp-endpoint) took.",
    &[],
);
const OTLP_EXPORT_FAILURES: Def = Def(
    "observer_otlp_export_failures_total",
    "OTLP Export calls that failed (receiver down, slow or refusing); the batch is tried again.",
    &[],
);

/// Registers metrics of the table in one registry.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(&self, m: M) -> M {
        self.0.register(Box::new(m.clone())).expect("unique metric");
        m
    }
    fn counter_vec(&self, d: Def) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(d.0, d.1), d.2).expect("valid metric"))
    }
    fn counter(&self, d: Def) -> IntCounter {
        self.add(IntCounter::new(d.0, d.1).expect("valid metric"))
    }
    fn gauge(&self, d: Def) -> IntGauge {
        self.add(IntGauge::new(d.0, d.1).expect("valid metric"))
    }
    fn gauge_vec(&self, d: Def) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(d.0, d.1), d.2).expect("valid metric"))
    }
}

impl Metrics {
    /// Every metric of the table, with a constant `node` label, at zero where the label set is
    /// bounded and known, so dashboards and alerts on "events lost" have a series from the start.
    pub fn new(node: &str) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some([("node".to_owned(), node.to_owned())].into_iter().collect()),
        )
        .expect("valid registry");
        let r = Reg(&registry);
        let m = Metrics {
            flows: r.counter_vec(FLOWS),
            service_connections: r.counter_vec(SERVICE_CONNECTIONS),
            translations: r.counter_vec(TRANSLATIONS),
            translation_evidence: r.counter_vec(TRANSLATION_EVIDENCE),
            nat: r.counter_vec(NAT),
            packets: r.counter_vec(PACKETS),
            bytes: r.counter_vec(BYTES),
            observations_active: r.gauge(OBSERVATIONS_ACTIVE),
            kernel_events_lost: r.counter_vec(KERNEL_EVENTS_LOST),
            map_full: r.counter_vec(MAP_FULL),
            parse_errors: r.counter_vec(PARSE_ERRORS),
            packets_untracked: r.counter_vec(PACKETS_UNTRACKED),
            packets_portless: r.counter_vec(PACKETS_PORTLESS),
            socket_events: r.counter(SOCKET_EVENTS),
            socket_events_unmatched: r.counter(SOCKET_EVENTS_UNMATCHED),
            drop_rule_traces: r.counter_vec(DROP_RULE_TRACES),
            correlation_ambiguous: r.counter(CORRELATION_AMBIGUOUS),
            reuse_races: r.counter_vec(REUSE_RACES),
            packets_after_final: r.counter(PACKETS_AFTER_FINAL),
            records: r.counter_vec(RECORDS),
            record_write_errors: r.counter(RECORD_WRITE_ERRORS),
            records_lost: r.counter_vec(RECORDS_LOST),
            map_delete_errors: r.counter(MAP_DELETE_ERRORS),
            flows_adopted: r.counter(FLOWS_ADOPTED),
            interfaces_attached: r.gauge_vec(INTERFACES_ATTACHED),
            drops: r.counter_vec(DROPS),
            pending_refused: r.counter_vec(PENDING_REFUSED),
            tuple_reuses: r.counter_vec(TUPLE_REUSES),
            flows_requests: r.counter_vec(FLOWS_REQUESTS),
            flows_followers: r.gauge(FLOWS_FOLLOWERS),
            flows_followers_dropped: r.counter(FLOWS_FOLLOWERS_DROPPED),
            otlp_exported: r.counter(OTLP_EXPORTED),
            otlp_export_failures: r.counter(OTLP_EXPORT_FAILURES),
            registry,
        };
        m.prime();
        m
    }

    fn prime(&self) {
        for s in Stat::ALL {
            self.kernel_stat(s);
        }
        for p in Point::ALL {
            for proto in ["TCP", "UDP"] {
                self.packets.with_label_values(&[p.as_str(), proto]);
                self.bytes.with_label_values(&[p.as_str(), proto]);
            }
        }
        for kind in ["final", "interim"] {
            self.records.with_label_values(&[kind]);
        }
        for kind in ["socket", "drop"] {
            self.pending_refused.with_label_values(&[kind]);
        }
        for outcome in ["served", "unauthorized", "forbidden", "unavailable"] {
            self.flows_requests.with_label_values(&[outcome]);
        }
        for outcome in ["restored", "start_lost"] {
            self.reuse_races.with_label_values(&[outcome]);
        }
        for reason in [
            "exporter_gone",
            "writer_gone",
            "write_failed",
            "otlp_queue_full",
            "otlp_rejected",
        ] {
            self.records_lost.with_label_values(&[reason]);
        }
        for e in [
            "conntrack",
            "conntrack_mismatch",
            "client_endpoint",
            "socket",
        ] {
            self.translation_evidence.with_label_values(&[e]);
        }
    }

    /// The counter a kernel STATS slot adds to.
    pub fn kernel_stat(&self, s: Stat) -> IntCounter {
        match s {
            Stat::SocketEventsLost => self.kernel_events_lost.with_label_values(&["socket"]),
            Stat::DropEventsLost => self.kernel_events_lost.with_label_values(&["drop"]),
            Stat::FlowMapFull => self.map_full.with_label_values(&["flows"]),
            Stat::SockMapFull => self.map_full.with_label_values(&["socks"]),
            Stat::CtOrigFull => self.map_full.with_label_values(&["ct_orig"]),
            Stat::Truncated => self.parse_errors.with_label_values(&["truncated"]),
            Stat::Malformed => self.parse_errors.with_label_values(&["malformed"]),
            Stat::KernelRead => self.parse_errors.with_label_values(&["kernel_read"]),
            Stat::ExtHeaders => self.parse_errors.with_label_values(&["ext_headers"]),
            Stat::NonIp => self.packets_untracked.with_label_values(&["non_ip"]),
            Stat::Fragment => self.packets_portless.with_label_values(&["fragment"]),
            Stat::Icmp => self.packets_portless.with_label_values(&["icmp"]),
            Stat::OtherL4 => self.packets_portless.with_label_values(&["other_l4"]),
            Stat::TupleReused => self.tuple_reuses.with_label_values(&["split"]),
            Stat::TupleReuseMerged => self.tuple_reuses.with_label_values(&["merged"]),
        }
    }

    pub fn on_flows_request(&self, outcome: &str) {
        self.flows_requests.with_label_values(&[outcome]).inc();
    }

    pub fn on_record(&self, rec: &FlowRecord) {
        let kind = if rec.is_final { "final" } else { "interim" };
        self.records.with_label_values(&[kind]).inc();
        if !rec.is_final {
            return;
        }
        let observed = rec.observed_as.as_str();
        self.flows
            .with_label_values(&[
                rec.proto.as_str(),
                observed,
                if rec.translated { "true" } else { "false" },
            ])
            .inc();
        if let Some(svc) = &rec.service {
            // Named Services only: bounded by the cluster's Services, never by pods.
            let outcome = if rec.totals.reply_packets > 0 {
                "answered"
            } else if rec.drop.is_some() {
                "dropped"
            } else {
                "unanswered"
            };
            self.service_connections
                .with_label_values(&[
                    rec.proto.as_str(),
                    svc.namespace.as_str(),
                    svc.name.as_str(),
                    svc.port.to_string().as_str(),
                    outcome,
                ])
                .inc();
        }
        if let Some(t) = &rec.translation {
            self.translation_evidence
                .with_label_values(&[t.evidence.as_str()])
                .inc();
            let mechanism = t.mechanism.as_deref().unwrap_or("inferred");
            self.nat
                .with_label_values(&[t.kind.as_str(), mechanism])
                .inc();
        }
        if let (true, Some(pre), Some(post)) = (rec.translated, &rec.pre_dnat, &rec.post_dnat) {
            let service = if pre.dst.contains(':') {
                format!("[{}]:{}", pre.dst, pre.dport)
            } else {
                format!("{}:{}", pre.dst, pre.dport)
            };
            self.translations
                .with_label_values(&[
                    rec.proto.as_str(),
                    service.as_str(),
                    post.dport.to_string().as_str(),
                ])
                .inc();
        }
    }

    /// Every loss counter's series (`name{label="value"}`) with its value. A loss is whatever
    /// the agent saw happen and could not keep or record in full.
    pub fn losses(&self) -> BTreeMap<String, u64> {
        self.registry
            .gather()
            .iter()
            .filter(|f| LOSSES.contains(&f.name()))
            .flat_map(|f| {
                f.get_metric().iter().map(move |m| {
                    let labels: Vec<String> = m
                        .get_label()
                        .iter()
                        .filter(|l| l.name() != "node")
                        .map(|l| format!("{}=\"{}\"", l.name(), l.value()))
                        .collect();
                    let series = if labels.is_empty() {
                        f.name().to_owned()
                    } else {
                        format!("{}{{{}}}", f.name(), labels.join(","))
                    };
                    (series, m.get_counter().get_value() as u64)
                })
            })
            // A split connection and a restored race lost nothing.
            .filter(|(series, _)| {
                !series.contains("outcome=\"split\"") && !series.contains("outcome=\"restored\"")
            })
            .collect()
    }

    pub fn encode(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_every_loss_series_and_nothing_else() {
        let m = Metrics::new("n1");
        m.kernel_stat(Stat::SocketEventsLost).inc_by(3);
        m.reuse_races.with_label_values(&["restored"]).inc_by(5);
        m.reuse_races.with_label_values(&["start_lost"]).inc();
        m.kernel_stat(Stat::TupleReused).inc();
        m.kernel_stat(Stat::TupleReuseMerged).inc_by(2);
        m.records_lost.with_label_values(&["write_failed"]).inc();
        m.kernel_stat(Stat::Truncated).inc();
        let l = m.losses();
        assert_eq!(l["observer_kernel_events_lost_total{ring=\"socket\"}"], 3);
        assert_eq!(l["observer_reuse_races_total{outcome=\"start_lost\"}"], 1);
        assert_eq!(l["observer_packets_after_final_total"], 0, "primed at zero");
        assert_eq!(l["observer_tuple_reuses_total{outcome=\"merged\"}"], 2);
        assert_eq!(l["observer_records_lost_total{reason=\"write_failed\"}"], 1);
        assert_eq!(
            l["observer_map_full_total{map=\"flows\"}"], 0,
            "primed at zero"
        );
        assert!(
            !l.keys().any(|k| k.contains("split")
                || k.contains("restored")
                || k.contains("parse_errors")),
            "a split connection, a restored race or a malformed packet is not a lost one: {l:?}"
        );
    }
}
