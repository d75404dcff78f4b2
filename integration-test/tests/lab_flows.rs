//! Real kernel, real traffic: flows through the lab's kube-proxy DNAT, checked against the
//! records, conntrack and tcpdump.

use std::{process::Command, time::Duration};

use integration_test::*;

/// 200 connections at once, each held 300 ms, to the Service with two endpoints.
const CONCURRENT_200: [&str; 10] = [
    "--to",
    "100.64.0.20:80",
    "--count",
    "200",
    "--concurrency",
    "200",
    "--hold",
    "300ms",
    "--timeout",
    "10s",
];

#[test]
fn tcp_via_cluster_ip_is_translated_on_the_sending_node() {
    let lab = lab_with_agents("tcp", "2s");
    // tcpdump on node-a's uplink: the wire, independently of our programs.
    let capture = WireCapture::start(&lab, "node-a");

    let out = curl_web(&lab, "pod-a", 5);
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod-b");

    let is_story = |r: &serde_json::Value| r["final"] == true && r["socket"]["comm"] == "curl";
    let a = lab
        .wait_records("node-a", WAIT, |rs| rs.iter().any(is_story))
        .unwrap();
    let rec = find(&a, is_story)[0];
    let pre = tuple_of(&rec["pre_dnat"]).expect("pre_dnat");
    let post = tuple_of(&rec["post_dnat"]).expect("post_dnat");
    let sport = pre.1;
    assert_eq!(pre, t("10.244.1.10", sport, "100.64.0.10", 443));
    assert_eq!(post, t("10.244.1.10", sport, "10.244.2.10", 8443));
    assert_eq!(rec["translated"], true);
    assert_eq!(rec["observed_as"], "sender");
    assert_eq!(rec["translation"]["node"], "node-a");
    assert_eq!(rec["translation"]["after"], "pod_ingress");
    // The filter table already saw the translated tuple: DNAT happened before it (nat PREROUTING).
    assert_eq!(rec["translation"]["before"], "filter_forward");
    assert_eq!(
        rec["translation"]["evidence"], "conntrack",
        "the kernel's NAT state confirms the pair"
    );
    assert_eq!(rec["state"], "closed");
    assert_eq!(rec["proto"], "TCP");
    // What each hop saw.
    assert_eq!(
        tuple_of(&hop(rec, "socket", "orig").unwrap()["tuple"]),
        Some(pre.clone())
    );
    assert_eq!(
        tuple_of(&hop(rec, "pod_ingress", "orig").unwrap()["tuple"]),
        Some(pre.clone())
    );
    assert_eq!(
        tuple_of(&hop(rec, "uplink_egress", "orig").unwrap()["tuple"]),
        Some(post.clone())
    );
    let back = hop(rec, "pod_egress", "reply").expect("reply delivered to pod-a");
    assert_eq!(
        tuple_of(&back["tuple"]),
        Some(t("100.64.0.10", 443, "10.244.1.10", sport))
    );
    let wire_back = hop(rec, "uplink_ingress", "reply").expect("reply on the wire");
    assert_eq!(
        tuple_of(&wire_back["tuple"]),
        Some(t("10.244.2.10", 8443, "10.244.1.10", sport))
    );
    // Names (from the lab through the same interface as Kubernetes names).
    assert_eq!(rec["src_pod"]["name"], "pod-a");
    assert_eq!(rec["src_pod"]["namespace"], "shop");
    assert_eq!(rec["dst_pod"]["name"], "pod-b");
    assert_eq!(rec["dst_pod"]["node"], "node-b");
    assert_eq!(rec["dst_pod"]["labels"]["app"], "web");
    assert_eq!(rec["service"]["namespace"], "payments");
    assert_eq!(rec["service"]["name"], "web");
    assert_eq!(rec["service"]["port_name"], "https");
    assert_eq!(rec["service"]["port"], 443);
    assert_eq!(rec["service"]["target_port"], 8443);
    assert_eq!(rec["last_seen"]["point"], "uplink_egress");
    assert_eq!(tuple_of(&rec["wire_view"]), Some(post.clone()));
    // The filter table's view, measured where it evaluated the packets: after DNAT.
    let pv = &rec["policy_view"];
    assert_eq!(pv["source"], "filter_hook", "{pv}");
    assert_eq!(pv["hook"], "forward");
    assert_eq!(pv["verdict"], "passed");
    assert_eq!(pv["passed"], pv["packets"]);
    assert_eq!(tuple_of(&pv["tuple"]), Some(post.clone()));
    let f = hop(rec, "filter_forward", "orig").expect("filter FORWARD hop");
    assert_eq!(tuple_of(&f["tuple"]), Some(post.clone()));
    assert_eq!(f["passed"], f["packets"]);
    assert_eq!(rec["socket"]["asked"]["dst"], "100.64.0.10");
    assert_eq!(rec["socket"]["asked"]["dport"], 443);
    assert!(rec["totals"]["reply_packets"].as_u64().unwrap() >= 3);

    // node-b: arrives already translated, no DNAT there, no socket of its own.
    let b = lab
        .wait_records("node-b", WAIT, |rs| {
            rs.iter()
                .any(|r| tuple_of(&r["post_dnat"]) == Some(post.clone()) && r["final"] == true)
        })
        .unwrap();
    let rb = find(&b, |r| tuple_of(&r["post_dnat"]) == Some(post.clone()))[0];
    assert_eq!(rb["observed_as"], "receiver");
    assert_eq!(rb["translated"], false);
    assert!(rb["pre_dnat"].is_null());
    assert!(
        rb["socket"].is_null(),
        "node-b must not claim node-a's socket: {rb}"
    );
    assert_eq!(rb["last_seen"]["point"], "pod_egress");
    assert_eq!(rb["src_pod"]["name"], "pod-a");
    assert_eq!(rb["dst_pod"]["name"], "pod-b");
    assert!(
        rb.get("service").is_none(),
        "node-b never saw the Service address"
    );
    assert_eq!(tuple_of(&rb["wire_view"]), Some(post.clone()));
    assert_eq!(tuple_of(&rb["policy_view"]["tuple"]), Some(post.clone()));
    assert_eq!(rb["policy_view"]["source"], "filter_hook");
    assert_eq!(rb["policy_view"]["hook"], "forward");
    assert_eq!(
        tuple_of(&hop(rb, "uplink_ingress", "orig").unwrap()["tuple"]),
        Some(post.clone())
    );
    assert_eq!(
        tuple_of(&hop(rb, "pod_egress", "orig").unwrap()["tuple"]),
        Some(post.clone())
    );

    // tcpdump saw the post-DNAT tuple on the wire, and never the Service address.
    let wire = capture.stop();
    assert!(
        wire.contains(&format!("10.244.1.10.{sport} > 10.244.2.10.8443:")),
        "tcpdump on the wire did not show the post-DNAT tuple:\n{wire}"
    );
    assert!(
        !wire.contains("100.64.0.10"),
        "the Service IP appeared on the wire:\n{wire}"
    );

    validate_schema(&a);
    validate_schema(&b);

    let ma = lab.metrics("node-a").unwrap();
    promtool_check(&ma);
    assert!(
        metric(
            &ma,
            "observer_translations_total",
            &[("service", "100.64.0.10:443"), ("target_port", "8443")]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric(
            &ma,
            "observer_packets_total",
            &[("point", "uplink_egress"), ("proto", "TCP")]
        )
        .unwrap()
            >= 5.0
    );
    let web = [
        ("namespace", "payments"),
        ("service", "web"),
        ("port", "443"),
        ("outcome", "answered"),
    ];
    assert!(
        metric(&ma, "observer_service_connections_total", &web).unwrap() >= 1.0,
        "the Service by name, on the client's node"
    );
    let mb = lab.metrics("node-b").unwrap();
    promtool_check(&mb);
    assert_eq!(
        metric(&mb, "observer_service_connections_total", &web),
        None,
        "counted once: the server's node did not see the Service asked for"
    );
    assert_eq!(
        metric(
            &mb,
            "observer_translations_total",
            &[("service", "100.64.0.10:443")]
        ),
        None,
        "node-b translated nothing"
    );
    assert!(
        metric(
            &mb,
            "observer_flows_total",
            &[("observed_as", "receiver"), ("proto", "TCP")]
        )
        .unwrap()
            >= 1.0
    );
}

#[test]
fn udp_via_cluster_ip() {
    let lab = lab_with_agents("udp", "2s");
    let s = lab
        .client(
            "pod-a",
            &["--to", "100.64.0.53:53", "--proto", "udp", "--count", "3"],
        )
        .unwrap();
    assert_eq!(s["ok"], 3, "{s}");
    let is_dns =
        |r: &serde_json::Value| r["final"] == true && r["pre_dnat"]["dst"] == "100.64.0.53";
    let a = lab
        .wait_records("node-a", WAIT, |rs| find(rs, is_dns).len() >= 3)
        .unwrap();
    for r in find(&a, is_dns) {
        assert_eq!(r["proto"], "UDP");
        assert_eq!(r["translated"], true);
        assert_eq!(r["pre_dnat"]["dport"], 53);
        assert_eq!(r["post_dnat"]["dst"], "10.244.2.53");
        assert_eq!(r["post_dnat"]["dport"], 5353);
        assert_eq!(r["post_dnat"]["sport"], r["pre_dnat"]["sport"]);
        assert_eq!(r["state"], "ended");
        assert_eq!(r["socket"]["asked"]["dport"], 53);
        assert_eq!(r["totals"]["reply_packets"], 1);
    }
    let b = lab
        .wait_records("node-b", WAIT, |rs| {
            find(rs, |r| {
                r["post_dnat"]["dport"] == 5353 && r["final"] == true
            })
            .len()
                >= 3
        })
        .unwrap();
    for r in find(&b, |r| r["post_dnat"]["dport"] == 5353) {
        assert_eq!(r["observed_as"], "receiver");
        assert_eq!(r["translated"], false);
    }
    validate_schema(&a);
    let ct = lab.conntrack("node-a").unwrap();
    for r in find(&a, is_dns) {
        assert_eq!(assert_nat_matches(&ct, r).proto, "udp");
    }
}

#[test]
fn two_endpoints_200_concurrent_connections_match_conntrack() {
    let lab = lab_with_agents("cc", "2s");
    let s = lab.client("pod-a", &CONCURRENT_200).unwrap();
    assert_eq!(s["ok"], 200, "{s}");
    assert!(
        s["answers"]["pod-api-1"].as_u64().unwrap_or(0) > 0
            && s["answers"]["pod-api-2"].as_u64().unwrap_or(0) > 0,
        "both endpoints answer: {s}"
    );

    let is_api =
        |r: &serde_json::Value| r["final"] == true && r["pre_dnat"]["dst"] == "100.64.0.20";
    let a = lab
        .wait_records("node-a", Duration::from_secs(40), |rs| {
            find(rs, is_api).len() >= 200
        })
        .unwrap();
    let recs = find(&a, is_api);
    assert_eq!(recs.len(), 200, "one record per connection");

    let ct: Vec<_> = lab
        .conntrack("node-a")
        .unwrap()
        .into_iter()
        .filter(|e| e.orig.2 == "100.64.0.20" && e.orig.3 == 80)
        .collect();
    assert_eq!(
        ct.len(),
        200,
        "conntrack has every connection (TIME_WAIT keeps them)"
    );
    for e in &ct {
        let r = recs
            .iter()
            .find(|r| tuple_of(&r["pre_dnat"]).as_ref() == Some(&e.orig))
            .unwrap_or_else(|| {
                panic!(
                    "no record whose pre_dnat is conntrack's original {:?}",
                    e.orig
                )
            });
        assert_eq!(
            tuple_of(&r["post_dnat"]),
            Some(e.reply_reversed()),
            "post_dnat is conntrack's reply reversed"
        );
    }
    // The local endpoint is delivered on node-a itself; the remote one goes over the wire.
    let local = find(&a, |r| is_api(r) && r["post_dnat"]["dst"] == "10.244.1.20");
    let remote = find(&a, |r| is_api(r) && r["post_dnat"]["dst"] == "10.244.2.20");
    assert!(!local.is_empty() && !remote.is_empty());
    for r in &local {
        assert_eq!(r["observed_as"], "local");
        assert_eq!(r["translation"]["before"], "filter_forward");
        assert!(hop(r, "pod_egress", "orig").is_some(), "{r}");
    }
    for r in &remote {
        assert_eq!(r["observed_as"], "sender");
        assert_eq!(r["translation"]["before"], "filter_forward");
        assert!(hop(r, "uplink_egress", "orig").is_some(), "{r}");
    }
    let m = lab.metrics("node-a").unwrap();
    assert_eq!(
        metric(&m, "observer_correlation_ambiguous_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "observer_map_full_total", &[("map", "flows")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "observer_kernel_events_lost_total",
            &[("ring", "socket")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "observer_reuse_races_total",
            &[("outcome", "start_lost")]
        ),
        Some(0.0)
    );
    validate_schema(&a);
}

#[test]
fn ipv6_service() {
    let lab = lab_with_agents("v6", "2s");
    let s = lab
        .client("pod-a", &["--to", "[fd00:100:64::10]:443", "--count", "2"])
        .unwrap();
    assert_eq!(s["ok"], 2, "{s}");
    let is_v6 =
        |r: &serde_json::Value| r["final"] == true && r["pre_dnat"]["dst"] == "fd00:100:64::10";
    let a = lab
        .wait_records("node-a", WAIT, |rs| find(rs, is_v6).len() >= 2)
        .unwrap();
    for r in find(&a, is_v6) {
        assert_eq!(r["family"], "IPv6");
        assert_eq!(r["pre_dnat"]["src"], "fd00:10:244:1::10");
        assert_eq!(r["pre_dnat"]["dport"], 443);
        assert_eq!(r["post_dnat"]["dst"], "fd00:10:244:2::10");
        assert_eq!(r["post_dnat"]["dport"], 8443);
        assert_eq!(r["translation"]["before"], "filter_forward");
        assert_eq!(r["state"], "closed");
        assert_eq!(r["socket"]["asked"]["dst"], "fd00:100:64::10");
        // The IPv6 filter hooks measured what ip6tables' filter FORWARD evaluated.
        assert_eq!(r["policy_view"]["source"], "filter_hook", "{r:#}");
        assert_eq!(r["policy_view"]["tuple"], r["post_dnat"]);
        assert_eq!(r["policy_view"]["verdict"], "passed");
    }
    let b = lab
        .wait_records("node-b", WAIT, |rs| {
            find(rs, |r| {
                r["post_dnat"]["dst"] == "fd00:10:244:2::10" && r["final"] == true
            })
            .len()
                >= 2
        })
        .unwrap();
    validate_schema(&a);
    validate_schema(&b);
    let ct = lab
        .exec("node-a", &["conntrack", "-L", "-f", "ipv6"])
        .unwrap();
    let ct = parse_conntrack(&String::from_utf8_lossy(&ct.stdout));
    for r in find(&a, is_v6) {
        assert_nat_matches(&ct, r);
    }
}

/// The agent hears of a new pod's veth from rtnetlink, not at its next scan: a pod that connects
/// the moment it exists has its first packet (the SYN) counted on its veth, every packet the
/// filter hook counted.
#[test]
fn a_new_pods_first_packets_are_seen_on_its_veth() {
    let lab = lab_with_agents("first", "1s");
    let veth = add_pod(&lab, "first", "node-a", "10.244.1.79");
    assert!(curl_web(&lab, "first", 5).status.success());
    let a = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .any(|r| r["pre_dnat"]["src"] == "10.244.1.79" && r["final"] == true)
        })
        .unwrap();
    let r = find(&a, |r| {
        r["pre_dnat"]["src"] == "10.244.1.79" && r["final"] == true
    })[0];
    let pod = hop(r, "pod_ingress", "orig").expect("seen entering from the pod");
    assert_eq!(pod["iface"], veth.as_str());
    assert!(
        pod["tcp_flags"].as_str().is_some_and(|f| f.contains("SYN")),
        "the SYN was missed on the new veth: {r:#}"
    );
    let filter = hop(r, "filter_forward", "orig").expect("the filter hook's count");
    assert_eq!(pod["packets"], filter["packets"], "{r:#}");
}

