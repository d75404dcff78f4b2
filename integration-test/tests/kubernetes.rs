//! Kubernetes names from a real kube-apiserver (built from Debian's source package by
//! `cargo xtask test`): records carry the pods' and the Service's names, the watch follows
//! changes, and the deploy manifests pass a server-side dry run.

use std::time::Duration;

use integration_test::kube::KubeApi;
use integration_test::*;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: storefront}}
---
apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend-7d9, namespace: shop, labels: {app: frontend}}
spec: {nodeName: node-a, containers: [{name: c, image: example.invalid/none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-5f6, namespace: payments, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: c, image: example.invalid/none, ports: [{name: https, containerPort: 8443}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: payments}
spec:
  clusterIP: 100.64.0.10
  selector: {app: web}
  ports: [{name: https, port: 443, targetPort: https, protocol: TCP}]
"#;

fn api(lab: &LabRun, slot: u16) -> KubeApi {
    let api = KubeApi::start(
        &lab.dir.join("kube"),
        slot + (std::process::id() % 50) as u16,
    )
    .expect("kube-apiserver starts");
    api.kubectl(&["apply", "-f", "-"], Some(OBJECTS)).unwrap();
    // No kubelet here: publish the pods' IPs (those of the lab's pods) through the status.
    for (ns, pod, ip) in [
        ("shop", "frontend-7d9", "10.244.1.10"),
        ("payments", "web-5f6", "10.244.2.10"),
    ] {
        let patch = format!(r#"{{"status":{{"podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
        api.kubectl(
            &[
                "-n",
                ns,
                "patch",
                "pod",
                pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
            None,
        )
        .unwrap();
    }
    api
}

#[test]
fn records_carry_kubernetes_names_from_the_api() {
    let mut lab = lab("k8s", None);
    let api = api(&lab, 0);
    let kubeconfig = api.kubeconfig.to_string_lossy().into_owned();
    for node in ["node-a", "node-b"] {
        lab.start_agent(node, &["--idle-timeout", "2s", "--kubeconfig", &kubeconfig])
            .unwrap();
    }
    let log = std::fs::read_to_string(lab.dir.join("agent-node-a.log")).unwrap();
    assert!(!log.contains("ERROR"), "{log}");
    // The watch lists asynchronously; wait for it.
    let listed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(lab.dir.join("agent-node-a.log"))
            .unwrap()
            .contains("services listed")
    });
    assert!(listed);
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    wait_answered(&lab);
    let a = lab.records("node-a").unwrap();
    let r = find(&a, |r| r["pre_dnat"]["dport"] == 443 && r["final"] == true)[0];
    assert_eq!(r["src_pod"]["name"], "frontend-7d9");
    assert_eq!(r["src_pod"]["namespace"], "shop");
    assert_eq!(r["src_pod"]["node"], "node-a");
    assert_eq!(
        r["src_pod"]["namespace_labels"]["team"], "storefront",
        "from the Namespace watch"
    );
    assert_eq!(r["dst_pod"]["name"], "web-5f6");
    assert_eq!(r["dst_pod"]["labels"]["app"], "web");
    assert_eq!(r["service"]["name"], "web");
    assert_eq!(r["service"]["namespace"], "payments");
    assert_eq!(r["service"]["port_name"], "https");
    assert_eq!(
        r["service"]["target_port"], 8443,
        "a named targetPort, resolved by what DNAT did"
    );
    let b = lab.records("node-b").unwrap();
    let rb = find(&b, |r| {
        r["post_dnat"]["dport"] == 8443 && r["final"] == true
    })[0];
    assert_eq!(rb["src_pod"]["name"], "frontend-7d9");
    assert_eq!(rb["dst_pod"]["node"], "node-b");
    validate_schema(&a);

    // explain reads the records' own Kubernetes names: no lab description needed.
    let la = lab.dir.join("node-a.jsonl");
    let lb = lab.dir.join("node-b.jsonl");
    let text = observer(&[
        "explain",
        la.to_str().unwrap(),
        lb.to_str().unwrap(),
        "--pod",
        "web-5f6",
    ]);
    assert!(
        text.contains("from shop/frontend-7d9 (10.244.1.10)"),
        "{text}"
    );
    assert!(text.contains("outcome:   answered"), "{text}");

    // The watch follows deletions: without the pod, the next record has no name for it.
    api.kubectl(
        &[
            "-n",
            "payments",
            "delete",
            "pod",
            "web-5f6",
            "--grace-period=0",
            "--force",
        ],
        None,
    )
    .unwrap();
    let last = next_connection(&lab, 2);
    assert!(
        last.get("dst_pod").is_none(),
        "deleted pod still named: {last}"
    );
    assert_eq!(last["src_pod"]["name"], "frontend-7d9");

    // A pod that ended gives its IP back: the field-selected watch drops it on the phase change.
    api.kubectl(
        &[
            "-n",
            "shop",
            "patch",
            "pod",
            "frontend-7d9",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Failed"}}"#,
        ],
        None,
    )
    .unwrap();
    let last = next_connection(&lab, 3);
    assert!(
        last.get("src_pod").is_none(),
        "a Failed pod still names its IP: {last}"
    );
}

/// After the watch had time to see a change: the `n`-th connection to the Service, as node-a
/// recorded it.
fn next_connection(lab: &LabRun, n: usize) -> serde_json::Value {
    std::thread::sleep(Duration::from_millis(1500));
    assert!(curl_web(lab, "pod-a", 5).status.success());
    let is_conn = |r: &serde_json::Value| r["pre_dnat"]["dport"] == 443 && r["final"] == true;
    let after = lab
        .wait_records("node-a", WAIT, |rs| {
            rs.iter().filter(|r| is_conn(r)).count() >= n
        })
        .unwrap();
    find(&after, is_conn).pop().unwrap().clone()
}

#[test]
fn deploy_manifests_pass_a_server_side_dry_run() {
    let lab = lab("kdry", None);
    let api = KubeApi::start(&lab.dir.join("kube"), 50 + (std::process::id() % 50) as u16)
        .expect("kube-apiserver starts");
    let base = format!("{}/../deploy/base", env!("CARGO_MANIFEST_DIR"));
    // The Namespace must exist for the namespaced objects' dry run.
    api.kubectl(&["create", "namespace", "observer"], None)
        .unwrap();
    let out = api
        .kubectl(&["apply", "--dry-run=server", "-k", &base], None)
        .unwrap();
    for obj in [
        "serviceaccount/observer",
        "clusterrole.rbac.authorization.k8s.io/observer",
        "daemonset.apps/observer",
        "service/observer-metrics",
    ] {
        assert!(out.contains(obj), "{obj} missing: {out}");
    }
    assert!(out.contains("(server dry run)"), "{out}");

    // The NetworkPolicies `explain` writes as fixes are valid objects for this apiserver: an
    // egress fix, an ingress fix, and both of a same-node drop (recorded lab logs).
    for ns in ["shop", "payments"] {
        api.kubectl(&["create", "namespace", ns], None).unwrap();
    }
    let testdata = format!(
        "{}/../observer/testdata/explain",
        env!("CARGO_MANIFEST_DIR")
    );
    for (case, client) in [
        ("egress", "10.244.1.10:38848"),
        ("ingress", "10.244.1.10:51954"),
        ("filter-hooks", "10.244.1.10"),
    ] {
        let v: serde_json::Value = serde_json::from_str(&observer(&[
            "explain",
            &format!("{testdata}/{case}/node-a.jsonl"),
            &format!("{testdata}/{case}/node-b.jsonl"),
            "--client",
            client,
            "--format",
            "json",
        ]))
        .unwrap();
        let np = v[0]["fix"]["network_policy"]
            .as_str()
            .unwrap_or_else(|| panic!("{case}: a NetworkPolicy fix: {v:#}"));
        let out = api
            .kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(np))
            .unwrap_or_else(|e| panic!("{case}: the apiserver refused the fix: {e:#}\n{np}"));
        assert!(
            out.contains("networkpolicy.networking.k8s.io/") && out.contains("(server dry run)"),
            "{case}: {out}"
        );
    }
}

#[test]
fn an_api_that_stops_answering_stops_no_record_and_names_come_back_with_it() {
    let mut lab = lab("k8sdown", None);
    let api = api(&lab, 100);
    let kubeconfig = api.kubeconfig.to_string_lossy().into_owned();
    lab.start_agent(
        "node-a",
        &["--idle-timeout", "2s", "--kubeconfig", &kubeconfig],
    )
    .unwrap();
    let log = lab.dir.join("agent-node-a.log");
    let listed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("services listed")
    });
    assert!(listed);

    // The API hangs: records keep coming, named from what the agent already knew.
    api.freeze(true);
    let during = next_connection(&lab, 1);
    assert_eq!(during["src_pod"]["name"], "frontend-7d9", "{during}");
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");

    // A pod the agent cannot hear of while the API hangs has no name yet...
    add_pod(&lab, "late", "node-a", "10.244.1.77");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(curl_web(&lab, "late", 5).status.success());
    let from_late = |rs: &[serde_json::Value]| {
        rs.iter()
            .filter(|r| r["pre_dnat"]["src"] == "10.244.1.77" && r["final"] == true)
            .cloned()
            .collect::<Vec<_>>()
    };
    let rs = lab
        .wait_records("node-a", WAIT, |rs| !from_late(rs).is_empty())
        .unwrap();
    assert!(from_late(&rs)[0].get("src_pod").is_none());

    // ...and has one once the API answers again and the pod is there.
    api.freeze(false);
    api.kubectl(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: late-1, namespace: shop, labels: {app: late}}\nspec: {nodeName: node-a, containers: [{name: c, image: example.invalid/none}]}\n",
        ),
    )
    .unwrap();
    api.kubectl(
        &[
            "-n",
            "shop",
            "patch",
            "pod",
            "late-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"podIP":"10.244.1.77","podIPs":[{"ip":"10.244.1.77"}]}}"#,
        ],
        None,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        let before = from_late(&lab.records("node-a").unwrap()).len();
        assert!(curl_web(&lab, "late", 5).status.success());
        let rs = lab
            .wait_records("node-a", WAIT, |rs| from_late(rs).len() > before)
            .unwrap();
        if from_late(&rs).last().unwrap()["src_pod"]["name"] == "late-1" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pod was never named after the API came back"
        );
    }
    lab_cmd(&["del-pod", "late", "--name", &lab.name]);
}
