//! Correlation throughput on synthetic input: `cargo xtask bench --only userspace` runs it
//! (`cargo test --release -p observer --bin observer bench_correlation -- --ignored`).
//!
//! Each connection is a Service connection as the sending node sees it: four keys (pod veth in,
//! uplink out after DNAT, uplink in, pod veth out), the egress ones with a conntrack tuple. A
//! poll is what the agent does on its clock: every key's counters observed, conntrack asked
//! for where wanted, records collected.

use std::time::Instant;

use observer_common::{IPPROTO_TCP, MARK_SYN_ONLY, Point, TCP_ACK, TCP_SYN};

use super::{
    Correlator, Flush,
    tests::{MS, correlator, counters, ct_orig, key},
};

fn client(i: u32) -> (String, u16) {
    (
        format!("10.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 0xff, i & 0xff),
        10_000 + (i % 50_000) as u16,
    )
}

fn keys(i: u32) -> [observer_common::FlowKey; 4] {
    let (ip, port) = client(i);
    let tcp = IPPROTO_TCP;
    [
        key(tcp, &ip, port, "100.64.0.10", 443, Point::PodIngress, 3),
        key(tcp, &ip, port, "10.244.2.10", 8443, Point::UplinkEgress, 2),
        key(tcp, "10.244.2.10", 8443, &ip, port, Point::UplinkIngress, 2),
        key(tcp, "100.64.0.10", 443, &ip, port, Point::PodEgress, 3),
    ]
}

/// The synthetic input, made before the clock starts: each connection's keys with the
/// conntrack tuple the kernel would note for the egress ones.
type Input = Vec<[(observer_common::FlowKey, Option<observer_common::CtOrig>); 4]>;

fn input(conns: u32) -> Input {
    (0..conns)
        .map(|i| {
            let (ip, port) = client(i);
            let k = keys(i);
            [
                (k[0], None),
                (k[1], Some(ct_orig(&ip, port, "100.64.0.10", 443))),
                (k[2], None),
                (k[3], Some(ct_orig("10.244.2.10", 8443, &ip, port))),
            ]
        })
        .collect()
}

/// One poll over every connection of `input`; returns the observations it read.
fn poll(c: &mut Correlator, input: &Input, round: u64, now: u64) -> usize {
    let mut n = 0;
    let mut cts = std::collections::HashMap::new();
    for conn in input {
        for (j, (k, ct)) in conn.iter().enumerate() {
            let marks = if j == 0 { MARK_SYN_ONLY } else { 0 };
            let mut ctr = counters(1000 * MS, now, TCP_SYN | TCP_ACK, marks);
            ctr.packets += round;
            c.observe(*k, ctr);
            if round == 0
                && let Some(ct) = ct
            {
                cts.insert(*k, *ct);
            }
            n += 1;
        }
    }
    for k in c.wants_ct() {
        let ct = cts.get(&k).copied();
        c.set_ct(&k, ct);
    }
    let out = c.collect(now, Flush::Due);
    assert!(out.records.is_empty(), "active connections, nothing due");
    n
}

/// This process's resident memory (the correlator and its input of the size just run).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "a benchmark: cargo xtask bench --only userspace"]
fn bench_correlation() {
    println!("  active connections  observations/poll  poll ms  observations/s  process RSS MiB");
    for conns in [1_000u32, 10_000, 100_000] {
        let input = input(conns);
        let mut c = correlator();
        let now = 1_100 * MS;
        poll(&mut c, &input, 0, now);
        let rounds = 3;
        let t0 = Instant::now();
        let mut n = 0;
        for r in 1..=rounds {
            n += poll(&mut c, &input, r, now + r * MS);
        }
        let took = t0.elapsed().as_secs_f64() / rounds as f64;
        let per_poll = n / rounds as usize;
        println!(
            "  {conns:>18}  {per_poll:>17}  {:>7.1}  {:>14.0}  {:>15.0}",
            took * 1e3,
            per_poll as f64 / took,
            rss_kib() as f64 / 1024.0
        );
    }
}