#[test]
fn pod_created_after_the_agent_started_is_observed_and_forgotten_when_gone() {
    let lab = lab_with_agents("late", "2s");
    let veth = add_pod(&lab, "late", "node-a", "10.244.1.77");
    let veth = veth.as_str();
    let attached = |n: f64| {
        for _ in 0..50 {
            let m = lab.metrics("node-a").unwrap();
            if metric(&m, "observer_interfaces_attached", &[("role", "pod")]) == Some(n) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    assert!(
        attached(3.0),
        "the agent attached to the new veth within 5 s"
    );
    let out = curl_web(&lab, "late", 5);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .any(|r| r["pre_dnat"]["src"] == "10.244.1.77" && r["final"] == true)
        })
        .unwrap();
    let r = find(&a, |r| r["pre_dnat"]["src"] == "10.244.1.77")[0];
    assert_eq!(hop(r, "pod_ingress", "orig").unwrap()["iface"], veth);
    assert_eq!(r["post_dnat"]["dport"], 8443);

    lab_cmd(&["del-pod", "late", "--name", &lab.name]);
    assert!(attached(2.0), "the agent forgot the deleted veth");
    let log = std::fs::read_to_string(lab.dir.join("agent-node-a.log")).unwrap();
    assert!(log.contains(&format!("{veth} went away")), "{log}");
}

