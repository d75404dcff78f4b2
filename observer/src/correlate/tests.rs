//! Correlation with synthetic kernel observations (no kernel needed).

use std::net::IpAddr;

use observer_common::{
    AF_INET, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MARK_SYN_ONLY, Point, SocketEvent,
    TCP_ACK, TCP_FIN, TCP_SYN,
};

use super::*;
use crate::record::ObservedAs;

pub(super) const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

pub(super) fn key(
    proto: u8,
    src: &str,
    sport: u16,
    dst: &str,
    dport: u16,
    point: Point,
    ifindex: u32,
) -> FlowKey {
    let mut k = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport,
        dport,
        ifindex,
        proto,
        family: AF_INET,
        point: point as u8,
        retired: 0,
    };
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.parse().unwrap(), dst.parse().unwrap()) else {
        panic!("IPv4 only here")
    };
    k.src[..4].copy_from_slice(&s.octets());
    k.dst[..4].copy_from_slice(&d.octets());
    k
}

pub(super) fn counters(first: u64, last: u64, flags: u8, marks: u8) -> Counters {
    Counters {
        packets: 5,
        bytes: 400,
        first_ns: first,
        last_ns: last,
        tcp_flags: flags,
        marks,
        ..Default::default()
    }
}

pub(super) fn correlator() -> Correlator {
    let mut c = Correlator::new(
        Config {
            node: "node-a".into(),
            idle_timeout_ns: 30 * S,
            tcp_idle_timeout_ns: 300 * S,
            flush_ns: 10 * S,
            linger_ns: S,
            socket_ttl_ns: 120 * S,
            pending_max: 3,
            filter_measured: false,
        },
        Clock::new(),
    );
    c.set_ifname(3, "vethaaaa");
    c.set_ifname(2, "eth0");
    c
}

const ALL: u8 = TCP_SYN | TCP_ACK | TCP_FIN;

/// A TCP connection pod-a -> 100.64.0.10:443, DNAT-ed to 10.244.2.10:8443, seen on node-a.
fn translated_tcp(c: &mut Correlator, sport: u16, t0: u64) {
    let tcp = IPPROTO_TCP;
    c.observe(
        key(
            tcp,
            "10.244.1.10",
            sport,
            "100.64.0.10",
            443,
            Point::PodIngress,
            3,
        ),
        counters(t0, t0 + 10 * MS, ALL, MARK_SYN_ONLY),
    );
    c.observe(
        key(
            tcp,
            "10.244.1.10",
            sport,
            "10.244.2.10",
            8443,
            Point::UplinkEgress,
            2,
        ),
        counters(t0 + 1000, t0 + 10 * MS, ALL, MARK_SYN_ONLY),
    );
    c.observe(
        key(
            tcp,
            "10.244.2.10",
            8443,
            "10.244.1.10",
            sport,
            Point::UplinkIngress,
            2,
        ),
        counters(t0 + 2000, t0 + 10 * MS, ALL, 0),
    );
    c.observe(
        key(
            tcp,
            "100.64.0.10",
            443,
            "10.244.1.10",
            sport,
            Point::PodEgress,
            3,
        ),
        counters(t0 + 3000, t0 + 10 * MS, ALL, 0),
    );
}

