//! The filter table's own view (`policy_view`): measured by the agent's netfilter programs around
//! the filter table, or, without them, derived and labelled so. Real kernel, real traffic,
//! checked against iptables' own rule counters.

use integration_test::*;
use observer_lab::drive::LabRun;

/// A route on node-a that swallows everything for pod-b: a connection through the Service is
/// DNAT-ed to pod-b in PREROUTING and then stopped by routing, before the filter table.
fn blackhole_pod_b(lab: &LabRun) {
    let out = lab
        .exec(
            "node-a",
            &["ip", "route", "add", "blackhole", "10.244.2.10/32"],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// An OUTPUT rule of node-a's own that drops what its processes send to pod-b's targetPort.
const OUTPUT_DROP: &[&str] = &[
    "OUTPUT",
    "-p",
    "tcp",
    "-d",
    "10.244.2.10",
    "--dport",
    "8443",
    "-j",
    "DROP",
];

/// The final record of pod-a's connection to the Service that never left node-a.
fn stopped_on_a(lab: &LabRun) -> serde_json::Value {
    assert!(!curl_web(lab, "pod-a", 2).status.success());
    let (r, _) = one_final(lab, "node-a", |r| {
        r["pre_dnat"]["src"] == "10.244.1.10"
            && r["pre_dnat"]["dport"] == 443
            && r["post_dnat"].is_null()
    });
    r
}

/// iptables' own packet counter of the one rule in node-a's FORWARD chain: an oracle for how
/// many packets the filter table evaluated there.
fn forward_rule_packets(lab: &LabRun) -> u64 {
    let out = lab
        .exec("node-a", &["iptables", "-L", "FORWARD", "-v", "-x", "-n"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("dpt:8443"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no counting rule in:\n{text}"))
}

/// With the filter hooks (the default): every connection's view is measured where the filter
/// table evaluated it, with what it let through; a connection stopped before the table has no
/// view at all, rather than the Service tuple it was addressed to.
#[test]
fn the_filter_view_is_measured_and_counts_what_the_table_saw() {
    let lab = lab_with_agents("fview", "2s");
    let ready = lab.http("node-a", "/readyz").unwrap();
    assert!(ready.contains("filter view: measured"), "{ready}");

    // A rule that only counts (no verdict): iptables' count of what filter FORWARD evaluated.
    let ipt = |args: &[&str]| {
        let out = lab
            .exec("node-a", &[&["iptables"][..], args].concat())
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    ipt(&[
        "-I",
        "FORWARD",
        "-p",
        "tcp",
        "-d",
        "10.244.2.10",
        "--dport",
        "8443",
    ]);
    assert_eq!(
        curl_answer(&lab, "pod-a", "http://100.64.0.10:443/"),
        "pod-b"
    );
    let (r, recs) = one_final(&lab, "node-a", |r| {
        r["pre_dnat"]["dport"] == 443 && r["translated"] == true
    });
    let pv = &r["policy_view"];
    assert_eq!(pv["source"], "filter_hook", "{r:#}");
    assert_eq!(pv["hook"], "forward");
    assert_eq!(pv["tuple"], r["post_dnat"], "after DNAT");
    assert_eq!(pv["verdict"], "passed");
    assert_eq!(
        pv["packets"].as_u64().unwrap(),
        forward_rule_packets(&lab),
        "the hook saw exactly what iptables counted in filter FORWARD"
    );
    assert_eq!(pv["packets"], r["totals"]["packets"]);
    validate_schema(&recs);

    // Same node, pod to pod (no Service): FORWARD too, between two veths of node-a.
    assert_eq!(
        curl_answer(&lab, "pod-a", "http://10.244.1.20:8080/"),
        "pod-api-1"
    );
    let (local, _) = one_final(&lab, "node-a", |r| r["post_dnat"]["dport"] == 8080);
    assert_eq!(local["observed_as"], "local");
    assert_eq!(local["policy_view"]["hook"], "forward");
    assert_eq!(local["policy_view"]["tuple"], local["post_dnat"]);
    let f = hop(&local, "filter_forward", "orig").expect("filter hop");
    assert_eq!(
        f["iface"],
        hop(&local, "pod_ingress", "orig").unwrap()["iface"]
    );

    // node-a's own process, stopped by an OUTPUT rule: no tc point sees it, the filter hooks
    // and the drop tracer do, and conntrack says it asked for the Service.
    ipt(&[&["-A"][..], OUTPUT_DROP].concat());
    let out = lab
        .exec(
            "node-a",
            &["curl", "-sS", "-m", "2", "http://100.64.0.10:443/"],
        )
        .unwrap();
    assert!(!out.status.success());
    let (host, _) = one_final(&lab, "node-a", |r| r["pre_dnat"]["src"] == "10.200.0.1");
    assert_eq!(host["observed_as"], "sender");
    assert_eq!(host["pre_dnat"]["dport"], 443, "{host:#}");
    assert_eq!(host["policy_view"]["hook"], "output");
    assert_eq!(host["policy_view"]["verdict"], "dropped");
    assert_eq!(host["policy_view"]["tuple"]["dport"], 8443);
    assert_eq!(host["drop"]["reason"], "NETFILTER_DROP");
    assert_eq!(host["drop"]["tuple"], host["policy_view"]["tuple"]);
    assert_eq!(host["last_seen"]["point"], "filter_output");
    ipt(&[&["-D"][..], OUTPUT_DROP].concat());

    blackhole_pod_b(&lab);
    let r = stopped_on_a(&lab);
    assert!(
        r["policy_view"].is_null(),
        "the filter table never saw it: no view, least of all the Service's: {r:#}"
    );
    assert_eq!(r["last_seen"]["point"], "pod_ingress");
    assert!(hop(&r, "filter_forward", "orig").is_none());
}

/// Without the filter hooks (`--no-filter-hook`, or a kernel before 6.4): the view is derived and
/// says so, and a connection stopped before the filter table gets none (before schema v3 it was
/// given the pre-DNAT Service tuple, which no filter evaluated).
#[test]
fn without_filter_hooks_the_view_is_derived_and_says_so() {
    let lab = lab_with_agent_args("fderiv", "2s", None, &["--no-filter-hook"]);
    let ready = lab.http("node-a", "/readyz").unwrap();
    assert!(ready.contains("filter view: derived"), "{ready}");

    assert_eq!(
        curl_answer(&lab, "pod-a", "http://100.64.0.10:443/"),
        "pod-b"
    );
    let (r, recs) = one_final(&lab, "node-a", |r| r["translated"] == true);
    assert_eq!(r["policy_view"]["source"], "derived", "{r:#}");
    assert_eq!(r["policy_view"]["tuple"], r["post_dnat"]);
    assert!(r["policy_view"].get("verdict").is_none());
    assert!(
        !r["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["point"].as_str().unwrap().starts_with("filter_")),
        "no filter hops without the hooks"
    );
    validate_schema(&recs);

    blackhole_pod_b(&lab);
    let r = stopped_on_a(&lab);
    assert!(r["policy_view"].is_null(), "{r:#}");
}

/// `--trace-drop-rules`: the kernel's nftables trace names the rule behind a netfilter drop, for
/// iptables-nft rules (the lab's Calico-shaped policy chains, with their comments) and for
/// native nftables rules; the agent's trace table is gone afterwards.
#[test]
fn the_rule_that_dropped_is_named_from_the_kernels_trace() {
    let lab = lab_with_agent_args("frule", "2s", None, &["--trace-drop-rules"]);
    apply(&lab, &scenario("api-ingress-deny"));
    // curl retransmits its SYN after 1 s: the trace catches that one.
    let out = lab
        .exec(
            "pod-a",
            &["curl", "-sS", "-m", "4", "http://10.244.1.20:8080/"],
        )
        .unwrap();
    assert!(!out.status.success());
    let (r, recs) = one_final(&lab, "node-a", |r| {
        r["post_dnat"].is_null() && r["pre_dnat"]["dport"] == 8080
    });
    let rule = &r["drop"]["rule"];
    assert_eq!(rule["table"], "ip filter", "{r:#}");
    assert_eq!(rule["chain"], "OBS-TW-pod-api-1");
    assert_eq!(
        rule["comment"],
        "default deny: ingress policies select payments/pod-api-1"
    );
    assert!(
        rule["rule"]
            .as_str()
            .unwrap()
            .starts_with("-A OBS-TW-pod-api-1 ")
    );
    validate_schema(&recs);
    // With the rule, explain tells whose policy it was, though both pods share the node.
    let files = [lab.dir.join("node-a.jsonl"), lab.dir.join("node-b.jsonl")];
    let v: serde_json::Value = serde_json::from_str(&observer(&[
        "explain",
        files[0].to_str().unwrap(),
        files[1].to_str().unwrap(),
        "--client",
        "10.244.1.10",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(v[0]["layer"], "network_policy_ingress", "{v:#}");

    // A native nftables rule with a comment, in a table of its own.
    apply(&lab, &scenario("none"));
    for cmd in [
        "add table inet lab_deny",
        "add chain inet lab_deny forward { type filter hook forward priority 0; }",
        "add rule inet lab_deny forward ip daddr 10.244.2.10 tcp dport 8443 drop comment \"lab: deny web\"",
    ] {
        let out = lab.exec("node-a", &["nft", cmd]).unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert!(!curl_web(&lab, "pod-a", 4).status.success());
    let (r, _) = one_final(&lab, "node-a", |r| {
        r["pre_dnat"]["dport"] == 443 && !r["drop"].is_null()
    });
    assert_eq!(r["drop"]["rule"]["table"], "inet lab_deny", "{r:#}");
    assert_eq!(r["drop"]["rule"]["comment"], "lab: deny web");
    let tables = lab.exec("node-a", &["nft", "list", "tables"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("observer_drop_trace"),
        "the trace table is removed"
    );
    let m = lab.metrics("node-a").unwrap();
    assert!(
        metric(
            &m,
            "observer_drop_rule_traces_total",
            &[("outcome", "named")]
        )
        .unwrap()
            >= 2.0
    );
}