#[test]
fn two_agents_share_the_machine_without_disturbing_each_other() {
    let mut lab = lab_with_agents("two", "2s");
    // Both agents' socket hooks sit on the same cgroup root, side by side.
    let cg = Command::new("bpftool")
        .args(["cgroup", "show", "/sys/fs/cgroup/unified"])
        .output()
        .unwrap();
    let cg = String::from_utf8_lossy(&cg.stdout);
    assert!(cg.matches("sock_connect4").count() >= 2, "{cg}");

    // Stop node-a's agent: node-b's keeps recording.
    let (code, _) = lab.stop_agent("node-a").unwrap();
    assert_eq!(code, Some(0));
    let out = curl_web(&lab, "pod-a", 5);
    assert!(out.status.success());
    let b = lab
        .wait_records("node-b", WAIT, |rs| {
            rs.iter()
                .any(|r| r["post_dnat"]["dport"] == 8443 && r["final"] == true)
        })
        .unwrap();
    assert_eq!(
        find(&b, |r| r["post_dnat"]["dport"] == 8443)[0]["node"],
        "node-b"
    );
    let m = lab.metrics("node-b").unwrap();
    assert!(
        metric(
            &m,
            "observer_packets_total",
            &[("point", "uplink_ingress"), ("proto", "TCP")]
        )
        .unwrap()
            >= 1.0
    );
}