#[test]
fn dnat_legs_pair_on_the_client_endpoint() {
    let mut c = correlator();
    translated_tcp(&mut c, 40000, S);
    translated_tcp(&mut c, 40001, S + 100);
    let out = c.collect(5 * S, Flush::Due);
    assert_eq!(
        out.records.len(),
        2,
        "both closed connections are final after the linger"
    );
    assert_eq!(out.finished.len(), 8, "all kernel keys are released");
    assert_eq!(out.ambiguous, 0);
    for r in &out.records {
        let pre = r.pre_dnat.as_ref().unwrap();
        let post = r.post_dnat.as_ref().unwrap();
        assert_eq!((pre.dst.as_str(), pre.dport), ("100.64.0.10", 443));
        assert_eq!((post.dst.as_str(), post.dport), ("10.244.2.10", 8443));
        assert_eq!(pre.sport, post.sport);
        assert!(r.translated && r.is_final);
        assert_eq!(r.observed_as, ObservedAs::Sender);
        assert_eq!(r.state, "closed");
        let t = r.translation.as_ref().unwrap();
        assert_eq!(
            (t.after.as_str(), t.before.as_str()),
            ("pod_ingress", "uplink_egress")
        );
        let points: Vec<(&str, &Direction)> =
            r.hops.iter().map(|h| (h.point.as_str(), &h.dir)).collect();
        assert_eq!(
            points,
            [
                ("pod_ingress", &Direction::Orig),
                ("uplink_egress", &Direction::Orig),
                ("uplink_ingress", &Direction::Reply),
                ("pod_egress", &Direction::Reply)
            ]
        );
        assert_eq!(r.hops[0].iface.as_deref(), Some("vethaaaa"));
    }
    assert_eq!(c.active(), 0);
    assert!(
        c.collect(6 * S, Flush::Due).records.is_empty(),
        "nothing is written twice"
    );
}

#[test]
fn a_connection_still_open_gets_interim_records_then_a_final_one() {
    let mut c = correlator();
    let tcp = IPPROTO_TCP;
    let k = key(
        tcp,
        "10.244.1.10",
        40100,
        "10.244.2.10",
        8443,
        Point::PodIngress,
        3,
    );
    c.observe(k, counters(S, 2 * S, TCP_SYN | TCP_ACK, MARK_SYN_ONLY));
    assert!(
        c.collect(5 * S, Flush::Due).records.is_empty(),
        "not due before the flush interval"
    );
    let r = c.collect(11 * S, Flush::Due).records;
    assert_eq!(r.len(), 1);
    assert!(!r[0].is_final);
    assert_eq!(r[0].state, "syn_sent", "no reply seen");
    // Same counters: nothing new to say at the next interval.
    assert!(c.collect(22 * S, Flush::Due).records.is_empty());
    // Idle past the timeout: final.
    let r = c.collect(40 * S, Flush::Due).records;
    assert_eq!(r.len(), 1);
    assert!(r[0].is_final);
    assert!(!r[0].translated);
    assert!(r[0].post_dnat.is_none(), "never left the node");
}

#[test]
fn adopted_observations_carry_the_gap_and_new_ones_do_not() {
    let mut c = correlator();
    let tcp = IPPROTO_TCP;
    let k = |sport| {
        key(
            tcp,
            "10.244.1.10",
            sport,
            "10.244.2.10",
            8443,
            Point::PodIngress,
            3,
        )
    };
    // Adopted from a pinned map, then the gap is marked; a connection after it has none.
    c.observe(
        k(40200),
        counters(S, 2 * S, TCP_SYN | TCP_ACK, MARK_SYN_ONLY),
    );
    c.mark_gap(3 * S, 4 * S, "stopped");
    c.observe(
        k(40201),
        counters(5 * S, 6 * S, TCP_SYN | TCP_ACK, MARK_SYN_ONLY),
    );
    let r = c.collect(60 * S, Flush::Due).records;
    assert_eq!(r.len(), 2);
    let of = |sport: u16| {
        r.iter()
            .find(|r| r.pre_dnat.as_ref().or(r.post_dnat.as_ref()).unwrap().sport == sport)
            .unwrap()
    };
    let gap = of(40200).gap.as_ref().expect("the adopted one has it");
    assert_eq!(gap.previous_agent, "stopped");
    assert!(gap.from < gap.to);
    assert!(of(40201).gap.is_none());
    assert!(c.gapped.is_empty(), "forgotten with the finished keys");
}

