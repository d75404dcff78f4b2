//! Kubernetes names from a real kube-apiserver (built from Debian's source package by
//! `cargo xtask test`): records carry the pods' and the Service's names, the watch follows
//! changes, and the deploy manifests pass a server-side dry run.

use std::time::Duration;

use integration_test::api_faults::{ApiFaults, Fault};
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
        publish_status(&api, ns, pod, ip, None);
    }
    api
}

/// What a kubelet would report for `pod`: its IP, and its phase if given.
fn publish_status(api: &KubeApi, ns: &str, pod: &str, ip: &str, phase: Option<&str>) {
    let phase = phase.map_or(String::new(), |p| format!(r#""phase":"{p}","#));
    let patch = format!(r#"{{"status":{{{phase}"podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
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
    // The Namespace must exist for the namespaced objects' dry run.
    api.kubectl(&["create", "namespace", "observer"], None)
        .unwrap();
    for (dir, extra) in [
        ("base", None),
        (
            "overlays/flows-kubernetes-auth",
            Some("clusterrole.rbac.authorization.k8s.io/observer-flows-reader"),
        ),
    ] {
        let dir = format!("{}/../deploy/{dir}", env!("CARGO_MANIFEST_DIR"));
        let out = api
            .kubectl(&["apply", "--dry-run=server", "-k", &dir], None)
            .unwrap();
        for obj in [
            "serviceaccount/observer",
            "clusterrole.rbac.authorization.k8s.io/observer",
            "daemonset.apps/observer",
            "service/observer-metrics",
        ]
        .into_iter()
        .chain(extra)
        {
            assert!(out.contains(obj), "{dir}: {obj} missing: {out}");
        }
        assert!(out.contains("(server dry run)"), "{out}");
    }

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

/// How the API server is broken in [`names_survive`].
#[derive(Clone, Copy, PartialEq)]
enum Broken {
    /// It hangs (SIGSTOP): connections open, nothing answers.
    Frozen,
    /// It answers, wrongly.
    Failing(Fault),
}

/// The API breaks under a running agent: records keep coming, named from what the agent knew;
/// a pod it cannot hear of meanwhile has no name, and gets it once the API answers again. The
/// agent reaches the API through [`ApiFaults`] in every case.
fn names_survive(prefix: &str, slot: u16, broken: Broken) {
    let mut lab = lab(prefix, None);
    let api = api(&lab, slot);
    let faults = ApiFaults::start(&api, &lab.dir.join("kube")).expect("API proxy");
    let kubeconfig = faults.kubeconfig.to_string_lossy().into_owned();
    lab.start_agent(
        "node-a",
        &["--idle-timeout", "2s", "--kubeconfig", &kubeconfig],
    )
    .unwrap();
    let log = lab.dir.join("agent-node-a.log");
    let read_log = || std::fs::read_to_string(&log).unwrap();
    let listed = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        read_log().contains("services listed")
    });
    assert!(listed);

    match broken {
        Broken::Frozen => api.freeze(true),
        Broken::Failing(f) => faults.set(f),
    }
    let during = next_connection(&lab, 1);
    assert_eq!(during["src_pod"]["name"], "frontend-7d9", "{during}");
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");

    // A pod the agent cannot hear of has no name yet...
    add_pod(&lab, "late", "node-a", "10.244.1.77");
    std::thread::sleep(Duration::from_millis(1500));
    let from_late = |rs: &[serde_json::Value]| {
        rs.iter()
            .filter(|r| r["pre_dnat"]["src"] == "10.244.1.77" && r["final"] == true)
            .cloned()
            .collect::<Vec<_>>()
    };
    let late_record = || {
        let before = from_late(&lab.records("node-a").unwrap()).len();
        assert!(curl_web(&lab, "late", 5).status.success());
        let rs = lab
            .wait_records("node-a", WAIT, |rs| from_late(rs).len() > before)
            .unwrap();
        from_late(&rs).pop().unwrap()
    };
    assert!(late_record().get("src_pod").is_none());

    // ...not even once it is in the API (a hung API server takes no kubectl either, so that
    // pod comes after)...
    if broken != Broken::Frozen {
        create_late_pod(&api);
    }
    if broken == Broken::Failing(Fault::WatchGone) {
        // ...except where lists still pass: 410 on a watch means list again, and that list
        // names the pod while every watch still fails.
        wait_named(late_record, "after a relist, with watches still gone");
        assert!(read_log().contains("watching pods"), "the 410 is reported");
    } else {
        std::thread::sleep(Duration::from_secs(3));
        assert!(late_record().get("src_pod").is_none());
    }

    // ...and has one once the API answers again.
    match broken {
        Broken::Frozen => {
            api.freeze(false);
            create_late_pod(&api);
        }
        Broken::Failing(_) => faults.set(Fault::None),
    }
    wait_named(late_record, "after the API came back");
    if let Broken::Failing(Fault::InternalError) = broken {
        assert!(
            read_log().contains("watching pods"),
            "the 500s are reported"
        );
    }
    lab_cmd(&["del-pod", "late", "--name", &lab.name]);
}

fn create_late_pod(api: &KubeApi) {
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
}

/// New connections of the late pod until one is named `late-1`.
fn wait_named(record: impl Fn() -> serde_json::Value, when: &str) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        std::thread::sleep(Duration::from_millis(1000));
        if record()["src_pod"]["name"] == "late-1" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pod was never named {when}"
        );
    }
}