/// The filter layer sees the post-DNAT tuple: a FORWARD rule on the Service port matches nothing,
/// one on the targetPort drops the connection, and the record says where, why and what it saw.
#[test]
fn forward_filter_sees_the_target_port_not_the_service_port() {
    let lab = lab_with_agents("fwd", "2s");
    let ipt = |args: &[&str]| {
        let mut v = vec!["iptables"];
        v.extend_from_slice(args);
        let out = lab.exec("node-a", &v).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let curl = || curl_web(&lab, "pod-a", 2).status.success();
    ipt(&["-A", "FORWARD", "-p", "tcp", "--dport", "443", "-j", "DROP"]);
    assert!(
        curl(),
        "a FORWARD rule on the Service port 443 must not match"
    );
    ipt(&["-D", "FORWARD", "-p", "tcp", "--dport", "443", "-j", "DROP"]);
    ipt(&[
        "-A", "FORWARD", "-p", "tcp", "--dport", "8443", "-j", "DROP",
    ]);
    assert!(!curl(), "a FORWARD rule on the targetPort 8443 drops it");

    let dropped = |r: &serde_json::Value| r["final"] == true && !r["drop"].is_null();
    let a = lab
        .wait_records("node-a", WAIT, |rs| rs.iter().any(dropped))
        .unwrap();
    let r = find(&a, dropped)[0];
    assert_eq!(r["pre_dnat"]["dport"], 443);
    assert!(r["post_dnat"].is_null(), "it never left node-a: {r}");
    assert_eq!(r["state"], "syn_sent");
    let d = &r["drop"];
    assert_eq!(d["node"], "node-a");
    assert_eq!(d["reason"], "NETFILTER_DROP");
    assert_eq!(d["point"], "netfilter");
    assert!(
        d["location"].as_str().unwrap().starts_with("nf")
            || d["location"].as_str().unwrap().contains("ipt"),
        "{d}"
    );
    assert_eq!(
        d["tuple"]["dst"], "10.244.2.10",
        "the filter layer saw the backend pod"
    );
    assert_eq!(d["tuple"]["dport"], 8443, "and the targetPort");
    assert!(d["packets"].as_u64().unwrap() >= 1);
    // Measured twice: the filter hooks saw it go in and not come out, the tracer saw the drop.
    let pv = &r["policy_view"];
    assert_eq!(pv["source"], "filter_hook", "{pv}");
    assert_eq!(pv["verdict"], "dropped");
    assert_eq!(pv["passed"], 0);
    assert!(pv["packets"].as_u64().unwrap() >= 1);
    assert_eq!(pv["tuple"], d["tuple"]);
    assert_eq!(r["last_seen"]["point"], "filter_forward");
    let m = lab.metrics("node-a").unwrap();
    assert!(metric(&m, "observer_drops_total", &[("reason", "NETFILTER_DROP")]).unwrap() >= 1.0);
    assert!(
        metric(
            &m,
            "observer_service_connections_total",
            &[("service", "web"), ("outcome", "dropped")]
        )
        .unwrap()
            >= 1.0
    );
    // The dropped connection never reached node-b (the first one, on port 443, did).
    let b = lab.records("node-b").unwrap();
    assert_eq!(
        find(&b, |r| r["post_dnat"]["dport"] == 8443).len(),
        1,
        "{b:?}"
    );
    assert!(
        !b.iter()
            .any(|r| tuple_of(&r["post_dnat"]) == tuple_of(&d["tuple"]))
    );
    validate_schema(&a);
}

/// NetworkPolicy, enforced in filter FORWARD after kube-proxy's DNAT, sees the backend and the
/// targetPort on both nodes: an egress rule on port 443 drops the Service connection on node-a,
/// the same rule on the named targetPort lets it through, and an ingress policy on pod-b drops
/// it on node-b after it crossed the wire as pod-b:8443.
#[test]
fn network_policy_sees_the_target_port_on_both_nodes() {
    let lab = lab_with_agents("np", "2s");
    let apply = |name: &str| apply(&lab, &scenario(name));
    let dropped_on = |node: &str, sport_seen: &mut Vec<u64>| -> serde_json::Value {
        let pred = |r: &serde_json::Value| {
            r["final"] == true
                && !r["drop"].is_null()
                && !sport_seen.contains(&r["drop"]["tuple"]["sport"].as_u64().unwrap_or(0))
        };
        let recs = lab
            .wait_records(node, WAIT, |rs| rs.iter().any(pred))
            .unwrap();
        let r = find(&recs, pred)[0].clone();
        sport_seen.push(r["drop"]["tuple"]["sport"].as_u64().unwrap());
        r
    };
    let mut seen = Vec::new();

    apply("egress-service-port");
    assert!(!curl_web(&lab, "pod-a", 2).status.success());
    let r = dropped_on("node-a", &mut seen);
    assert_eq!(r["pre_dnat"]["dport"], 443);
    assert_eq!(r["drop"]["reason"], "NETFILTER_DROP");
    assert_eq!(r["drop"]["tuple"]["dst"], "10.244.2.10");
    assert_eq!(
        r["drop"]["tuple"]["dport"], 8443,
        "the egress policy was evaluated on 8443, not 443"
    );
    assert_eq!(r["policy_view"]["source"], "filter_hook");
    assert_eq!(r["policy_view"]["verdict"], "dropped");
    assert_eq!(r["policy_view"]["tuple"]["dport"], 8443);
    assert_eq!(r["last_seen"]["point"], "filter_forward");
    assert!(r["wire_view"].is_null());

    apply("egress-target-port");
    let out = curl_web(&lab, "pod-a", 5);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    apply("ingress-deny");
    assert!(!curl_web(&lab, "pod-a", 2).status.success());
    let rb = dropped_on("node-b", &mut seen);
    assert_eq!(rb["observed_as"], "receiver");
    assert_eq!(rb["drop"]["node"], "node-b");
    assert_eq!(rb["drop"]["reason"], "NETFILTER_DROP");
    assert_eq!(
        rb["drop"]["tuple"]["dport"], 8443,
        "the ingress policy on node-b saw 8443 too"
    );
    assert_eq!(rb["policy_view"]["node"], "node-b");
    assert_eq!(rb["policy_view"]["tuple"]["dport"], 8443);
    assert_eq!(rb["policy_view"]["verdict"], "dropped");
    assert_eq!(rb["last_seen"]["point"], "filter_forward");
    assert_eq!(
        tuple_of(&hop(&rb, "uplink_ingress", "orig").unwrap()["tuple"]),
        tuple_of(&rb["drop"]["tuple"])
    );
    // On node-a the same connection left over the wire and was never answered.
    let sport = rb["drop"]["tuple"]["sport"].as_u64().unwrap();
    let a = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .any(|r| r["final"] == true && r["pre_dnat"]["sport"] == sport)
        })
        .unwrap();
    let ra = find(&a, |r| r["pre_dnat"]["sport"] == sport)[0];
    assert_eq!(ra["translated"], true);
    assert_eq!(ra["post_dnat"]["dport"], 8443);
    assert_eq!(ra["state"], "syn_sent");
    assert!(ra["drop"].is_null(), "nothing was dropped on node-a");

    apply("none");
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    validate_schema(&a);
}

