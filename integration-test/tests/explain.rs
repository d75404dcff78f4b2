//! `observer explain` and `observer suggest` on records from the real lab: for each shipped
//! scenario the right layer and fix, and the fix applied to the lab makes the same request work.

use std::{path::Path, process::Command, time::Duration};

use integration_test::*;
use serde_json::Value;

fn explain(lab: &LabRun, format: &str) -> String {
    let a = lab.dir.join("node-a.jsonl");
    let b = lab.dir.join("node-b.jsonl");
    observer(&[
        "explain",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--service",
        "100.64.0.10:443",
        "--names",
        &lab.names_file().to_string_lossy(),
        "--format",
        format,
    ])
}

/// Run an `nft` command explain suggested in the lab's VPC router.
fn apply_in_vpc(lab: &LabRun, nft: &str) {
    let vpc = lab.ns("vpc");
    let mut args = vec!["netns", "exec", vpc.as_str()];
    args.extend(nft.split_whitespace());
    let out = Command::new("ip").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{nft}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Request the story's Service, expect failure, wait until both agents wrote its records,
/// and return `explain --format json` for it.
fn failing_request(lab: &LabRun) -> Value {
    assert!(
        !curl_web(lab, "pod-a", 2).status.success(),
        "the scenario should block the request"
    );
    let before = lab.records("node-a").unwrap().len();
    lab.wait_records("node-a", WAIT, |rs| {
        rs.len() > before
            || rs
                .iter()
                .any(|r| r["final"] == true && r["state"] == "syn_sent")
    })
    .unwrap();
    // The receiving node, if reached, closes its record after the same idle time.
    std::thread::sleep(Duration::from_millis(2500));
    let v: Value = serde_json::from_str(&explain(lab, "json")).unwrap();
    v[0].clone()
}

#[test]
fn egress_policy_on_the_service_port_is_explained_and_fixed() {
    let token = flows_token_file();
    let lab = lab_with_agent_args(
        "xeg",
        "2s",
        None,
        &[
            "--trace-drop-rules",
            "--flows-addr",
            FLOWS_ADDR,
            "--flows-token-file",
            &token,
        ],
    );
    apply(&lab, &scenario("egress-service-port"));
    let v = failing_request(&lab);
    assert_eq!(v["outcome"], "dropped");
    assert_eq!(v["layer"], "network_policy_egress");
    assert_eq!(v["last_seen"]["node"], "node-a");
    assert_eq!(v["policy_view"]["sender"]["tuple"]["dport"], 8443);
    assert_eq!(v["drop"]["sender"]["reason"], "NETFILTER_DROP");
    assert_eq!(v["drop"]["sender"]["point"], "netfilter");
    // The rule, named by the kernel's trace of curl's retransmitted SYN.
    let rule = &v["drop"]["sender"]["rule"];
    assert_eq!(rule["chain"], "OBS-FW-pod-a", "{v:#}");
    assert_eq!(
        rule["comment"],
        "default deny: egress policies select shop/pod-a"
    );
    assert!(v["explanation"].as_str().unwrap().contains("OBS-FW-pod-a"));
    // The same verdict from the agent's own endpoint (inside node-a) and selected by pod name.
    let out = explain_in(
        &lab,
        "node-a",
        &[
            &format!("http://{FLOWS_ADDR}/flows"),
            "--token-file",
            &token,
            "--pod",
            "pod-a",
            "--names",
            &lab.names_file().to_string_lossy(),
            "--format",
            "json",
        ],
    );
    let from_http: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(from_http[0]["layer"], "network_policy_egress");
    assert_eq!(
        from_http[0]["fix"]["network_policy"],
        v["fix"]["network_policy"]
    );
    let np = v["fix"]["network_policy"]
        .as_str()
        .expect("a NetworkPolicy fix");
    assert!(
        np.contains("port: 8443") && np.contains("namespace: shop"),
        "{np}"
    );
    assert!(
        !np.contains("port: 443\n") && !np.contains("100.64."),
        "never the Service port or IP: {np}"
    );
    // Closed loop: the scenario plus the suggested policy lets the same request through.
    let fixed = lab.dir.join("fixed.yaml");
    std::fs::write(
        &fixed,
        std::fs::read_to_string(scenario("egress-service-port")).unwrap() + np,
    )
    .unwrap();
    apply(&lab, fixed.to_str().unwrap());
    assert!(curl_web(&lab, "pod-a", 5).status.success(), "the fix works");

    wait_answered(&lab);
    let text = explain(&lab, "text");
    assert!(text.contains("outcome:   answered"), "{text}");
}

#[test]
fn ingress_policy_is_explained_on_the_receiving_node_and_fixed() {
    let lab = lab_with_agent_args("xin", "2s", None, &["--trace-drop-rules"]);
    apply(&lab, &scenario("ingress-deny"));
    let v = failing_request(&lab);
    assert_eq!(v["layer"], "network_policy_ingress");
    assert_eq!(v["last_seen"]["node"], "node-b");
    assert_eq!(v["drop"]["receiver"]["node"], "node-b");
    let rule = &v["drop"]["receiver"]["rule"];
    assert_eq!(rule["chain"], "OBS-TW-pod-b", "{v:#}");
    assert_eq!(
        rule["comment"],
        "default deny: ingress policies select payments/pod-b"
    );
    assert_eq!(v["policy_view"]["receiver"]["tuple"]["dport"], 8443);
    assert_eq!(v["wire_view"]["sender"]["dport"], 8443);
    let np = v["fix"]["network_policy"]
        .as_str()
        .expect("a NetworkPolicy fix");
    assert!(
        np.contains("namespace: payments") && np.contains("ingress:") && np.contains("port: 8443"),
        "{np}"
    );
    assert!(np.contains("kubernetes.io/metadata.name: shop"), "{np}");
    let fixed = lab.dir.join("fixed.yaml");
    std::fs::write(
        &fixed,
        std::fs::read_to_string(scenario("ingress-deny")).unwrap() + np,
    )
    .unwrap();
    apply(&lab, fixed.to_str().unwrap());
    assert!(curl_web(&lab, "pod-a", 5).status.success(), "the fix works");
}

#[test]
fn firewall_without_the_target_port_is_explained_and_fixed() {
    let lab = lab_with_agents("xfw", "2s");
    apply(&lab, &scenario("firewall-without-8443"));
    let v = failing_request(&lab);
    assert_eq!(v["outcome"], "lost_between_nodes");
    assert_eq!(v["layer"], "firewall_between_nodes");
    assert_eq!(v["last_seen"]["point"], "uplink_egress");
    assert_eq!(v["wire_view"]["sender"]["dport"], 8443);
    let fix = &v["fix"];
    assert!(
        fix["gcloud"]
            .as_str()
            .unwrap()
            .contains("--rules=tcp:8443 --source-ranges=10.244.0.0/16"),
        "{fix}"
    );
    let nft = fix["nft"].as_str().unwrap();
    assert!(nft.contains("tcp dport 8443 accept"));
    // Closed loop: the suggested nft rule in the lab's VPC.
    apply_in_vpc(&lab, nft);
    assert!(curl_web(&lab, "pod-a", 5).status.success(), "the fix works");

    wait_answered(&lab);
    let m = explain(&lab, "mermaid");
    assert!(m.starts_with("sequenceDiagram\n"), "{m}");
    assert!(m.contains("S-->>C: reply"), "{m}");
}

#[test]
fn allowed_story_and_target_port_policy_are_answered() {
    let lab = lab_with_agents("xok", "2s");
    // Both fixed scenarios at once: the targetPort in the policy and in the VPC firewall.
    let both = lab.dir.join("both.yaml");
    std::fs::write(
        &both,
        std::fs::read_to_string(scenario("egress-target-port")).unwrap()
            + "---\n"
            + &std::fs::read_to_string(scenario("firewall-with-8443")).unwrap(),
    )
    .unwrap();
    apply(&lab, both.to_str().unwrap());
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_answered(&lab);
    let v: Value = serde_json::from_str(&explain(&lab, "json")).unwrap();
    assert_eq!(v[0]["outcome"], "answered");
    assert_eq!(v[0]["backend"]["dport"], 8443);
    assert!(v[0]["fix"].is_null());
    let steps: Vec<&str> = v[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "app asked",
            "pre-DNAT",
            "DNAT",
            "policy egress saw",
            "on the wire",
            "arrived",
            "policy ingress saw",
            "delivered"
        ]
    );
}

