//! Filters and lines on records the lab's agents wrote (testdata/explain).

use std::time::SystemTime;

use clap::Parser as _;

use super::{filter::Filter, render};
use crate::{
    cli::{Cli, Command},
    record::FlowRecord,
};

fn records(case: &str) -> Vec<(FlowRecord, String)> {
    ["node-a", "node-b"]
        .iter()
        .flat_map(|n| {
            let p = format!(
                "{}/testdata/explain/{case}/{n}.jsonl",
                env!("CARGO_MANIFEST_DIR")
            );
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|l| (serde_json::from_str(&l).unwrap(), l))
        .collect()
}

fn filter(args: &[&str]) -> Filter {
    let argv = ["observer", "observe", "x.jsonl"]
        .into_iter()
        .chain(args.iter().copied());
    let Command::Observe(a) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!()
    };
    Filter::from_args(&a.filters, SystemTime::now()).unwrap()
}

/// The nodes of the records `args` select from `case`.
fn selected(case: &str, args: &[&str]) -> Vec<String> {
    let f = filter(args);
    records(case)
        .into_iter()
        .filter(|(r, _)| f.matches(r))
        .map(|(r, _)| format!("{} {}", r.node, r.proto))
        .collect()
}

#[test]
fn filters_select_by_the_records_own_fields() {
    assert_eq!(
        selected("answered", &["--service", "payments/web"]),
        ["node-a TCP"]
    );
    assert_eq!(
        selected("answered", &["--service", "100.64.0.10:443"]),
        ["node-a TCP"]
    );
    assert!(selected("answered", &["--service", "100.64.0.10:80"]).is_empty());
    assert_eq!(
        selected("answered", &["--pod", "payments/pod-b"]),
        ["node-a TCP", "node-b TCP"],
        "either end, on both nodes"
    );
    assert_eq!(
        selected("answered", &["--pod", "pod-b", "--observed-as", "!sender"]),
        ["node-b TCP"]
    );
    assert_eq!(
        selected("answered", &["--protocol", "tcp", "--translated", "false"]),
        ["node-b TCP"]
    );
    assert_eq!(
        selected("answered", &["--port", "8443", "--node", "node-a,node-b"]).len(),
        2
    );
    assert_eq!(
        selected(
            "answered",
            &["--ip", "10.244.2.0/24", "--namespace", "!payments"]
        )
        .len(),
        0
    );
    assert!(selected("answered", &["--verdict", "dropped"]).is_empty());
    assert_eq!(
        selected(
            "answered",
            &[
                "--since",
                "2026-11-30T22:22:50Z",
                "--until",
                "2026-11-30T22:22:50.698Z",
                "--protocol",
                "TCP"
            ]
        ),
        ["node-a TCP"]
    );
    assert!(selected("answered", &["--until", "2026-11-30T00:00:00Z"]).is_empty());
}

#[test]
fn a_line_says_client_service_backend_verdict_and_where_it_stopped() {
    let all = records("answered");
    let (sender, raw) = all
        .iter()
        .find(|(r, _)| r.node == "node-a" && r.proto == "TCP")
        .unwrap();
    let line = render::line(sender, raw, render::Output::Compact, false);
    assert!(
        line.contains("node-a TCP shop/pod-a 10.244.1.10:")
            && line.contains(" -> payments/web 100.64.0.10:443 -> payments/pod-b 10.244.2.10:8443 FORWARDED closed (last seen uplink_egress)"),
        "{line}"
    );
    assert_eq!(render::line(sender, raw, render::Output::Json, false), *raw);
    let wide = render::line(sender, raw, render::Output::Wide, true);
    assert!(
        wide.contains("\x1b[32mFORWARDED\x1b[0m") && wide.contains("| as sender | dnat on node-a"),
        "{wide}"
    );

    let masq = records("nodeport");
    let (r, raw) = masq
        .iter()
        .find(|(r, _)| r.node == "node-a" && r.proto == "TCP")
        .unwrap();
    let line = render::line(r, raw, render::Output::Compact, false);
    assert!(
        line.contains("(source as 10.200.0.1:"),
        "the masquerade shows: {line}"
    );
    let dropped = records("service-layer");
    let (r, raw) = dropped.iter().find(|(r, _)| r.drop.is_some()).unwrap();
    let line = render::line(r, raw, render::Output::Compact, false);
    assert!(
        line.contains("DROPPED") && line.contains("NETFILTER_DROP at node-a"),
        "{line}"
    );
}