/// kube-proxy's nftables mode (`table ip kube-proxy`, a `service-ips` verdict map, `numgen`
/// endpoint choice): the same pre/post pairs as iptables mode, each checked against conntrack.
#[test]
fn nftables_mode_translates_on_the_sending_node_as_conntrack_says() {
    let lab = lab_with_agents_in("nft", "2s", Some(&story_with_load_balancer("nftables")));
    let nft = lab
        .exec("node-a", &["nft", "list", "table", "ip", "kube-proxy"])
        .unwrap();
    let nft = String::from_utf8_lossy(&nft.stdout);
    assert!(
        nft.contains("map service-ips") && nft.contains("numgen random mod 2"),
        "{nft}"
    );
    let ipt = lab.exec("node-a", &["iptables-save", "-t", "nat"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&ipt.stdout).contains("KUBE-SVC"),
        "no iptables Service rules in nftables mode"
    );

    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let s = lab.client("pod-a", &CONCURRENT_200).unwrap();
    assert_eq!(s["ok"], 200, "{s}");
    let s = lab
        .client(
            "pod-a",
            &["--to", "100.64.0.53:53", "--proto", "udp", "--count", "3"],
        )
        .unwrap();
    assert_eq!(s["ok"], 3, "{s}");
    // The NodePort from outside, through nftables mode's service-nodeports map.
    apply(&lab, &scenario("firewall-nodeport"));
    let np = lab
        .exec(
            "outside",
            &["curl", "-sS", "-m", "5", "http://10.200.0.1:30443/"],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&np.stdout).trim(), "pod-b");
    let v6 = lab
        .exec(
            "pod-a",
            &[
                "curl",
                "-sS",
                "-m",
                "5",
                "-g",
                "http://[fd00:100:64::10]:443/",
            ],
        )
        .unwrap();
    assert!(
        v6.status.success(),
        "{}",
        String::from_utf8_lossy(&v6.stderr)
    );

    let asked =
        |r: &serde_json::Value, dst: &str| r["final"] == true && r["pre_dnat"]["dst"] == dst;
    let a = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter().filter(|r| asked(r, "100.64.0.20")).count() >= 200
                && rs.iter().filter(|r| asked(r, "100.64.0.53")).count() >= 3
                && rs.iter().any(|r| asked(r, "100.64.0.10"))
                && rs.iter().any(|r| asked(r, "10.200.0.1"))
                && rs.iter().any(|r| asked(r, "fd00:100:64::10"))
        })
        .unwrap();
    let nodeport = find(&a, |r| asked(r, "10.200.0.1"));
    assert_eq!(
        nodeport[0]["translation"]["kind"], "dnat_snat",
        "{:#}",
        nodeport[0]
    );
    assert_eq!(nodeport[0]["observed_as"], "transit");
    let ct = lab.conntrack("node-a").unwrap();
    let mut backends = std::collections::BTreeSet::new();
    for r in a
        .iter()
        .filter(|r| r["final"] == true && r["translated"] == true)
    {
        let pre = tuple_of(&r["pre_dnat"]).unwrap();
        let post = tuple_of(&r["post_dnat"]).unwrap();
        assert_nat_matches(&ct, r);
        assert_eq!(r["translation"]["evidence"], "conntrack", "{r}");
        if pre.2 == "100.64.0.20" {
            assert_eq!(post.3, 8080);
            backends.insert(post.2);
        }
    }
    assert_eq!(
        backends.len(),
        2,
        "numgen spread 200 connections over both endpoints: {backends:?}"
    );
}

/// A hairpin: pod-b calls its own Service; kube-proxy masquerades it (KUBE-SEP's
/// `-s <endpoint> -j KUBE-MARK-MASQ`), so the client's address and port change on the way back
/// in. One connection, joined by conntrack's original tuple, exactly as conntrack reports it.
#[test]
fn hairpin_through_masquerade_is_one_connection_joined_by_conntrack() {
    let lab = lab_with_agents("hpin", "2s");
    let out = curl_web(&lab, "pod-b", 5);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pod-b",
        "served by itself"
    );
    let is_hairpin = |r: &serde_json::Value| {
        r["final"] == true && r["proto"] == "TCP" && r["pre_dnat"]["src"] == "10.244.2.10"
    };
    let b = lab
        .wait_records("node-b", WAIT, |rs| rs.iter().any(is_hairpin))
        .unwrap();
    let rec = find(&b, is_hairpin);
    assert_eq!(rec.len(), 1, "one record for the connection: {rec:#?}");
    let r = rec[0];
    assert_eq!(r["observed_as"], "local");
    assert_eq!(r["translation"]["evidence"], "conntrack");
    let pre = tuple_of(&r["pre_dnat"]).unwrap();
    let post = tuple_of(&r["post_dnat"]).unwrap();
    assert_eq!((pre.2.as_str(), pre.3), ("100.64.0.10", 443));
    assert_eq!((post.2.as_str(), post.3), ("10.244.2.10", 8443));
    assert_ne!(
        post.0, "10.244.2.10",
        "masqueraded: the source is no longer the pod"
    );
    assert_nat_matches(&lab.conntrack("node-b").unwrap(), r);
    // Not a second, unjoined record for the masqueraded half.
    assert!(
        !b.iter().any(|x| x["final"] == true
            && x["pre_dnat"].is_null()
            && tuple_of(&x["post_dnat"]) == Some(post.clone())),
        "{b:#?}"
    );
}

/// A client reusing its source port (as busy clients do): each connection is its own record on
/// both nodes, none merged into an earlier one on the same 4-tuple, as the client counted them.
#[test]
fn a_reused_source_port_gives_one_record_per_connection() {
    let lab = lab_with_agents("reuse", "2s");
    let s = lab
        .client(
            "pod-a",
            &[
                "--to",
                "100.64.0.10:443",
                "--count",
                "6",
                "--source-port",
                "41000",
            ],
        )
        .unwrap();
    assert_eq!(s["ok"], 6, "{s}");
    let on = |r: &serde_json::Value| {
        r["final"] == true
            && r["proto"] == "TCP"
            && (r["pre_dnat"]["sport"] == 41000 || r["post_dnat"]["sport"] == 41000)
    };
    for node in ["node-a", "node-b"] {
        let recs = lab
            .wait_records(node, WAIT, |rs| find(rs, on).len() >= 6)
            .unwrap_or_else(|e| panic!("{node}: {e:#}"));
        let recs = find(&recs, on);
        assert_eq!(
            recs.len(),
            6,
            "{node}: one record per connection: {recs:#?}"
        );
        let mut starts: Vec<&str> = recs.iter().map(|r| r["start"].as_str().unwrap()).collect();
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), 6, "{node}: six different connections");
        for r in &recs {
            assert_eq!(r["state"], "closed", "{node}: {r:#}");
            // One short exchange each: SYN, ACK, request, FIN, ACKs; never two connections' worth.
            let p = r["totals"]["packets"].as_u64().unwrap();
            assert!((3..=8).contains(&p), "{node}: {p} packets: {r:#}");
        }
    }
    let m = lab.metrics("node-a").unwrap();
    assert!(
        metric(&m, "observer_tuple_reuses_total", &[("outcome", "split")]).unwrap_or(0.0) >= 1.0,
        "the kernel saw the 4-tuple reused"
    );
}