#[test]
fn a_checkpoint_writes_open_connections_as_interim_and_keeps_their_keys() {
    let mut c = correlator();
    let tcp = IPPROTO_TCP;
    let open = key(
        tcp,
        "10.244.1.10",
        40200,
        "10.244.2.10",
        8443,
        Point::PodIngress,
        3,
    );
    c.observe(open, counters(S, 2 * S, TCP_SYN | TCP_ACK, MARK_SYN_ONLY));
    translated_tcp(&mut c, 40201, S);
    let out = c.collect(3 * S, Flush::Checkpoint);
    let (finals, interims): (Vec<_>, Vec<_>) = out.records.iter().partition(|r| r.is_final);
    assert_eq!(finals.len(), 1, "the closed connection ends as usual");
    assert_eq!(
        interims.len(),
        1,
        "the open one is written before its interval"
    );
    assert!(
        !out.finished.contains(&open),
        "its kernel entry stays for the next agent"
    );
    assert_eq!(
        out.finished.len(),
        4,
        "the closed one's four observations go"
    );
    // Nothing changed since: a second checkpoint has nothing to say.
    assert!(c.collect(3 * S, Flush::Checkpoint).records.is_empty());
    // Without a pin, shutdown ends it.
    let r = c.collect(3 * S, Flush::All).records;
    assert_eq!(r.len(), 1);
    assert!(r[0].is_final);
}

#[test]
fn a_flow_that_arrives_translated_says_so() {
    let mut c = correlator();
    let udp = IPPROTO_UDP;
    c.observe(
        key(
            udp,
            "10.244.9.9",
            5000,
            "10.244.1.53",
            5353,
            Point::UplinkIngress,
            2,
        ),
        counters(S, S, 0, 0),
    );
    c.observe(
        key(
            udp,
            "10.244.9.9",
            5000,
            "10.244.1.53",
            5353,
            Point::PodEgress,
            3,
        ),
        counters(S + 10, S + 10, 0, 0),
    );
    c.observe(
        key(
            udp,
            "10.244.1.53",
            5353,
            "10.244.9.9",
            5000,
            Point::PodIngress,
            3,
        ),
        counters(S + 50, S + 50, 0, 0),
    );
    let r = c.collect(40 * S, Flush::Due).records;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].observed_as, ObservedAs::Receiver);
    assert!(r[0].pre_dnat.is_none());
    assert_eq!(r[0].post_dnat.as_ref().unwrap().dport, 5353);
    assert!(!r[0].translated);
    assert_eq!(r[0].state, "ended");
    assert_eq!(r[0].totals.reply_packets, 5);
}

#[test]
fn one_udp_socket_to_two_services_is_paired_in_time_order_and_flagged() {
    let mut c = correlator();
    let udp = IPPROTO_UDP;
    let src = "10.244.1.10";
    c.observe(
        key(udp, src, 6000, "100.64.0.53", 53, Point::PodIngress, 3),
        counters(S, S, 0, 0),
    );
    c.observe(
        key(udp, src, 6000, "10.244.2.53", 5353, Point::UplinkEgress, 2),
        counters(S + 5, S + 5, 0, 0),
    );
    c.observe(
        key(udp, src, 6000, "100.64.0.54", 53, Point::PodIngress, 3),
        counters(2 * S, 2 * S, 0, 0),
    );
    c.observe(
        key(udp, src, 6000, "10.244.2.54", 5353, Point::UplinkEgress, 2),
        counters(2 * S + 5, 2 * S + 5, 0, 0),
    );
    let out = c.collect(40 * S, Flush::Due);
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.ambiguous, 2);
    for r in &out.records {
        let pre = r.pre_dnat.as_ref().unwrap();
        let post = r.post_dnat.as_ref().unwrap();
        let want = if pre.dst == "100.64.0.53" {
            "10.244.2.53"
        } else {
            "10.244.2.54"
        };
        assert_eq!(post.dst, want);
    }
}

#[test]
fn icmp_is_one_connection_per_peer_and_never_translated() {
    let mut c = correlator();
    c.observe(
        key(
            IPPROTO_ICMP,
            "10.244.1.10",
            0,
            "10.244.2.10",
            0,
            Point::PodIngress,
            3,
        ),
        counters(S, S, 0, 0),
    );
    c.observe(
        key(
            IPPROTO_ICMP,
            "10.244.1.10",
            0,
            "10.244.2.20",
            0,
            Point::PodIngress,
            3,
        ),
        counters(S, S, 0, 0),
    );
    let out = c.collect(40 * S, Flush::Due);
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.ambiguous, 0);
    assert!(
        out.records
            .iter()
            .all(|r| !r.translated && r.proto == "ICMP")
    );
}