#[test]
fn suggested_policies_allow_exactly_the_observed_flows() {
    let lab = lab_with_agents("xsg", "2s");
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_answered(&lab);
    let a = lab.dir.join("node-a.jsonl");
    let b = lab.dir.join("node-b.jsonl");
    let yaml = observer(&[
        "suggest",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--names",
        &lab.names_file().to_string_lossy(),
    ]);
    assert!(
        yaml.contains("name: observed-pod-a-to-pod-b")
            && yaml.contains("name: observed-pod-b-from-pod-a"),
        "{yaml}"
    );
    assert!(
        yaml.contains("port: 8443") && !yaml.contains("port: 443\n"),
        "{yaml}"
    );
    let file = lab.dir.join("suggested.yaml");
    std::fs::write(&file, &yaml).unwrap();
    apply(&lab, file.to_str().unwrap());
    // The observed flow still works; an unobserved one (pod-a -> DNS) is now denied.
    assert!(
        curl_web(&lab, "pod-a", 5).status.success(),
        "observed flow allowed"
    );
    let s = lab
        .client(
            "pod-a",
            &[
                "--to",
                "100.64.0.53:53",
                "--proto",
                "udp",
                "--timeout",
                "1s",
            ],
        )
        .unwrap();
    assert_eq!(s["ok"], 0, "unobserved flow denied: {s}");
    assert!(Path::new(&file).exists());
}

