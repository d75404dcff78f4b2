//! `explain` on recorded flow logs: real records the lab's agents wrote (in `testdata/explain`,
//! one folder per situation), one test per verdict branch, through the same path as the command.

use std::path::PathBuf;

use serde_json::Value;

use super::*;

fn fixture(case: &str, nodes: &[&str]) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/explain")
        .join(case);
    nodes
        .iter()
        .map(|n| dir.join(format!("{n}.jsonl")))
        .collect()
}

fn args(files: Vec<PathBuf>, service: Option<&str>, client: Option<&str>) -> ExplainArgs {
    ExplainArgs {
        files,
        token_file: None,
        service: service.map(|s| s.parse().unwrap()),
        client: client.map(|c| c.parse().unwrap()),
        pod: None,
        names: None,
        format: Format::Json,
        all: false,
        discover: Default::default(),
    }
}

/// The verdict for one selected connection, as `explain --format json` prints it.
fn verdict(a: &ExplainArgs) -> Value {
    let v: Value = serde_json::from_str(&answer(a).expect("an answer")).expect("JSON");
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v:#}");
    v[0].clone()
}

const BOTH: &[&str] = &["node-a", "node-b"];

#[test]
fn answered_through_the_service() {
    let v = verdict(&args(
        fixture("answered", BOTH),
        Some("100.64.0.10:443"),
        None,
    ));
    assert_eq!(v["outcome"], "answered", "{v:#}");
    assert!(v["layer"].is_null());
}

/// A NodePort reached from outside: node-a translated and masqueraded it, so node-b's record has
/// another client endpoint (node-a's IP). The two are one story, joined by the wire tuple.
#[test]
fn a_masqueraded_nodeport_is_one_story_across_the_nodes() {
    let v = verdict(&args(fixture("nodeport", BOTH), None, Some("192.0.2.10")));
    assert_eq!(v["outcome"], "answered", "{v:#}");
    assert_eq!(v["asked"]["dport"], 30443);
    assert_eq!(v["backend"]["src"], "10.200.0.1", "masqueraded");
    assert_eq!(v["policy_view"]["receiver"]["node"], "node-b", "{v:#}");
    assert_eq!(v["policy_view"]["receiver"]["tuple"]["src"], "10.200.0.1");
}

#[test]
fn dropped_by_the_client_pods_egress_policy() {
    let v = verdict(&args(
        fixture("egress", BOTH),
        None,
        Some("10.244.1.10:38848"),
    ));
    assert_eq!(v["outcome"], "dropped", "{v:#}");
    assert_eq!(v["layer"], "network_policy_egress");
    assert_eq!(
        v["drop"]["sender"]["tuple"]["dport"], 8443,
        "policy saw the targetPort"
    );
    assert!(
        v["fix"]["network_policy"]
            .as_str()
            .unwrap()
            .contains("port: 8443"),
        "{v:#}"
    );
    // The later connection in the same logs, after the fix, was answered: the latest is chosen
    // when only the Service is selected.
    let v = verdict(&args(
        fixture("egress", BOTH),
        Some("100.64.0.10:443"),
        None,
    ));
    assert_eq!(v["outcome"], "answered");
}

#[test]
fn dropped_by_the_server_pods_ingress_policy_on_the_far_node() {
    let v = verdict(&args(
        fixture("ingress", BOTH),
        None,
        Some("10.244.1.10:51954"),
    ));
    assert_eq!(v["outcome"], "dropped", "{v:#}");
    assert_eq!(v["layer"], "network_policy_ingress");
    assert_eq!(v["last_seen"]["node"], "node-b");
}

#[test]
fn lost_between_the_nodes_is_the_firewall() {
    let v = verdict(&args(
        fixture("firewall", BOTH),
        None,
        Some("10.244.1.10:56176"),
    ));
    assert_eq!(v["outcome"], "lost_between_nodes", "{v:#}");
    assert_eq!(v["layer"], "firewall_between_nodes");
    assert!(
        v["fix"]["gcloud"].as_str().unwrap().contains("tcp:8443"),
        "{v:#}"
    );
}

#[test]
fn without_the_far_nodes_records_it_cannot_tell() {
    let v = verdict(&args(
        fixture("firewall", &["node-a"]),
        None,
        Some("10.244.1.10:56176"),
    ));
    assert_eq!(v["outcome"], "unknown", "{v:#}");
    assert!(v["layer"].is_null());
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("give the server node's records")
    );
}