pub(super) fn socket_event(proto: u8, sport: u16, dport: u16) -> SocketEvent {
    SocketEvent {
        cookie: 7,
        cgroup_id: 99,
        ts_ns: S - 1000,
        tgid: 4242,
        sport,
        dport,
        asked_dport: dport,
        proto,
        family: AF_INET,
        _pad: [0; 4],
        comm: [0; 16],
        src: [0; 16],
        dst: [0; 16],
        asked_dst: [0; 16],
    }
}

#[test]
fn socket_events_join_by_the_tuple_the_socket_sent() {
    let mut c = correlator();
    let mut ev = socket_event(IPPROTO_TCP, 40000, 443);
    ev.comm[..4].copy_from_slice(b"curl");
    ev.src[..4].copy_from_slice(&[10, 244, 1, 10]);
    ev.dst[..4].copy_from_slice(&[100, 64, 0, 10]);
    ev.asked_dst = ev.dst;
    c.add_socket(&ev, S);
    // Another node's socket: never matched, expires and is counted.
    let mut foreign = ev;
    foreign.src[..4].copy_from_slice(&[10, 244, 2, 10]);
    c.add_socket(&foreign, S);
    translated_tcp(&mut c, 40000, S);
    let out = c.collect(5 * S, Flush::Due);
    let s = out.records[0].socket.as_ref().expect("joined");
    assert_eq!((s.pid, s.comm.as_str(), s.cgroup_id), (4242, "curl", 99));
    assert_eq!(out.records[0].hops[0].point, "socket");
    assert_eq!(out.sockets_unmatched, 0);
    assert_eq!(c.collect(200 * S, Flush::Due).sockets_unmatched, 1);
}