#[test]
fn an_api_that_stops_answering_stops_no_record_and_names_come_back_with_it() {
    names_survive("k8sdown", 100, Broken::Frozen);
}

#[test]
fn an_api_that_answers_500_stops_no_record_and_names_come_back_with_it() {
    names_survive("k8s500", 200, Broken::Failing(Fault::InternalError));
}

#[test]
fn watches_that_answer_410_gone_are_listed_again_and_name_new_pods() {
    names_survive("k8s410", 250, Broken::Failing(Fault::WatchGone));
}

#[test]
fn flows_are_served_to_the_users_rbac_allows_and_checked_by_the_api_server() {
    let mut lab = lab("kflows", None);
    let api = api(&lab, 150);
    let rbac = format!(
        "{}/../deploy/overlays/flows-kubernetes-auth/flows-rbac.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    api.kubectl(&["apply", "-f", &rbac], None).unwrap();
    for sa in ["reader", "stranger"] {
        api.kubectl(&["-n", "shop", "create", "serviceaccount", sa], None)
            .unwrap();
    }
    api.kubectl(
        &[
            "create",
            "clusterrolebinding",
            "reader-reads-flows",
            "--clusterrole=observer-flows-reader",
            "--serviceaccount=shop:reader",
        ],
        None,
    )
    .unwrap();
    let token = |sa: &str, audience: Option<&str>, ttl: &str| {
        let mut args = vec!["-n", "shop", "create", "token", sa, "--duration", ttl];
        if let Some(a) = audience {
            args.extend(["--audience", a]);
        }
        api.kubectl(&args, None).unwrap().trim().to_owned()
    };
    let reader = token("reader", Some("observer"), "1h");
    let stranger = token("stranger", Some("observer"), "1h");
    let reader_for_the_api = token("reader", None, "1h");
    // Another lifetime: a token asked for in the same second with the same claims would be
    // the very same token, already reviewed and cached.
    let late_reader = token("reader", Some("observer"), "2h");
    assert_ne!(late_reader, reader);

    let kubeconfig = api.kubeconfig.to_string_lossy().into_owned();
    lab.start_agent(
        "node-a",
        &[
            "--kubeconfig",
            &kubeconfig,
            "--flows-addr",
            FLOWS_ADDR,
            "--flows-auth",
            "kubernetes",
        ],
    )
    .expect("agent starts");
    let flows = format!("http://{FLOWS_ADDR}/flows");
    let status = |t: Option<&str>| http_status(&lab, "node-a", &flows, t);
    assert_eq!(status(None), "401");
    assert_eq!(status(Some("not-a-token-at-all-0123456789")), "401");
    assert_eq!(status(Some(&reader_for_the_api)), "401", "another audience");
    assert_eq!(status(Some(&stranger)), "403", "RBAC does not allow it");
    assert_eq!(status(Some(&reader)), "200");

    // explain reads it with the reader's token.
    let token_file = lab.dir.join("reader-token");
    std::fs::write(&token_file, &reader).unwrap();
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    lab.wait_records("node-a", WAIT, |rs| rs.iter().any(|r| r["final"] == true))
        .unwrap();
    let out = explain_in(
        &lab,
        "node-a",
        &[
            &flows,
            "--token-file",
            &token_file.to_string_lossy(),
            "--format",
            "json",
        ],
    );
    assert!(String::from_utf8_lossy(&out).contains("100.64.0.10"));

    // The API hangs: a token it answered for a moment ago is still let in; one it never saw
    // gets 503 within the review timeout, and the agent answers everything else meanwhile.
    api.freeze(true);
    assert_eq!(status(Some(&reader)), "200");
    let asked = std::time::Instant::now();
    assert_eq!(status(Some(&late_reader)), "503");
    assert!(
        asked.elapsed() < Duration::from_secs(9),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");
    api.freeze(false);
    assert_eq!(status(Some(&late_reader)), "200");

    let m = lab.metrics("node-a").unwrap();
    for (outcome, n) in [
        ("unauthorized", 3.0),
        ("forbidden", 1.0),
        ("served", 4.0),
        ("unavailable", 1.0),
    ] {
        assert_eq!(
            metric(&m, "observer_flows_requests_total", &[("outcome", outcome)]),
            Some(n),
            "{outcome}"
        );
    }
}

/// The agents' DaemonSet pods as the API would hold them (no kubelet here: their status is
/// published by hand): two agents on the lab's nodes, one whose port answers nothing, one not
/// running.
const AGENT_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: observer}
---
apiVersion: v1
kind: Pod
metadata: {name: observer-a, namespace: observer, labels: {app.kubernetes.io/name: observer}}
spec: {nodeName: node-a, containers: [{name: agent, image: example.invalid/none, ports: [{name: metrics, containerPort: 9464}, {name: flows, containerPort: 9465}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: observer-b, namespace: observer, labels: {app.kubernetes.io/name: observer}}
spec: {nodeName: node-b, containers: [{name: agent, image: example.invalid/none, ports: [{name: flows, containerPort: 9465}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: observer-c, namespace: observer, labels: {app.kubernetes.io/name: observer}}
spec: {nodeName: node-c, containers: [{name: agent, image: example.invalid/none, ports: [{name: flows, containerPort: 9399}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: observer-d, namespace: observer, labels: {app.kubernetes.io/name: observer}}
spec: {nodeName: node-d, containers: [{name: agent, image: example.invalid/none, ports: [{name: flows, containerPort: 9465}]}]}
"#;

#[test]
fn observe_and_explain_find_every_agent_through_the_api_and_name_those_that_do_not_answer() {
    let token = flows_token_file();
    let lab = lab_with_agent_args(
        "kfind",
        "1s",
        None,
        &["--flows-addr", "0.0.0.0:9465", "--flows-token-file", &token],
    );
    let api = api(&lab, 300);
    api.kubectl(&["apply", "-f", "-"], Some(AGENT_PODS))
        .unwrap();
    // node-c's "agent" is node-a's address on a port nothing listens on.
    for (pod, ip) in [
        ("observer-a", "10.200.0.1"),
        ("observer-b", "10.200.0.2"),
        ("observer-c", "10.200.0.1"),
    ] {
        publish_status(&api, "observer", pod, ip, Some("Running"));
    }
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    for node in ["node-a", "node-b"] {
        lab.wait_records(node, WAIT, |rs| {
            rs.iter()
                .any(|r| r["final"] == true && r["post_dnat"]["dport"] == 8443)
        })
        .unwrap();
    }
    // Asked from a pod of the cluster (pod-a: the pod range may reach every node), as an
    // in-cluster client would be; the API itself from the host.
    let kubeconfig = api.kubeconfig.to_string_lossy().into_owned();
    let find = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--netns",
        &lab.ns("pod-a"),
        "--token-file",
        &token,
    ];
    let run = |sub: &str, extra: &[&str]| {
        std::process::Command::new(bin())
            .arg(sub)
            .args(find)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run("observe", &["--pod", "payments/pod-b", "-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one agent did not answer: {stderr}"
    );
    for said in [
        "agent on node-a (observer-a): http://10.200.0.1:9465/flows",
        "agent on node-b (observer-b)",
        "node-c (http://10.200.0.1:9399/flows): did not answer",
        "pod observer-d is no agent to ask: on node-d: not running",
    ] {
        assert!(stderr.contains(said), "{said:?} not in: {stderr}");
    }
    let mut nodes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["post_dnat"]["dport"] == 8443)
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(
        nodes,
        ["node-a", "node-b"],
        "both nodes' records, from their agents"
    );

    let out = run(
        "explain",
        &["--service", "100.64.0.10:443", "--format", "json"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("node-c (http://10.200.0.1:9399/flows): did not answer"),
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "answered", "{v:#}");

    // The same through kubectl: a link named kubectl-observer on the PATH is its plugin, and
    // finds the agents with kubectl's kubeconfig.
    let plugin_dir = lab.dir.join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::os::unix::fs::symlink(bin(), plugin_dir.join("kubectl-observer")).unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("kubectl")
        .args([
            "observer",
            "explain",
            "--netns",
            &lab.ns("pod-a"),
            "--token-file",
            &token,
        ])
        .args(["--service", "100.64.0.10:443", "--format", "json"])
        .env("PATH", path)
        .env("KUBECONFIG", &api.kubeconfig)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("agent on node-b (observer-b)"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "answered", "{v:#}");
}
