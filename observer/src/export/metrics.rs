//! Prometheus metrics: one table, `observer_` prefix, bounded labels (points, protocols,
//! Service VIP:port and target port: never pod IPs or client ports).

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::record::{FlowRecord, ObservedAs};

pub struct Metrics {
    pub registry: Registry,
    pub flows: IntCounterVec,
    pub translations: IntCounterVec,
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
    pub correlation_ambiguous: IntCounter,
    pub records: IntCounterVec,
    pub record_write_errors: IntCounter,
    pub map_delete_errors: IntCounter,
    pub flows_adopted: IntCounter,
    pub interfaces_attached: IntGaugeVec,
    pub drops: IntCounterVec,
    pub pending_refused: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new(node: &str) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some([("node".to_owned(), node.to_owned())].into_iter().collect()),
        )
        .expect("valid registry");
        let r = &registry;
        let observations_active = IntGauge::new(
            "observer_flow_observations_active",
            "Flow directions per observation point currently tracked in the kernel map.",
        )
        .expect("valid metric");
        r.register(Box::new(observations_active.clone()))
            .expect("unique metric");
        let interfaces_attached = IntGaugeVec::new(
            Opts::new(
                "observer_interfaces_attached",
                "Interfaces with observer tc programs attached, by role.",
            ),
            &["role"],
        )
        .expect("valid metric");
        r.register(Box::new(interfaces_attached.clone()))
            .expect("unique metric");
        Metrics {
            flows: counter_vec(
                r,
                "observer_flows_total",
                "Connections that ended (final records), by protocol, role of this node and whether the destination was translated.",
                &["proto", "observed_as", "translated"],
            ),
            service_connections: counter_vec(
                r,
                "observer_service_connections_total",
                "Connections that asked for a named Service, counted on the client's node when they end, by Service and outcome (answered: a reply came back; dropped: the kernel dropped them on this node; unanswered: neither).",
                &["proto", "namespace", "service", "port", "outcome"],
            ),
            translations: counter_vec(
                r,
                "observer_translations_total",
                "Connections translated on this node, by Service VIP:port and the backend (target) port they were sent to.",
                &["proto", "service", "target_port"],
            ),
            packets: counter_vec(
                r,
                "observer_packets_total",
                "Packets seen by the kernel programs, by observation point and protocol.",
                &["point", "proto"],
            ),
            bytes: counter_vec(
                r,
                "observer_bytes_total",
                "Bytes (L2 frame length) seen by the kernel programs, by observation point and protocol.",
                &["point", "proto"],
            ),
            observations_active,
            kernel_events_lost: counter_vec(
                r,
                "observer_kernel_events_lost_total",
                "Ring-buffer events the kernel could not deliver (buffer full), by ring.",
                &["ring"],
            ),
            map_full: counter_vec(
                r,
                "observer_map_full_total",
                "Kernel map inserts that failed because the map was full, by map.",
                &["map"],
            ),
            parse_errors: counter_vec(
                r,
                "observer_parse_errors_total",
                "Packets the kernel programs could not parse, by kind (truncated, malformed).",
                &["kind"],
            ),
            packets_untracked: counter_vec(
                r,
                "observer_packets_untracked_total",
                "Packets not tracked as flows, by reason.",
                &["reason"],
            ),
            packets_portless: counter_vec(
                r,
                "observer_packets_portless_total",
                "Packets tracked without ports (ICMP, IP fragments, other L4 protocols), by kind.",
                &["kind"],
            ),
            socket_events: counter(
                r,
                "observer_socket_events_total",
                "First-packet events from the cgroup socket hooks (all namespaces on the machine).",
            ),
            socket_events_unmatched: counter(
                r,
                "observer_socket_events_unmatched_total",
                "Socket events that matched no flow of this node before expiring (other nodes' pods, host sockets).",
            ),
            correlation_ambiguous: counter(
                r,
                "observer_correlation_ambiguous_total",
                "Connections whose pre-DNAT/post-DNAT pairing had more than one candidate.",
            ),
            records: counter_vec(
                r,
                "observer_records_total",
                "Flow records written, by kind (final, interim).",
                &["kind"],
            ),
            record_write_errors: counter(
                r,
                "observer_record_write_errors_total",
                "Batches of flow records that could not be written to the flow log.",
            ),
            map_delete_errors: counter(
                r,
                "observer_map_delete_errors_total",
                "Finished flows that could not be removed from the kernel map.",
            ),
            flows_adopted: counter(
                r,
                "observer_flows_adopted_total",
                "Flow map entries a previous agent left pinned, adopted at start with their counters.",
            ),
            drops: counter_vec(
                r,
                "observer_drops_total",
                "Packets the kernel dropped in this node's network namespace, by drop reason (tp_btf/kfree_skb).",
                &["reason"],
            ),
            pending_refused: counter_vec(
                r,
                "observer_pending_events_refused_total",
                "Socket or drop events not kept because the agent already held its maximum of unmatched ones, by kind.",
                &["kind"],
            ),
            interfaces_attached,
            registry,
        }
    }

    pub fn on_record(&self, rec: &FlowRecord) {
        let kind = if rec.is_final { "final" } else { "interim" };
        self.records.with_label_values(&[kind]).inc();
        if !rec.is_final {
            return;
        }
        let observed = match rec.observed_as {
            ObservedAs::Sender => "sender",
            ObservedAs::Receiver => "receiver",
            ObservedAs::Local => "local",
            ObservedAs::Transit => "transit",
        };
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

    pub fn encode(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding does not fail");
        buf
    }
}