/// One UDP port talking to two Services at once: the client endpoint is the same for both, so
/// only the kernel's NAT state can tell which backend answered which Service. Checked against
/// conntrack, and nothing paired by guesswork.
#[test]
fn one_udp_port_to_two_services_is_joined_by_conntrack() {
    let lab = lab_with_agents("udp2", "2s");
    for to in ["100.64.0.53:53", "100.64.0.20:7"] {
        let s = lab
            .client(
                "pod-a",
                &["--to", to, "--proto", "udp", "--source-port", "42000"],
            )
            .unwrap();
        assert_eq!(s["ok"], 1, "{s}");
    }
    let from_port = |r: &serde_json::Value| r["final"] == true && r["pre_dnat"]["sport"] == 42000;
    let a = lab
        .wait_records("node-a", WAIT, |rs| find(rs, from_port).len() >= 2)
        .unwrap();
    let recs = find(&a, from_port);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let ct = lab.conntrack("node-a").unwrap();
    for r in recs {
        assert_eq!(r["translation"]["evidence"], "conntrack", "{r:#}");
        assert_nat_matches(&ct, r);
    }
    let m = lab.metrics("node-a").unwrap();
    assert_eq!(
        metric(&m, "observer_correlation_ambiguous_total", &[]),
        Some(0.0)
    );
}

/// A NodePort reached from outside the cluster (`externalTrafficPolicy: Cluster`): node-a
/// translates both addresses, so on the wire to node-b the source is node-a's IP and the
/// destination the pod's targetPort. One record on node-a joins the two by conntrack, exactly as
/// conntrack reports them; node-b sees node-a's IP as the client (what its policy and the
/// firewall between the nodes evaluate).
#[test]
fn nodeport_from_outside_is_translated_and_masqueraded_on_the_entry_node() {
    let lab = lab_with_agents("nport", "2s");
    apply(&lab, &scenario("firewall-nodeport"));
    let capture = WireCapture::start(&lab, "node-b");
    assert_eq!(
        curl_answer(&lab, "outside", "http://10.200.0.1:30443/"),
        "pod-b"
    );
    let (r, a) = one_final(&lab, "node-a", |r| {
        r["proto"] == "TCP" && r["pre_dnat"]["src"] == "192.0.2.10"
    });
    assert_eq!(
        r["observed_as"], "transit",
        "neither client nor server is a pod of node-a"
    );
    assert_eq!(r["translation"]["kind"], "dnat_snat");
    assert_eq!(r["translation"]["mechanism"], "netfilter");
    assert_eq!(r["translation"]["after"], "uplink_ingress");
    let pre = tuple_of(&r["pre_dnat"]).unwrap();
    let post = tuple_of(&r["post_dnat"]).unwrap();
    assert_eq!((pre.2.as_str(), pre.3), ("10.200.0.1", 30443));
    assert_eq!(
        (post.0.as_str(), post.2.as_str(), post.3),
        ("10.200.0.1", "10.244.2.10", 8443)
    );
    assert_eq!(
        r["wire_view"]["src"], "10.200.0.1",
        "the wire carries node-a's IP"
    );
    assert_nat_matches(&lab.conntrack("node-a").unwrap(), &r);
    // node-a's filter table saw a tuple that neither entered nor left the node: after DNAT,
    // before SNAT, the outside client's own address to the backend (joined by conntrack).
    let pv = &r["policy_view"];
    assert_eq!(pv["source"], "filter_hook", "{pv}");
    assert_eq!(pv["hook"], "forward");
    assert_eq!(
        tuple_of(&pv["tuple"]),
        Some((pre.0.clone(), pre.1, post.2.clone(), post.3)),
        "client 192.0.2.10 to pod-b:8443"
    );
    let rb = arrived_on_b(&lab, &r["post_dnat"]);
    assert_eq!(rb["observed_as"], "receiver");
    assert_eq!(rb["policy_view"]["tuple"]["src"], "10.200.0.1");
    assert_eq!(rb["policy_view"]["source"], "filter_hook");
    // tcpdump on node-b's uplink: node-a's IP to the pod's targetPort, never the client's.
    let wire = capture.stop();
    assert!(wire.contains(&wire_text(&r["post_dnat"])), "{wire}");
    assert!(
        !wire.contains("192.0.2.10"),
        "the outside client on the wire:\n{wire}"
    );
    validate_schema(&a);
}

/// A pod calling a host outside the cluster: ip-masq-agent's rule masquerades it to node-a's IP.
/// Only the source changed; one record joins both tuples by conntrack.
#[test]
fn pod_to_outside_is_masqueraded_and_joined_by_conntrack() {
    let lab = lab_with_agents("egress", "2s");
    assert_eq!(
        curl_answer(&lab, "pod-a", "http://192.0.2.10:80/"),
        "outside"
    );
    let (r, _) = one_final(&lab, "node-a", |r| {
        r["proto"] == "TCP" && r["pre_dnat"]["dst"] == "192.0.2.10"
    });
    assert_eq!(r["observed_as"], "sender");
    assert_eq!(r["translated"], true);
    assert_eq!(r["translation"]["kind"], "snat");
    assert_eq!(r["translation"]["evidence"], "conntrack");
    assert_eq!(r["pre_dnat"]["src"], "10.244.1.10");
    assert_eq!(
        r["post_dnat"]["src"], "10.200.0.1",
        "masqueraded to node-a's IP"
    );
    assert_eq!(r["post_dnat"]["dst"], "192.0.2.10");
    assert_nat_matches(&lab.conntrack("node-a").unwrap(), &r);
    assert_eq!(r["socket"]["comm"], "curl");
    // Egress policy is evaluated before the masquerade: the pod's own address.
    assert_eq!(r["policy_view"]["source"], "filter_hook");
    assert_eq!(r["policy_view"]["tuple"], r["pre_dnat"]);
}