#[test]
fn same_node_connection_is_one_local_record() {
    let v = verdict(&args(
        fixture("same-node", BOTH),
        None,
        Some("10.244.1.10:60910"),
    ));
    assert_eq!(v["outcome"], "answered", "{v:#}");
    assert_eq!(v["last_seen"]["node"], "node-a");
}

#[test]
fn ipv6_selectors_and_records() {
    let files = fixture("ipv6", BOTH);
    let v = verdict(&args(files.clone(), Some("[fd00:100:64::10]:443"), None));
    assert_eq!(v["outcome"], "answered", "{v:#}");
    let by_client = verdict(&args(
        files.clone(),
        None,
        Some("[fd00:10:244:1::10]:56200"),
    ));
    assert_eq!(by_client["outcome"], "answered");
    // A bare IPv6 address selects by address alone, bracketed or not.
    for s in ["fd00:100:64::10", "[fd00:100:64::10]"] {
        let mut a = args(files.clone(), Some(s), None);
        a.all = true;
        let all: Value = serde_json::from_str(&answer(&a).unwrap()).unwrap();
        assert_eq!(
            all.as_array().unwrap().len(),
            2,
            "{s}: both IPv6 connections"
        );
    }
}

#[test]
fn selectors_refuse_what_is_not_an_endpoint() {
    for bad in [
        "100.64.0.10:http",
        "fd00::10:443:x",
        "[fd00::10]:99999",
        "web",
    ] {
        let e = Endpoint::parse(bad).unwrap_err();
        assert!(e.contains("[IPv6]:PORT"), "{bad}: {e}");
    }
    let e = answer(&args(
        fixture("answered", BOTH),
        Some("100.64.0.99:443"),
        None,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("no connection in"), "{e}");
}

#[test]
fn a_service_without_endpoints_is_the_service_layer_not_policy() {
    // kube-proxy rejected it in filter FORWARD before any DNAT: the drop tuple is the Service's.
    let v = verdict(&args(
        fixture("service-layer", BOTH),
        Some("100.64.0.30:80"),
        None,
    ));
    assert_eq!(v["outcome"], "dropped", "{v:#}");
    assert_eq!(v["layer"], "service");
    assert_eq!(v["fix"]["kind"], "service");
    assert!(
        v["fix"]["network_policy"].is_null(),
        "no policy can fix it: {v:#}"
    );
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("payments/orders")
    );
    // The same logs still explain the answered connection beside it.
    let v = verdict(&args(
        fixture("service-layer", BOTH),
        Some("100.64.0.10:443"),
        None,
    ));
    assert_eq!(v["outcome"], "answered");
}

#[test]
fn an_open_connection_is_told_from_its_newest_interim_record() {
    // The agent stopped (a restart) while the connection was open: only interim records.
    let v = verdict(&args(
        fixture("open", &["node-a"]),
        None,
        Some("10.244.1.10:59834"),
    ));
    assert_eq!(v["open"], true, "{v:#}");
    assert_eq!(v["outcome"], "answered", "answered so far: {v:#}");
    // In the whole log the final record came later and is the one told.
    let v = verdict(&args(
        fixture("restart", &["node-a"]),
        None,
        Some("10.244.1.10:59834"),
    ));
    assert_eq!(v["open"], false, "{v:#}");
    let mut a = args(
        fixture("open", &["node-a"]),
        None,
        Some("10.244.1.10:59834"),
    );
    a.format = Format::Text;
    let text = answer(&a).unwrap();
    assert!(
        text.contains("still open when its agent last wrote"),
        "{text}"
    );
}

#[test]
fn a_line_cut_short_is_skipped_and_reported_and_the_rest_answers() {
    let files = fixture("cut-short", BOTH);
    let loaded = load(&files, None).expect("the rest is read");
    assert_eq!(loaded.skipped.len(), 1, "{:?}", loaded.skipped);
    let (file, line) = &loaded.skipped[0];
    assert!(file.ends_with("cut-short/node-a.jsonl"));
    assert_eq!(*line, 2, "the line cut short");
    let v = verdict(&args(files, Some("100.64.0.10:443"), None));
    assert_eq!(v["outcome"], "answered");
}

