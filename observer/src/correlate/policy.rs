//! `policy_view`: the tuple the filter table (where NetworkPolicy and host firewalls live)
//! evaluated on this node, and how we know it.
//!
//! Measured where the netfilter programs around the filter table are linked: what they saw
//! before the table, and how much of it came out after. Otherwise read from a packet netfilter
//! dropped, or derived from the tc points around the stack, and the record says which.

use std::net::IpAddr;

use super::{Conn, Correlator, conn::Observation};
use crate::record::{Direction, Drop, Hop, PolicyView, TupleView};

impl Correlator {
    pub(super) fn policy_view(
        &self,
        c: &Conn<'_>,
        drop: &Option<Drop>,
        hops: &[Hop],
    ) -> Option<PolicyView> {
        if self.cfg.filter_measured
            && let Some(v) = self.measured_policy(c)
        {
            return Some(v);
        }
        if let Some(d) = drop
            && d.reason.starts_with("NETFILTER")
        {
            return Some(self.policy(d.tuple.clone(), "drop"));
        }
        if self.cfg.filter_measured {
            // The table never saw the client's packets here: something before it stopped them,
            // or they did not pass this node's IP stack.
            return None;
        }
        derived(hops, |ip| self.local_pods.contains(ip)).map(|t| self.policy(t, "derived"))
    }

    fn policy(&self, tuple: TupleView, source: &str) -> PolicyView {
        PolicyView {
            node: self.cfg.node.clone(),
            tuple,
            source: source.to_owned(),
            hook: None,
            packets: None,
            passed: None,
            verdict: None,
        }
    }

    /// The first hook where the client's packets met the filter table, with what came out.
    fn measured_policy(&self, c: &Conn<'_>) -> Option<PolicyView> {
        let before = c
            .filter_orig()
            .filter(|o| o.point.filter_passed().is_some())
            .min_by_key(|o| (o.c.first_ns, o.point))?;
        let at = |point| {
            c.filter_orig()
                .filter(|o| Some(o.point) == point && o.tuple == before.tuple)
                .map(|o: &&Observation| o.c.packets)
                .sum::<u64>()
        };
        let packets = at(Some(before.point));
        let passed = at(before.point.filter_passed());
        Some(PolicyView {
            hook: before.point.filter_hook().map(str::to_owned),
            packets: Some(packets),
            passed: Some(passed),
            verdict: Some(
                match passed {
                    0 => "dropped",
                    p if p >= packets => "passed",
                    _ => "partly_dropped",
                }
                .to_owned(),
            ),
            ..self.policy(before.tuple.view(), "filter_hook")
        })
    }
}