/// A process of node-a itself (a hostNetwork client) calling the Service: no tc hook sees its
/// tuple before NAT (it never enters the node), conntrack does. The record's `pre_dnat` is
/// conntrack's original tuple, and node-b sees node-a's IP calling the pod's targetPort: the one
/// case where "NodeA_IP -> PodB:8443" is what policy on node-b evaluates.
#[test]
fn host_network_client_is_named_by_conntrack_and_seen_as_the_node_ip() {
    let lab = lab_with_agents("hostnet", "2s");
    // The VPC firewall must let the node network reach the targetPort (as for a NodePort).
    apply(&lab, &scenario("firewall-nodeport"));
    assert_eq!(
        curl_answer(&lab, "node-a", "http://100.64.0.10:443/"),
        "pod-b"
    );
    let (r, _) = one_final(&lab, "node-a", |r| {
        r["proto"] == "TCP" && r["pre_dnat"]["src"] == "10.200.0.1"
    });
    assert_eq!(r["observed_as"], "sender");
    assert_eq!(r["translation"]["after"], "socket");
    assert_eq!(r["translation"]["evidence"], "conntrack");
    let pre = tuple_of(&r["pre_dnat"]).unwrap();
    let post = tuple_of(&r["post_dnat"]).unwrap();
    assert_eq!((pre.2.as_str(), pre.3), ("100.64.0.10", 443));
    assert_eq!(
        (post.0.as_str(), post.2.as_str(), post.3),
        ("10.200.0.1", "10.244.2.10", 8443)
    );
    assert_nat_matches(&lab.conntrack("node-a").unwrap(), &r);
    // A process's packets meet the filter table at OUTPUT: after nat OUTPUT's DNAT, before
    // POSTROUTING's masquerade (which may rewrite the source port).
    let pv = &r["policy_view"];
    assert_eq!(pv["source"], "filter_hook", "{r:#}");
    assert_eq!(pv["hook"], "output");
    assert_eq!(pv["verdict"], "passed");
    assert_eq!(
        tuple_of(&pv["tuple"]),
        Some((pre.0.clone(), pre.1, post.2.clone(), post.3))
    );
    let rb = arrived_on_b(&lab, &r["post_dnat"]);
    assert_eq!(rb["observed_as"], "receiver");
    assert_eq!(rb["policy_view"]["tuple"]["src"], "10.200.0.1");
    assert_eq!(rb["policy_view"]["tuple"]["dport"], 8443);
}

/// `--lb socket`: a socket-level load balancer (cgroup connect4/sendmsg4/recvmsg4, like Cilium's
/// and Calico's kube-proxy replacements) picks the backend in connect()/sendmsg(). No packet ever
/// carries the ClusterIP and conntrack knows nothing of it; the agent, whose cgroup hook runs
/// first, still shows the pair. Oracles: the client's own getpeername() (the backend) and what it
/// asked for, and conntrack's entries (backend tuples, no Service address).
#[test]
fn socket_load_balancer_is_shown_as_translated_in_connect() {
    let lab = lab_with_agents_in("sock", "2s", Some(&story_with_load_balancer("socket")));
    let capture = WireCapture::start(&lab, "node-a");
    assert_eq!(
        curl_answer(&lab, "pod-a", "http://100.64.0.10:443/"),
        "pod-b"
    );
    let tcp = lab.client("pod-a", &CONCURRENT_200).unwrap();
    assert_eq!(tcp["ok"], 200, "{tcp}");
    let peers: Vec<String> = tcp["peers"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        peers,
        ["10.244.1.20:8080", "10.244.2.20:8080"],
        "getpeername() is the backend: the socket was connected to it"
    );
    let udp = lab
        .client(
            "pod-a",
            &["--to", "100.64.0.53:53", "--proto", "udp", "--count", "3"],
        )
        .unwrap();
    assert_eq!(udp["ok"], 3, "{udp}");
    assert_eq!(
        udp["peers"]["100.64.0.53:53"], 3,
        "recvmsg() shows the reply as the Service's: {udp}"
    );
    let v6 = lab
        .client("pod-a", &["--to", "[fd00:100:64::10]:443", "--count", "2"])
        .unwrap();
    assert_eq!(v6["peers"]["[fd00:10:244:2::10]:8443"], 2, "{v6}");

    // The client's side (pod-api-1 is on node-a too: those connections are `local`).
    let asked = |r: &serde_json::Value, vip: &str| {
        r["final"] == true && r["socket"].is_object() && r["pre_dnat"]["dst"] == vip
    };
    let a = lab
        .wait_records("node-a", Duration::from_secs(40), |rs| {
            rs.iter().filter(|r| asked(r, "100.64.0.20")).count() >= 200
                && rs.iter().filter(|r| asked(r, "100.64.0.53")).count() >= 3
                && rs.iter().filter(|r| asked(r, "fd00:100:64::10")).count() >= 2
        })
        .unwrap();
    let ct = lab.conntrack("node-a").unwrap();
    assert!(
        !ct.iter()
            .any(|e| e.orig.2.starts_with("100.64.") || e.reply.0.starts_with("100.64.")),
        "conntrack knows nothing of the Service addresses"
    );
    let mut backends = std::collections::BTreeSet::new();
    for r in a.iter().filter(|r| {
        asked(r, "100.64.0.20") || asked(r, "100.64.0.53") || asked(r, "fd00:100:64::10")
    }) {
        assert_eq!(r["translated"], true, "{r:#}");
        let t = &r["translation"];
        assert_eq!(
            (&t["mechanism"], &t["evidence"], &t["after"]),
            (&"socket".into(), &"socket".into(), &"socket".into()),
            "{r:#}"
        );
        assert_eq!(
            r["socket"]["asked"], r["pre_dnat"],
            "what the app asked for"
        );
        let post = tuple_of(&r["post_dnat"]).unwrap();
        match r["pre_dnat"]["dst"].as_str().unwrap() {
            "100.64.0.20" => {
                assert_eq!(post.3, 8080);
                backends.insert(format!("{}:{}", post.2, post.3));
            }
            "100.64.0.53" => assert_eq!((post.2.as_str(), post.3), ("10.244.2.53", 5353)),
            _ => assert_eq!((post.2.as_str(), post.3), ("fd00:10:244:2::10", 8443)),
        }
        // Whatever conntrack saw of it, it saw the backend tuple, untranslated.
        if let Some(e) = ct.iter().find(|e| e.orig == post) {
            assert_eq!((e.reply.2.clone(), e.reply.3), (post.0.clone(), post.1));
        }
    }
    assert_eq!(
        backends.into_iter().collect::<Vec<_>>(),
        peers,
        "the records' backends are the ones the client was connected to"
    );
    // The story's connection: on the wire as the record's post_dnat, and no packet ever carried
    // the ClusterIP.
    let (story, _) = one_final(&lab, "node-a", |r| {
        r["socket"]["comm"] == "curl" && r["pre_dnat"]["dst"] == "100.64.0.10"
    });
    assert_eq!(story["translation"]["mechanism"], "socket");
    let wire = capture.stop();
    assert!(wire.contains(&wire_text(&story["post_dnat"])), "{wire}");
    assert!(
        !wire.contains("100.64."),
        "a Service address on the wire:\n{wire}"
    );
    let m = lab.metrics("node-a").unwrap();
    assert!(
        metric(
            &m,
            "observer_nat_translations_total",
            &[("kind", "dnat"), ("mechanism", "socket")]
        )
        .unwrap_or(0.0)
            >= 205.0
    );
    validate_schema(&a);
}