#[test]
fn a_record_of_another_schema_version_is_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("observer-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("future.jsonl");
    std::fs::write(&path, "{\"schema\":\"observer.flow/v9\",\"node\":\"n\"}\n").unwrap();
    let e = load(&[path], None).unwrap_err().to_string();
    assert!(
        e.contains("\"observer.flow/v9\"") && e.contains("future.jsonl:1"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Logs written by agents of schema v1 (the recorded fixtures) are still read, next to v2 ones.
#[test]
fn records_of_schema_v1_are_still_read() {
    let files = fixture("answered", &["node-a", "node-b"]);
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(text.contains("\"schema\":\"observer.flow/v1\""));
    let loaded = load(&files, None).unwrap();
    assert!(!loaded.records.is_empty() && loaded.skipped.is_empty());
    let t = loaded
        .records
        .iter()
        .find_map(|r| r.translation.as_ref())
        .expect("a translated record");
    assert_eq!(t.kind, "dnat", "v1 records translated the destination only");
    assert_eq!(t.mechanism, None);
}

mod fuzz {
    //! What a user or a dying node can put in a flow log, and what a user can type as a
    //! selector: never a panic, every line either a record or reported.

    use proptest::prelude::*;

    use super::*;

    fn recorded_lines() -> Vec<String> {
        ["egress", "ipv6", "open"]
            .iter()
            .flat_map(|case| fixture(case, &["node-a"]))
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A recorded line, cut at any byte, with any bytes spliced in, or left whole.
    fn line() -> impl Strategy<Value = (String, bool)> {
        let lines = recorded_lines();
        (
            0..lines.len(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..8),
            0..3u8,
        )
            .prop_map(move |(i, at, junk, how)| {
                let l = &lines[i];
                let cut = (at as usize) % l.len().max(1);
                match how {
                    0 => (l.clone(), true),
                    1 => (
                        String::from_utf8_lossy(&l.as_bytes()[..cut]).into_owned(),
                        false,
                    ),
                    _ => {
                        let mut b = l.as_bytes()[..cut].to_vec();
                        b.extend(junk);
                        b.extend(&l.as_bytes()[cut..]);
                        (String::from_utf8_lossy(&b).into_owned(), false)
                    }
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn damaged_logs_are_read_line_by_line(lines in prop::collection::vec(line(), 1..12)) {
            let dir = std::env::temp_dir().join(format!("observer-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("node-a.jsonl");
            let text: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
            let text = text.join("\n");
            std::fs::write(&path, &text).unwrap();
            let whole = lines.iter().filter(|(_, w)| *w).count();
            // Spliced bytes may hold a line break: count the lines the file has.
            let (all, blank) = (
                text.lines().count(),
                text.lines().filter(|l| l.trim().is_empty()).count(),
            );
            match load(std::slice::from_ref(&path), None) {
                Ok(got) => {
                    // A damaged line may still be a record (junk inside a string); never fewer.
                    prop_assert!(got.records.len() >= whole);
                    prop_assert_eq!(got.records.len() + got.skipped.len() + blank, all);
                }
                // Only a readable record of another schema version refuses the whole log.
                Err(e) => prop_assert!(e.to_string().contains("a record of schema"), "{e}"),
            }
        }

        #[test]
        fn selectors_parse_or_say_what_they_take(s in "\\PC{0,40}") {
            if let Err(e) = Endpoint::parse(&s) {
                prop_assert!(e.contains("[IPv6]:PORT"));
            }
        }

        #[test]
        fn every_socket_address_is_a_selector(a in any::<std::net::SocketAddr>()) {
            let e = Endpoint::parse(&a.to_string()).unwrap();
            prop_assert_eq!((e.ip, e.port), (a.ip(), Some(a.port())));
        }
    }
}

/// Recorded with the filter hooks (schema v3): pod-a -> pod-api-1 on the same node, dropped by
/// pod-api-1's ingress policy (lab/scenarios/api-ingress-deny.yaml), and node-a itself calling
/// the Service with an OUTPUT rule dropping the backend. The hook, not the drop reason alone,
/// decides the layer.
#[test]
fn a_same_node_policy_drop_names_both_policies() {
    let v = verdict(&args(
        fixture("filter-hooks", BOTH),
        None,
        Some("10.244.1.10"),
    ));
    assert_eq!(v["outcome"], "dropped", "{v:#}");
    assert_eq!(
        v["layer"], "network_policy",
        "the hook cannot tell egress from ingress"
    );
    assert_eq!(v["last_seen"]["point"], "filter_forward");
    let yaml = v["fix"]["network_policy"].as_str().unwrap();
    assert!(
        yaml.contains("Egress") && yaml.contains("Ingress"),
        "{yaml}"
    );
    assert!(v["explanation"].as_str().unwrap().contains("measured"));
}

#[test]
fn a_drop_at_filter_output_is_the_hosts_firewall() {
    let v = verdict(&args(
        fixture("filter-hooks", BOTH),
        None,
        Some("10.200.0.1"),
    ));
    assert_eq!(v["outcome"], "dropped", "{v:#}");
    assert_eq!(v["layer"], "host_firewall_egress");
    assert_eq!(
        v["asked"]["dport"], 443,
        "conntrack's original: the Service"
    );
    assert_eq!(v["fix"]["kind"], "host_firewall");
    assert!(
        v["fix"]["summary"]
            .as_str()
            .unwrap()
            .contains("10.244.2.10:8443")
    );
}

/// Flow logs of a test's own, removed when it ends.
struct Edited(PathBuf);

impl Drop for Edited {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The filter-hooks fixture with each record passed through `edit`, written to a folder of the
/// test's own: for the branches no recording of the lab produces.
fn edited(name: &str, edit: impl Fn(&mut Value)) -> (Edited, Vec<PathBuf>) {
    let dir = std::env::temp_dir().join(format!("observer-explain-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = fixture("filter-hooks", BOTH)
        .iter()
        .map(|f| {
            let text: String = std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: Value = serde_json::from_str(l).unwrap();
                    edit(&mut v);
                    format!("{v}\n")
                })
                .collect();
            let out = dir.join(f.file_name().unwrap());
            std::fs::write(&out, text).unwrap();
            out
        })
        .collect();
    (Edited(dir), files)
}

fn is_pod_a(v: &Value) -> bool {
    v["pre_dnat"]["src"] == "10.244.1.10"
}

/// A netfilter drop the filter hooks saw go through the filter table: another table or another
/// priority dropped it, not NetworkPolicy.
#[test]
fn a_netfilter_drop_the_filter_table_let_through_is_elsewhere() {
    let (_dir, files) = edited("passed", |v| {
        if is_pod_a(v) {
            v["policy_view"]["passed"] = v["policy_view"]["packets"].clone();
            v["policy_view"]["verdict"] = "passed".into();
        }
    });
    let v = verdict(&args(files, None, Some("10.244.1.10")));
    assert_eq!(v["layer"], "netfilter", "{v:#}");
    assert!(v["fix"].is_null());
}

#[test]
fn a_drop_at_filter_input_is_the_hosts_firewall_for_its_own_processes() {
    let (_dir, files) = edited("input", |v| {
        if v["pre_dnat"]["src"] == "10.200.0.1" {
            v["policy_view"]["hook"] = "input".into();
        }
    });
    let v = verdict(&args(files, None, Some("10.200.0.1")));
    assert_eq!(v["layer"], "host_firewall_ingress", "{v:#}");
    assert!(v["fix"]["inspect"].as_str().unwrap().contains("INPUT"));
}

/// With the rule the kernel's trace named, a same-node drop is no longer "either policy".
#[test]
fn a_traced_rule_tells_whose_policy_dropped_a_same_node_connection() {
    let (_dir, files) = edited("rule", |v| {
        if is_pod_a(v) {
            v["drop"]["rule"] = serde_json::json!({
                "table": "ip filter",
                "chain": "OBS-TW-pod-api-1",
                "rule": "-A OBS-TW-pod-api-1 -m comment --comment \"default deny: ingress policies select payments/pod-api-1\" -j DROP",
                "comment": "default deny: ingress policies select payments/pod-api-1"
            });
        }
    });
    let v = verdict(&args(files, None, Some("10.244.1.10")));
    assert_eq!(v["layer"], "network_policy_ingress", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains("OBS-TW-pod-api-1") && why.contains("default deny"),
        "{why}"
    );
    let yaml = v["fix"]["network_policy"].as_str().unwrap();
    assert!(
        yaml.contains("Ingress") && !yaml.contains("Egress"),
        "{yaml}"
    );
}

/// A rule in kube-proxy's own chains is the Service layer, whatever the hook.
#[test]
fn a_rule_of_kube_proxys_own_is_the_service_layer() {
    let (_dir, files) = edited("kube-proxy", |v| {
        if is_pod_a(v) {
            v["drop"]["rule"] = serde_json::json!({
                "table": "ip kube-proxy",
                "chain": "cluster-ips-check",
                "rule": "ip daddr @cluster-ips reject",
            });
        }
    });
    let v = verdict(&args(files, None, Some("10.244.1.10")));
    assert_eq!(v["layer"], "service", "{v:#}");
    assert!(
        v["explanation"]
            .as_str()
            .unwrap()
            .contains("cluster-ips-check")
    );
}