#[test]
fn record_serialises_to_the_documented_shape() {
    let mut c = correlator();
    translated_tcp(&mut c, 40000, S);
    let r = &c.collect(5 * S, Flush::Due).records[0];
    let v = serde_json::to_value(r).unwrap();
    for field in [
        "schema",
        "time",
        "node",
        "proto",
        "family",
        "observed_as",
        "pre_dnat",
        "post_dnat",
        "translated",
        "translation",
        "socket",
        "hops",
        "totals",
        "state",
        "final",
        "start",
        "end",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert_eq!(v["schema"], "observer.flow/v3");
    assert_eq!(v["hops"][0]["tcp_flags"], "SYN|ACK|FIN");
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn pending_socket_events_are_bounded_and_refusals_counted() {
    let mut c = correlator();
    let mut ev = socket_event(IPPROTO_UDP, 0, 53);
    for port in 1..=5 {
        ev.sport = port;
        c.add_socket(&ev, S);
    }
    assert_eq!(c.refused.sockets, 2, "pending_max is 3 in these tests");
}

/// conntrack's original tuple as the tc program notes it (addresses as stored, ports big-endian).
pub(super) fn ct_orig(src: &str, sport: u16, dst: &str, dport: u16) -> observer_common::CtOrig {
    let k = key(IPPROTO_TCP, src, sport, dst, dport, Point::UplinkEgress, 0);
    observer_common::CtOrig {
        src: k.src,
        dst: k.dst,
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        ctinfo: 2,
        _pad: 0,
        zone: 0,
    }
}

#[test]
fn the_kernels_nat_state_is_the_evidence_of_the_join() {
    let post_key = |sport| {
        key(
            IPPROTO_TCP,
            "10.244.1.10",
            sport,
            "10.244.2.10",
            8443,
            Point::UplinkEgress,
            2,
        )
    };
    let mut c = correlator();
    // Confirmed: the original tuple of the translated connection is the pre-DNAT one.
    translated_tcp(&mut c, 40000, S);
    assert!(
        c.wants_ct().contains(&post_key(40000)),
        "egress keys are asked for"
    );
    c.set_ct(
        &post_key(40000),
        Some(ct_orig("10.244.1.10", 40000, "100.64.0.10", 443)),
    );
    // Another original: the client-endpoint join put two connections together.
    translated_tcp(&mut c, 40001, S + 100);
    c.set_ct(
        &post_key(40001),
        Some(ct_orig("10.244.1.10", 40001, "100.64.0.99", 443)),
    );
    // Nothing noted, three polls in a row: inferred, and no longer asked for.
    translated_tcp(&mut c, 40002, S + 200);
    for _ in 0..3 {
        c.set_ct(&post_key(40002), None);
    }
    assert!(!c.wants_ct().contains(&post_key(40002)));
    let out = c.collect(5 * S, Flush::Due);
    let evidence = |sport: u16| {
        let r = out
            .records
            .iter()
            .find(|r| r.pre_dnat.as_ref().unwrap().sport == sport)
            .unwrap();
        r.translation.as_ref().unwrap().evidence.clone()
    };
    assert_eq!(evidence(40000), "conntrack");
    assert_eq!(evidence(40001), "conntrack_mismatch");
    assert_eq!(evidence(40002), "client_endpoint");
    for r in &out.records {
        let t = r.translation.as_ref().unwrap();
        assert_eq!(t.kind, "dnat");
        assert_eq!(
            t.mechanism.is_some(),
            t.evidence == "conntrack",
            "netfilter is named only on the kernel's word"
        );
    }
}

/// pod-a -> 100.64.0.10:443, DNAT-ed to 10.244.2.10:8443 and masqueraded to the node's
/// 10.200.0.1:61000 on the way out: the client endpoint changed, so only conntrack can join it.
fn masqueraded_tcp(c: &mut Correlator) -> FlowKey {
    let tcp = IPPROTO_TCP;
    let at =
        |src, sport, dst, dport, point, ifindex| key(tcp, src, sport, dst, dport, point, ifindex);
    c.observe(
        at(
            "10.244.1.10",
            40000,
            "100.64.0.10",
            443,
            Point::PodIngress,
            3,
        ),
        counters(S, S + 10 * MS, ALL, MARK_SYN_ONLY),
    );
    c.observe(
        at(
            "100.64.0.10",
            443,
            "10.244.1.10",
            40000,
            Point::PodEgress,
            3,
        ),
        counters(S + 3000, S + 10 * MS, ALL, 0),
    );
    let post = at(
        "10.200.0.1",
        61000,
        "10.244.2.10",
        8443,
        Point::UplinkEgress,
        2,
    );
    c.observe(post, counters(S + 1000, S + 10 * MS, ALL, MARK_SYN_ONLY));
    c.observe(
        at(
            "10.244.2.10",
            8443,
            "10.200.0.1",
            61000,
            Point::UplinkIngress,
            2,
        ),
        counters(S + 2000, S + 10 * MS, ALL, 0),
    );
    post
}

#[test]
fn a_masqueraded_connection_is_joined_by_the_kernels_nat_state() {
    let mut c = correlator();
    let post = masqueraded_tcp(&mut c);
    c.set_ct(
        &post,
        Some(ct_orig("10.244.1.10", 40000, "100.64.0.10", 443)),
    );
    let out = c.collect(5 * S, Flush::Due);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    let r = &out.records[0];
    let (pre, post) = (r.pre_dnat.as_ref().unwrap(), r.post_dnat.as_ref().unwrap());
    assert_eq!(
        (pre.src.as_str(), pre.sport, pre.dport),
        ("10.244.1.10", 40000, 443)
    );
    assert_eq!(
        (post.src.as_str(), post.sport),
        ("10.200.0.1", 61000),
        "SNAT shows in post_dnat"
    );
    assert_eq!((post.dst.as_str(), post.dport), ("10.244.2.10", 8443));
    assert!(r.translated);
    let t = r.translation.as_ref().unwrap();
    assert_eq!(t.evidence, "conntrack");
    assert_eq!(t.kind, "dnat_snat", "destination and source rewritten");
    assert_eq!(
        (t.mechanism.as_deref(), t.ct_zone),
        (Some("netfilter"), Some(0))
    );
    assert_eq!(r.totals.reply_packets, 5);

    // Without the kernel's NAT state the two halves cannot be joined, and are not guessed at.
    let mut c = correlator();
    masqueraded_tcp(&mut c);
    let out = c.collect(5 * S, Flush::Due);
    assert_eq!(out.records.len(), 2);
    assert!(out.records.iter().all(|r| !r.translated));
}

/// [`translated_tcp`] from port 40000 at 1 s, the conntrack tuple of its `post` key read.
fn translated_tcp_with_ct(post: &FlowKey) -> Correlator {
    let mut c = correlator();
    translated_tcp(&mut c, 40000, S);
    c.set_ct(
        post,
        Some(ct_orig("10.244.1.10", 40000, "100.64.0.10", 443)),
    );
    c
}

/// A client reuses its 4-tuple: the kernel set the ended connection's pre- and post-DNAT
/// counters aside under retired keys when the new SYN came, while the reply keys still hold the
/// old connection (the new SYN-ACK has not come back yet).
#[test]
fn a_reused_4_tuple_is_a_new_connection() {
    let tcp = IPPROTO_TCP;
    let pre = key(
        tcp,
        "10.244.1.10",
        40000,
        "100.64.0.10",
        443,
        Point::PodIngress,
        3,
    );
    let post = key(
        tcp,
        "10.244.1.10",
        40000,
        "10.244.2.10",
        8443,
        Point::UplinkEgress,
        2,
    );
    let retired = |k: FlowKey| FlowKey { retired: 1, ..k };
    let mut c = translated_tcp_with_ct(&post);
    assert!(c.collect(S + 500 * MS, Flush::Due).records.is_empty());

    // Two more packets of the old connection, then the new SYN at S + 600 ms.
    let old = Counters {
        packets: 7,
        ..counters(S, S + 20 * MS, ALL, MARK_SYN_ONLY)
    };
    let syn = Counters {
        packets: 1,
        ..counters(S + 600 * MS, S + 600 * MS, TCP_SYN, MARK_SYN_ONLY)
    };
    let (_, d) = c.observe(retired(pre), old).unwrap();
    assert_eq!(
        d.packets, 2,
        "what was read of the live key is not counted again"
    );
    c.observe(retired(post), old).unwrap();
    let (_, d) = c.observe(pre, syn).unwrap();
    assert_eq!(d.packets, 1);
    c.observe(post, syn).unwrap();
    assert!(
        c.wants_ct().contains(&post) && c.wants_ct().contains(&retired(post)),
        "conntrack entries are read again: the kernel moved the old one with the counters"
    );
    for k in [post, retired(post)] {
        c.set_ct(&k, Some(ct_orig("10.244.1.10", 40000, "100.64.0.10", 443)));
    }

    let out = c.collect(3 * S, Flush::Due);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    let r = &out.records[0];
    assert!(r.is_final);
    assert_eq!(r.state, "closed");
    assert_eq!((r.totals.packets, r.totals.reply_packets), (7, 5));
    assert_eq!(r.translation.as_ref().unwrap().evidence, "conntrack");
    assert!(out.finished.contains(&retired(pre)) && out.finished.contains(&retired(post)));
    assert!(
        !out.finished.contains(&pre) && !out.finished.contains(&post),
        "the live keys now hold the new connection"
    );

    let out = c.collect(4 * S, Flush::All);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    let r = &out.records[0];
    assert_eq!((r.totals.packets, r.totals.reply_packets), (1, 0));
    assert_eq!(r.state, "syn_sent");
    assert!(r.translated);
}

/// A reused 4-tuple read half-way: the walk of the flow map read the post-DNAT keys after the
/// kernel restarted them for the new connection (the old one under retired keys) and the
/// pre-DNAT keys before. The new connection's post leg must not take the old one's pre leg:
/// the old connection is recorded once, both legs joined, and the new one stays open.
#[test]
fn a_new_connections_post_leg_does_not_take_the_ended_pre_leg_of_the_old_one() {
    let tcp = IPPROTO_TCP;
    let (pod, backend) = ("10.244.1.10", "10.244.2.10");
    let post = key(tcp, pod, 40000, backend, 8443, Point::UplinkEgress, 2);
    let post_reply = key(tcp, backend, 8443, pod, 40000, Point::UplinkIngress, 2);
    let retired = |k: FlowKey| FlowKey { retired: 1, ..k };
    let mut c = translated_tcp_with_ct(&post);
    assert!(c.collect(S + 500 * MS, Flush::Due).records.is_empty());

    let old = |first| counters(first, S + 10 * MS, ALL, MARK_SYN_ONLY);
    c.observe(retired(post), old(S + 1000)).unwrap();
    c.observe(retired(post_reply), old(S + 2000)).unwrap();
    let new = S + 1_500 * MS;
    let syn = Counters {
        packets: 1,
        ..counters(new, new, TCP_SYN, MARK_SYN_ONLY)
    };
    c.observe(post, syn).unwrap();
    c.observe(
        post_reply,
        Counters {
            first_ns: new + 50_000,
            ..syn
        },
    )
    .unwrap();
    // Only the new connection's conntrack tuple read yet: the old post leg pairs by client.
    c.set_ct(&post, Some(ct_orig(pod, 40000, "100.64.0.10", 443)));

    let out = c.collect(S + 1_600 * MS, Flush::Due);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    let r = &out.records[0];
    assert!(r.is_final && r.translated, "{r:#?}");
    assert_eq!((r.totals.packets, r.totals.reply_packets), (5, 5));
}

/// The port is reused after the agent read the old connection's keys as ended and before it
/// deleted them: the kernel set the old counters aside under retired keys, which the next read
/// finds. The connection is not recorded a second time; the race is counted and the retired
/// keys are deleted.
#[test]
fn a_port_reused_between_the_read_and_the_delete_is_not_recorded_twice() {
    let tcp = IPPROTO_TCP;
    let at =
        |dst, dport, point, ifindex| key(tcp, "10.244.1.10", 40000, dst, dport, point, ifindex);
    let pre = at("100.64.0.10", 443, Point::PodIngress, 3);
    let post = at("10.244.2.10", 8443, Point::UplinkEgress, 2);
    let retired = |k: FlowKey| FlowKey { retired: 1, ..k };
    let mut c = translated_tcp_with_ct(&post);
    let out = c.collect(3 * S, Flush::Due);
    assert_eq!(out.records.len(), 1);
    let first = out.records[0].clone();
    assert!(out.finished.contains(&pre) && out.finished.contains(&post));

    // Read at the next poll: what the kernel set aside before the delete, the same connection.
    for (k, first) in [(pre, S), (post, S + 1000)] {
        let old = counters(first, S + 20 * MS, ALL, MARK_SYN_ONLY);
        assert!(c.observe(retired(k), old).is_none());
    }
    let out = c.collect(3 * S + 500 * MS, Flush::Due);
    assert!(
        out.records.is_empty(),
        "recorded twice: {:#?} after {first:#?}",
        out.records
    );
    assert_eq!(
        out.reuse_races,
        ReuseRaces {
            restored: 0,
            start_lost: 2
        },
        "the removal of this test put nothing back"
    );
    assert!(out.finished.contains(&retired(pre)) && out.finished.contains(&retired(post)));

    // The next connection's later packets: the kernel made the live key again without its SYN.
    let rest = counters(3 * S + 600 * MS, 3 * S + 700 * MS, TCP_ACK, 0);
    c.observe(pre, rest);
    let out = c.collect(4 * S, Flush::All);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    assert_eq!(
        out.records[0].incomplete,
        Some(vec!["reuse_race".to_owned()]),
        "its start went with the delete, and it says so"
    );

    // A retired key of another connection (another first packet) is still its own record.
    let mut c = correlator();
    translated_tcp(&mut c, 40000, S);
    c.collect(3 * S, Flush::Due);
    let other = counters(2 * S, 2 * S + 20 * MS, ALL, MARK_SYN_ONLY);
    assert!(c.observe(retired(pre), other).is_some());
}

/// A NodePort reached from outside: the client's tuple entered from the wire, the translated
/// one (masqueraded to the node) left on it. Joined by conntrack; this node is only a transit.
#[test]
fn a_nodeport_from_outside_is_joined_where_it_entered_from_the_wire() {
    let tcp = IPPROTO_TCP;
    let mut c = correlator();
    let at = |src, sport, dst, dport, point| key(tcp, src, sport, dst, dport, point, 2);
    c.observe(
        at(
            "192.0.2.10",
            50000,
            "10.200.0.1",
            30443,
            Point::UplinkIngress,
        ),
        counters(S, S + 10 * MS, ALL, MARK_SYN_ONLY),
    );
    let post = at(
        "10.200.0.1",
        61000,
        "10.244.2.10",
        8443,
        Point::UplinkEgress,
    );
    c.observe(post, counters(S + 1000, S + 10 * MS, ALL, MARK_SYN_ONLY));
    c.observe(
        at(
            "10.244.2.10",
            8443,
            "10.200.0.1",
            61000,
            Point::UplinkIngress,
        ),
        counters(S + 2000, S + 10 * MS, ALL, 0),
    );
    c.observe(
        at(
            "10.200.0.1",
            30443,
            "192.0.2.10",
            50000,
            Point::UplinkEgress,
        ),
        counters(S + 3000, S + 10 * MS, ALL, 0),
    );
    c.set_ct(
        &post,
        Some(ct_orig("192.0.2.10", 50000, "10.200.0.1", 30443)),
    );
    let out = c.collect(5 * S, Flush::Due);
    assert_eq!(out.records.len(), 1, "{:#?}", out.records);
    let r = &out.records[0];
    assert_eq!(r.observed_as, ObservedAs::Transit);
    let t = r.translation.as_ref().unwrap();
    assert_eq!(
        (t.kind.as_str(), t.after.as_str()),
        ("dnat_snat", "uplink_ingress")
    );
    assert_eq!(r.wire_view.as_ref().unwrap().src, "10.200.0.1");
    assert_eq!(r.pre_dnat.as_ref().unwrap().src, "192.0.2.10");
}

/// A process of the node itself: no hook saw its tuple before NAT, conntrack names it.
#[test]
fn a_host_process_is_named_by_its_conntrack_original() {
    let mut c = correlator();
    let post = key(
        IPPROTO_TCP,
        "10.200.0.1",
        45000,
        "10.244.2.10",
        8443,
        Point::UplinkEgress,
        2,
    );
    c.observe(post, counters(S, S + 10 * MS, ALL, MARK_SYN_ONLY));
    c.observe(
        key(
            IPPROTO_TCP,
            "10.244.2.10",
            8443,
            "10.200.0.1",
            45000,
            Point::UplinkIngress,
            2,
        ),
        counters(S + 1000, S + 10 * MS, ALL, 0),
    );
    let out = c.collect(5 * S, Flush::Due);
    assert!(
        !out.records[0].translated,
        "without NAT state nothing is claimed"
    );
    let mut c = correlator();
    c.observe(post, counters(S, S + 10 * MS, ALL, MARK_SYN_ONLY));
    c.set_ct(
        &post,
        Some(ct_orig("10.200.0.1", 45000, "100.64.0.10", 443)),
    );
    let out = c.collect(5 * S, Flush::All);
    let r = &out.records[0];
    assert_eq!(r.observed_as, ObservedAs::Sender);
    assert_eq!(r.pre_dnat.as_ref().unwrap().dst, "100.64.0.10");
    let t = r.translation.as_ref().unwrap();
    assert_eq!(
        (t.after.as_str(), t.evidence.as_str()),
        ("socket", "conntrack")
    );
}