#[test]
fn a_pod_recreated_under_the_same_name_a_flapping_uplink_and_a_moved_veth_are_followed() {
    let lab = lab_with_agents("flap", "2s");
    let add = || add_pod(&lab, "again", "node-a", "10.244.1.78");
    let attached = |n: f64| {
        (0..50).any(|_| {
            let m = lab.metrics("node-a").unwrap();
            let ok = metric(&m, "observer_interfaces_attached", &[("role", "pod")]) == Some(n);
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        })
    };
    let recorded_from = |ip: &str, after: usize| {
        lab.wait_records("node-a", WAIT, |rs| {
            rs.iter()
                .filter(|r| r["pre_dnat"]["src"] == ip && r["final"] == true)
                .count()
                > after
        })
        .unwrap()
    };
    let first = add();
    assert!(attached(3.0));
    // Deleted and created again at once, faster than the agent's 1 s rescan may notice.
    lab_cmd(&["del-pod", "again", "--name", &lab.name]);
    let second = add();
    assert_eq!(first, second, "the same veth name again");
    // Attached to the new interface of that name (a scan is at most 1 s away).
    let log = lab.dir.join("agent-node-a.log");
    let attaches = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(&format!("attached pod programs to {second} "))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while attaches() < 2 {
        assert!(std::time::Instant::now() < deadline, "not attached again");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(attached(3.0));
    assert!(curl_web(&lab, "again", 5).status.success());
    let rs = recorded_from("10.244.1.78", 0);
    let r = find(&rs, |r| r["pre_dnat"]["src"] == "10.244.1.78")[0];
    assert_eq!(
        hop(r, "pod_ingress", "orig").unwrap()["iface"],
        second.as_str()
    );

    // The uplink goes down and up under the agent: its programs stay attached. The kernel drops
    // the routes through it when it goes down; they are put back as a node's network agent would.
    let routes = lab.exec("node-a", &["ip", "route", "show"]).unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    for state in ["down", "up"] {
        lab.exec("node-a", &["ip", "link", "set", "eth0", state])
            .unwrap();
    }
    for route in routes.lines().filter(|r| r.contains("dev eth0")) {
        let mut args = vec!["ip", "route", "replace"];
        args.extend(route.split_whitespace());
        lab.exec("node-a", &args).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = find(&rs, |r| r["pre_dnat"]["src"] == "10.244.1.78").len();
    let deadline = std::time::Instant::now() + WAIT;
    while !curl_web(&lab, "again", 3).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "no traffic after the flap"
        );
    }
    let rs = recorded_from("10.244.1.78", before);
    let r = find(&rs, |r| r["pre_dnat"]["src"] == "10.244.1.78")
        .into_iter()
        .last()
        .unwrap();
    assert!(hop(r, "uplink_egress", "orig").is_some(), "{r:#}");

    // The node-side veth moved into another namespace (here the pod's own): gone from the
    // node, so forgotten, and its programs with it.
    lab.exec(
        "node-a",
        &["ip", "link", "set", &second, "netns", &lab.ns("again")],
    )
    .unwrap();
    assert!(attached(2.0), "the moved veth was forgotten");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.matches(&format!("{second} went away")).count() >= 2,
        "{text}"
    );
    lab_cmd(&["del-pod", "again", "--name", &lab.name]);
}

/// The first final record of `node` whose `tuple` (`pre_dnat`, `post_dnat`) goes to `dport`,
/// waited for.
fn final_record(lab: &LabRun, node: &str, tuple: &str, dport: u16) -> serde_json::Value {
    let is = |r: &serde_json::Value| r["final"] == true && r[tuple]["dport"] == dport;
    let recs = lab
        .wait_records(node, WAIT, |rs| rs.iter().any(is))
        .unwrap();
    recs.into_iter().find(|r| is(r)).unwrap()
}

#[test]
fn pod_interfaces_are_found_whatever_the_cni_names_them() {
    // The lab names pods' veths as Calico does (cali + 11 hex digits).
    let story =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/story.toml")).unwrap();
    let mut lab = lab("cni", Some(&format!("pod_ifaces = \"calico\"\n{story}")));
    let cali = |pod: &str| observer_lab::model::PodIfaceNames::Calico.host_veth(pod);
    let names = lab.names_file().to_string_lossy().into_owned();
    for node in ["node-a", "node-b"] {
        // No --pod-iface: the default finds them.
        lab.start_agent(node, &["--idle-timeout", "1s", "--names", &names])
            .unwrap();
    }
    let log = std::fs::read_to_string(lab.dir.join("agent-node-a.log")).unwrap();
    assert!(
        log.contains(&format!("{:?}", cali("pod-a")))
            && log.contains(&format!("{:?}", cali("pod-api-1"))),
        "the agent says which pod interfaces it found: {log}"
    );
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let r = final_record(&lab, "node-a", "pre_dnat", 443);
    assert_eq!(
        hop(&r, "pod_ingress", "orig").unwrap()["iface"],
        cali("pod-a"),
        "{r:#}"
    );
    let r = final_record(&lab, "node-b", "post_dnat", 8443);
    assert_eq!(
        hop(&r, "pod_egress", "orig").unwrap()["iface"],
        cali("pod-b"),
        "{r:#}"
    );
    assert_eq!(
        r["observed_as"], "receiver",
        "node-b knows pod-b as its own pod: {r:#}"
    );
}

/// An agent started the way people start one in a namespace, `ip netns exec NS observer agent`
/// (which mounts a sysfs of its own over /sys, hiding the cgroup v2 mount): it finds the host's
/// cgroup hierarchy itself, and its socket hooks name the process.
#[test]
fn an_agent_under_ip_netns_exec_finds_the_cgroup_hierarchy_itself() {
    struct Agent(std::process::Child);
    impl Drop for Agent {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let lab = lab("nsexec", None);
    let cgroup2_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .matches(" - cgroup2 ")
        .count();
    let flow_log = lab.dir.join("node-a.jsonl");
    let log = lab.dir.join("agent-node-a.log");
    let agent = Agent(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns("node-a")])
            .arg(bin())
            .args([
                "agent",
                "--node",
                "node-a",
                "--no-pin",
                "--idle-timeout",
                "1s",
            ])
            .args(["--metrics-addr", "127.0.0.1:9464", "--flow-log"])
            .arg(&flow_log)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while !lab
        .http("node-a", "/readyz")
        .is_ok_and(|b| b.contains("ready"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let said = std::fs::read_to_string(&log).unwrap();
    // The host's hierarchy through /proc/1/root where PID 1 lets us, else mounted privately.
    assert!(
        said.contains("using the host's: /proc/1/root/")
            || said.contains("mounted it on /sys/fs/cgroup in this process's own mount namespace"),
        "{said}"
    );
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    let r = final_record(&lab, "node-a", "pre_dnat", 443);
    assert_eq!(r["socket"]["comm"], "curl", "the socket hooks ran: {r:#}");
    drop(agent);
    let cgroup2_mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .matches(" - cgroup2 ")
            .count()
    };
    assert_eq!(
        cgroup2_mounts(),
        cgroup2_before,
        "nothing mounted in the host's namespace"
    );
}