#[test]
fn a_service_without_endpoints_is_the_service_layer_not_a_policy() {
    let lab = lab_with_agent_args("xsvc", "2s", None, &["--trace-drop-rules"]);
    // kube-proxy's REJECT answers at once, so no SYN is retransmitted: the second attempt is the
    // one the kernel's trace sees, and names the rule.
    for _ in 0..2 {
        let out = lab
            .exec(
                "pod-a",
                &["curl", "-sS", "-m", "3", "http://100.64.0.30:80/"],
            )
            .unwrap();
        assert!(
            !out.status.success(),
            "kube-proxy rejects a Service without endpoints"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.wait_records("node-a", WAIT, |rs| {
        rs.iter().any(|r| {
            r["final"] == true
                && r["pre_dnat"]["dst"] == "100.64.0.30"
                && !r["drop"]["rule"].is_null()
        })
    })
    .unwrap();
    let a = lab.dir.join("node-a.jsonl");
    let b = lab.dir.join("node-b.jsonl");
    let v: Value = serde_json::from_str(&observer(&[
        "explain",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--service",
        "100.64.0.30:80",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(v[0]["layer"], "service", "{v:#}");
    assert_eq!(
        v[0]["drop"]["sender"]["tuple"]["dst"], "100.64.0.30",
        "never translated"
    );
    assert_eq!(v[0]["fix"]["kind"], "service");
    let rule = &v[0]["drop"]["sender"]["rule"];
    assert_eq!(rule["chain"], "KUBE-SERVICES", "{v:#}");
    assert!(
        rule["comment"]
            .as_str()
            .unwrap()
            .ends_with("has no endpoints"),
        "kube-proxy's comment names the Service: {rule}"
    );
    assert!(
        v[0]["explanation"]
            .as_str()
            .unwrap()
            .contains("has no endpoints")
    );
}

#[test]
fn explain_answers_while_the_client_still_retries() {
    let mut lab = lab("xopen", None);
    let names = lab.names_file().to_string_lossy().into_owned();
    let token = flows_token_file();
    for node in ["node-a", "node-b"] {
        lab.start_agent(
            node,
            &[
                "--flush-interval",
                "1s",
                "--poll-interval",
                "200ms",
                "--names",
                &names,
                "--flows-addr",
                FLOWS_ADDR,
                "--flows-token-file",
                &token,
            ],
        )
        .expect("agent starts");
    }
    apply(&lab, &scenario("egress-service-port"));
    // curl keeps retrying its SYN for 20 s; the agent writes interim records every second.
    let mut curl = Command::new("ip")
        .args(["netns", "exec", &lab.ns("pod-a")])
        .args(["curl", "-sS", "-m", "20", "http://100.64.0.10:443/"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bin_path = bin().to_string_lossy().into_owned();
    let ask = || {
        lab.exec(
            "node-a",
            &[
                &bin_path,
                "explain",
                &format!("http://{FLOWS_ADDR}/flows"),
                "--token-file",
                &token,
                "--service",
                "100.64.0.10:443",
                "--names",
                &names,
                "--format",
                "json",
            ],
        )
        .unwrap()
    };
    let deadline = std::time::Instant::now() + WAIT;
    let v = loop {
        let out = ask();
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer from the agent's /flows: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        curl.try_wait().unwrap().is_none(),
        "asked while curl still ran"
    );
    let _ = curl.kill();
    let _ = curl.wait();
    assert_eq!(v[0]["open"], true, "{v:#}");
    assert_eq!(v[0]["outcome"], "dropped", "{v:#}");
    assert_eq!(v[0]["layer"], "network_policy_egress");
}

/// A NodePort reached from outside, through a VPC firewall that admits the client to the
/// NodePort but not the node network to the pod: kube-proxy masqueraded the connection, so the
/// wire between the nodes carries node-a's IP, and a rule for the pod range (or for the client)
/// would not help. explain names the source the firewall really saw, and its rule works.
#[test]
fn masqueraded_nodeport_blocked_between_nodes_gets_a_rule_for_the_node_network() {
    let lab = lab_with_agents("xnport", "2s");
    let fw = lab.dir.join("firewall.yaml");
    let text = std::fs::read_to_string(scenario("firewall-nodeport")).unwrap();
    let without_nodes = text
        .split("  - name: allow-nodes-to-pods")
        .next()
        .unwrap()
        .to_owned();
    std::fs::write(&fw, without_nodes).unwrap();
    apply(&lab, fw.to_str().unwrap());
    let curl = |t: &str| {
        lab.exec(
            "outside",
            &["curl", "-sS", "-m", t, "http://10.200.0.1:30443/"],
        )
        .unwrap()
        .status
        .success()
    };
    assert!(!curl("2"), "the firewall should stop it between the nodes");
    lab.wait_records("node-a", WAIT, |rs| {
        rs.iter()
            .any(|r| r["final"] == true && r["pre_dnat"]["src"] == "192.0.2.10")
    })
    .unwrap();
    let out = observer(&[
        "explain",
        lab.dir.join("node-a.jsonl").to_str().unwrap(),
        lab.dir.join("node-b.jsonl").to_str().unwrap(),
        "--client",
        "192.0.2.10",
        "--names",
        &lab.names_file().to_string_lossy(),
        "--format",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let v = &v[0];
    assert_eq!(v["outcome"], "lost_between_nodes", "{v:#}");
    assert_eq!(v["wire_view"]["sender"]["src"], "10.200.0.1");
    let fix = &v["fix"];
    let gcloud = fix["gcloud"].as_str().unwrap();
    assert!(
        gcloud.contains("--rules=tcp:8443 --source-ranges=10.200.0.1/32,10.200.0.2/32"),
        "{fix}"
    );
    assert!(
        fix["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("masqueraded")
            || fix.to_string().contains("masqueraded"),
        "{fix}"
    );
    apply_in_vpc(&lab, fix["nft"].as_str().unwrap());
    assert!(curl("5"), "the fix works");
}

/// The HTTP status of GET `url` from inside `node`, with `token` as bearer if given.
#[test]
fn flow_records_are_served_only_on_their_own_listener_and_only_with_the_token() {
    // Asked for without a token file, the agent refuses to start.
    let out = std::process::Command::new(bin())
        .args(["agent", "--flows-addr", "127.0.0.1:9465"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--flows-token-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut lab = lab("xflows", None);
    let token = flows_token_file();
    lab.start_agent(
        "node-a",
        &["--flows-addr", FLOWS_ADDR, "--flows-token-file", &token],
    )
    .expect("agent starts");
    let flows = format!("http://{FLOWS_ADDR}/flows");
    let secret = std::fs::read_to_string(&token).unwrap();
    // Not on the metrics listener any more; on its own, only with the token.
    assert_eq!(
        http_status(&lab, "node-a", "http://127.0.0.1:9464/flows", None),
        "404"
    );
    assert_eq!(http_status(&lab, "node-a", &flows, None), "401");
    assert_eq!(
        http_status(&lab, "node-a", &flows, Some("lab-flows-token-0123456788")),
        "401"
    );
    assert_eq!(
        http_status(&lab, "node-a", &flows, Some(secret.trim())),
        "200"
    );
    let m = lab.metrics("node-a").unwrap();
    assert_eq!(
        metric(
            &m,
            "observer_flows_requests_total",
            &[("outcome", "unauthorized")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "observer_flows_requests_total",
            &[("outcome", "served")]
        ),
        Some(1.0)
    );
    // explain without the token says what is missing.
    let bin_path = bin().to_string_lossy().into_owned();
    let out = lab
        .exec(
            "node-a",
            &[&bin_path, "explain", &flows, "--format", "json"],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--token-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