/// Without the filter hooks: the entering source with the leaving destination (DNAT happens
/// before the filter table at FORWARD and OUTPUT, SNAT after it). A connection that never left
/// is only given a view when it was addressed to a local pod, i.e. not to a Service address that
/// DNAT may have rewritten before the table: a pre-DNAT tuple is never presented as the filter's.
fn derived(hops: &[Hop], is_local_pod: impl Fn(&IpAddr) -> bool) -> Option<TupleView> {
    let orig = |points: [&str; 2]| {
        hops.iter()
            .find(|h| h.dir == Direction::Orig && points.contains(&h.point.as_str()))
            .map(|h| &h.tuple)
    };
    let entered = orig(["pod_ingress", "uplink_ingress"])?;
    match orig(["uplink_egress", "pod_egress"]) {
        Some(left) => Some(TupleView {
            src: entered.src.clone(),
            sport: entered.sport,
            dst: left.dst.clone(),
            dport: left.dport,
        }),
        None => entered
            .dst
            .parse()
            .ok()
            .filter(|ip| is_local_pod(ip))
            .map(|_| entered.clone()),
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{IPPROTO_TCP, MARK_SYN_ONLY, Point, TCP_ACK, TCP_FIN, TCP_SYN};

    use super::super::{
        Correlator, Flush,
        tests::{MS, correlator, counters, ct_orig, key},
    };
    use crate::record::FlowRecord;

    const S: u64 = 1_000 * MS;
    const ALL: u8 = TCP_SYN | TCP_ACK | TCP_FIN;

    /// Observe `(src, sport, dst, dport, point)` with the conntrack original `ct`, if any.
    fn seen(
        c: &mut Correlator,
        (src, sport, dst, dport): (&str, u16, &str, u16),
        point: Point,
        ct: Option<(&str, u16, &str, u16)>,
        t0: u64,
        packets: u64,
    ) {
        let k = key(IPPROTO_TCP, src, sport, dst, dport, point, 2);
        let marks = if point == Point::UplinkIngress || point == Point::PodIngress {
            MARK_SYN_ONLY
        } else {
            0
        };
        let mut n = counters(t0, t0 + 10 * MS, ALL, marks);
        n.packets = packets;
        c.observe(k, n);
        if let Some((s, sp, d, dp)) = ct {
            c.set_ct(&k, Some(ct_orig(s, sp, d, dp)));
        }
    }

    /// The one record, final once idle.
    fn only_record(c: &mut Correlator) -> FlowRecord {
        let out = c.collect(60 * S, Flush::Due);
        assert_eq!(out.records.len(), 1, "{:#?}", out.records);
        out.records.into_iter().next().unwrap()
    }

    /// A NodePort reached from outside, DNAT-ed and masqueraded on this node: the filter table
    /// saw a third tuple (the client's address to the backend) that only conntrack ties to the
    /// connection.
    #[test]
    fn the_filter_tuple_of_a_nodeport_joins_by_conntrack() {
        let mut c = correlator();
        c.set_filter_measured(true);
        let client = ("192.0.2.10", 5000, "10.200.0.1", 30443);
        let filtered = ("192.0.2.10", 5000, "10.244.2.10", 8443);
        seen(&mut c, client, Point::UplinkIngress, None, S, 5);
        let out = ("10.200.0.1", 6000, "10.244.2.10", 8443);
        seen(&mut c, out, Point::UplinkEgress, Some(client), S + 2000, 5);
        seen(
            &mut c,
            filtered,
            Point::FilterForward,
            Some(client),
            S + 1000,
            5,
        );
        seen(
            &mut c,
            filtered,
            Point::FilterForwardPassed,
            Some(client),
            S + 1500,
            5,
        );
        let r = only_record(&mut c);
        let pv = r.policy_view.expect("measured");
        assert_eq!(pv.source, "filter_hook");
        assert_eq!(pv.hook.as_deref(), Some("forward"));
        assert_eq!(
            (pv.tuple.src.as_str(), pv.tuple.dport),
            ("192.0.2.10", 8443)
        );
        assert_eq!((pv.packets, pv.passed), (Some(5), Some(5)));
        assert_eq!(pv.verdict.as_deref(), Some("passed"));
        let f: Vec<_> = r
            .hops
            .iter()
            .filter(|h| h.point.starts_with("filter"))
            .collect();
        assert_eq!(f.len(), 1, "the passed count folds into its hop: {f:#?}");
        assert_eq!(f[0].passed, Some(5));
        assert_eq!(r.last_seen.point, "uplink_egress");
    }

    /// A node process whose source port POSTROUTING's masquerade rewrote after the filter table:
    /// only conntrack ties the table's tuple to the connection, and the kernel notes it for the
    /// key before the table; the key after it is the same packet and takes its twin's.
    #[test]
    fn what_passed_the_table_joins_by_its_twins_conntrack_entry() {
        let mut c = correlator();
        c.set_filter_measured(true);
        let asked = ("10.200.0.1", 58082, "100.64.0.10", 443);
        let filtered = ("10.200.0.1", 58082, "10.244.2.10", 8443);
        let wire = ("10.200.0.1", 51899, "10.244.2.10", 8443);
        seen(&mut c, wire, Point::UplinkEgress, Some(asked), S + 2000, 6);
        seen(&mut c, filtered, Point::FilterOutput, Some(asked), S, 6);
        seen(
            &mut c,
            filtered,
            Point::FilterOutputPassed,
            None,
            S + 500,
            6,
        );
        let r = only_record(&mut c);
        let pv = r.policy_view.expect("measured");
        assert_eq!((pv.packets, pv.passed), (Some(6), Some(6)), "{:#?}", r.hops);
        assert_eq!(pv.tuple.sport, 58082, "before the masquerade");
        assert_eq!(r.pre_dnat.expect("conntrack's original").dport, 443);
    }

    /// In, and not out: the table dropped it; the record stops at the filter.
    #[test]
    fn seen_before_the_table_and_not_after_is_a_filter_drop() {
        let mut c = correlator();
        c.set_filter_measured(true);
        let sent = ("10.244.1.10", 40000, "100.64.0.10", 443);
        seen(&mut c, sent, Point::PodIngress, None, S, 3);
        let after_dnat = ("10.244.1.10", 40000, "10.244.2.10", 8443);
        seen(
            &mut c,
            after_dnat,
            Point::FilterForward,
            Some(sent),
            S + 1000,
            3,
        );
        let r = only_record(&mut c);
        let pv = r.policy_view.expect("measured");
        assert_eq!(pv.verdict.as_deref(), Some("dropped"));
        assert_eq!(
            (pv.tuple.dst.as_str(), pv.tuple.dport),
            ("10.244.2.10", 8443)
        );
        assert_eq!(r.last_seen.point, "filter_forward");
    }

    /// A process of the node whose packets the filter table dropped at OUTPUT: no tc point saw
    /// them, the filter hooks did, and conntrack says what it asked for.
    #[test]
    fn a_connection_only_the_filter_table_saw_is_recorded() {
        let mut c = correlator();
        c.set_filter_measured(true);
        let asked = ("10.200.0.1", 40000, "100.64.0.10", 443);
        let t = ("10.200.0.1", 40000, "10.244.2.10", 8443);
        seen(&mut c, t, Point::FilterOutput, Some(asked), S, 2);
        let r = only_record(&mut c);
        assert_eq!(r.observed_as, crate::record::ObservedAs::Sender);
        let pre = r.pre_dnat.expect("conntrack's original");
        assert_eq!((pre.dst.as_str(), pre.dport), ("100.64.0.10", 443));
        let pv = r.policy_view.expect("measured");
        assert_eq!(pv.hook.as_deref(), Some("output"));
        assert_eq!(pv.verdict.as_deref(), Some("dropped"));
        assert_eq!(r.hops.len(), 1, "{:#?}", r.hops);
        assert_eq!(r.totals.packets, 2);
        assert_eq!(r.last_seen.point, "filter_output");
        assert_eq!(c.active(), 0, "its keys are finished once");
    }

    /// Without the hooks: a connection that never left gets no view unless it was addressed to
    /// a local pod; never the pre-DNAT Service tuple.
    #[test]
    fn a_derived_view_is_never_a_pre_dnat_tuple() {
        let mut c = correlator();
        seen(
            &mut c,
            ("10.244.1.10", 40000, "100.64.0.10", 443),
            Point::PodIngress,
            None,
            S,
            3,
        );
        assert!(only_record(&mut c).policy_view.is_none());

        let mut c = correlator();
        c.set_local_pods(["10.244.1.20".parse().unwrap()]);
        seen(
            &mut c,
            ("10.244.1.10", 40001, "10.244.1.20", 8080),
            Point::PodIngress,
            None,
            S,
            3,
        );
        let pv = only_record(&mut c)
            .policy_view
            .expect("a local pod's own address");
        assert_eq!((pv.source.as_str(), pv.tuple.dport), ("derived", 8080));
        assert!(pv.verdict.is_none());
    }
}
