//! Recorded API answers replayed through tower-test: the field-selected, paged pod list, the
//! metadata-only namespace list, watch events, and a relist (after 410 Gone) that drops what
//! the cluster no longer has; and objects of any shape through the indexer (`objects`). Fast; in
//! addition to the real kube-apiserver tests
//! (`integration-test/tests/kubernetes.rs`), not instead.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::SendResponse;

use super::*;

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}, "resourceVersion": "11"},
        "spec": {"nodeName": "node-a", "containers": []},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn list(kind: &str, api_version: &str, items: Vec<Value>, cont: Option<&str>) -> String {
    let mut metadata = json!({"resourceVersion": "10"});
    if let Some(c) = cont {
        metadata["continue"] = c.into();
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items})
        .to_string()
}

fn events(evs: &[(&str, Value)]) -> String {
    evs.iter()
        .map(|(t, o)| format!("{}\n", json!({"type": t, "object": o})))
        .collect()
}

enum Reply {
    Body(String),
    /// A quiet watch: held open.
    Hold,
    /// The second pod watch: held until the test has looked, then answered 410 Gone.
    Gone,
}

/// What the replayed API server does with one request.
fn answer(uri: &str, accept: &str, pod_lists: &mut u32, pod_watches: &mut u32) -> Reply {
    let watch = uri.contains("watch=true");
    if uri.starts_with("/api/v1/pods") {
        assert!(
            uri.contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed"),
            "live pods only: {uri}"
        );
        if watch {
            *pod_watches += 1;
            return match *pod_watches {
                1 => Reply::Body(events(&[
                    ("ADDED", pod("web-3", "10.244.1.4")),
                    ("DELETED", pod("web-1", "10.244.1.1")),
                ])),
                2 => Reply::Gone,
                _ => Reply::Hold,
            };
        }
        *pod_lists += 1;
        assert!(uri.contains("limit=500"), "paged: {uri}");
        return Reply::Body(match (*pod_lists, uri.contains("continue=page2")) {
            (1, false) => list(
                "PodList",
                "v1",
                vec![pod("web-1", "10.244.1.1"), pod("web-2", "10.244.1.2")],
                Some("page2"),
            ),
            (_, true) => list("PodList", "v1", vec![pod("db-1", "10.244.1.3")], None),
            // The relist: only db-1 is left in the cluster.
            _ => list("PodList", "v1", vec![pod("db-1", "10.244.1.3")], None),
        });
    }
    if watch {
        return Reply::Hold;
    }
    if uri.starts_with("/api/v1/namespaces") {
        assert!(
            accept.contains("as=PartialObjectMetadataList"),
            "namespaces metadata-only: {accept}"
        );
        let ns = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": {"name": "shop", "labels": {"team": "storefront"}, "resourceVersion": "3"}});
        return Reply::Body(list(
            "PartialObjectMetadataList",
            "meta.k8s.io/v1",
            vec![ns],
            None,
        ));
    }
    if uri.starts_with("/api/v1/services") {
        let svc = json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "5"},
            "spec": {"clusterIP": "100.64.0.10", "ports": [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}]}
        });
        return Reply::Body(list("ServiceList", "v1", vec![svc], None));
    }
    panic!("unexpected request {uri}");
}

async fn until(names: &RwLock<Names>, what: &str, f: impl Fn(&Names) -> bool) {
    for _ in 0..200 {
        if f(&names.read().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: {:?}", names.read().unwrap());
}

/// The watch fell behind: the client must list again.
fn gone() -> String {
    events(&[(
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "too old resource version", "reason": "Expired", "code": 410}),
    )])
}

#[tokio::test]
async fn a_replayed_api_fills_follows_and_relists_the_names() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let names = Arc::new(RwLock::new(Names::default()));
    tokio::spawn(watch(Client::new(service, "default"), names.clone()));
    let (go, mut relist) = tokio::sync::mpsc::channel::<()>(1);
    let server = tokio::spawn(async move {
        let (mut pod_lists, mut pod_watches) = (0, 0);
        // Held watches: dropping one would fail it and make the client retry.
        let mut held: Vec<SendResponse<Response<Body>>> = Vec::new();
        let mut parked = None;
        loop {
            tokio::select! {
                r = handle.next_request() => {
                    let Some((req, send)) = r else { break };
                    let uri = req.uri().to_string();
                    let accept = req
                        .headers()
                        .get("accept")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    match answer(&uri, &accept, &mut pod_lists, &mut pod_watches) {
                        Reply::Body(b) => send.send_response(Response::new(Body::from(b.into_bytes()))),
                        Reply::Hold => held.push(send),
                        Reply::Gone => parked = Some(send),
                    }
                }
                Some(()) = relist.recv(), if parked.is_some() => {
                    let send: SendResponse<_> = parked.take().expect("parked");
                    send.send_response(Response::new(Body::from(gone().into_bytes())));
                }
            }
        }
    });

    until(&names, "both pages, then the watch's add and delete", |n| {
        n.pod("10.244.1.4").is_some() && n.pod("10.244.1.1").is_none() && n.pod_count() == 3
    })
    .await;
    {
        let n = names.read().unwrap();
        assert_eq!(n.pod("10.244.1.2").unwrap().labels["app"], "web-2");
        assert_eq!(n.namespaces["shop"]["team"], "storefront");
        let svc = n.service("100.64.0.10", 443, "TCP", None).unwrap();
        assert_eq!((svc.name.as_str(), svc.target_port), ("web", 8443));
    }
    go.send(()).await.unwrap();
    until(
        &names,
        "the relist drops what the cluster no longer has",
        |n| n.pod_count() == 1 && n.pod("10.244.1.3").is_some(),
    )
    .await;
    assert_eq!(
        names.read().unwrap().pod("10.244.1.3").unwrap().name,
        "db-1"
    );
    server.abort();
}

/// Pods, Services and Namespaces as the API could send them: any field there or not, any
/// string where an address goes, any number where a port goes. Each one that deserializes goes
/// into and out of the names without a panic, and only what parses as an address is indexed.
mod objects {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = Value> {
        prop_oneof![
            "\\PC{0,12}".prop_map(Value::from),
            Just(Value::from("10.244.1.10")),
            Just(Value::from("fd00::a")),
            Just(Value::from("10.244.1.999")),
            Just(Value::from("")),
        ]
    }

    /// A value of `inner`, or the field left out (`Null` is removed).
    fn field(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
        prop_oneof![3 => inner, 1 => Just(Value::Null)]
    }

    /// Anything: a value of `inner`, of another type, or nothing.
    fn anything(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
        prop_oneof![
            field(inner),
            any::<i64>().prop_map(Value::from),
            Just(json!({"unexpected": [1, "x"]})),
            Just(json!([null, true])),
        ]
    }

    fn labels() -> impl Strategy<Value = Value> {
        prop::collection::btree_map("\\PC{0,8}", "\\PC{0,8}", 0..4).prop_map(|m| json!(m))
    }

    fn prune(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, prune(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(prune).collect()),
            v => v,
        }
    }

    fn metadata() -> impl Strategy<Value = Value> {
        (field(text()), field(text()), field(labels())).prop_map(|(name, namespace, labels)| {
            json!({"name": name, "namespace": namespace, "labels": labels, "resourceVersion": "1"})
        })
    }

    fn pod() -> impl Strategy<Value = Value> {
        (
            metadata(),
            field(any::<bool>().prop_map(Value::from)),
            field(text()),
            field(text()),
            prop::collection::vec(field(text()), 0..3),
        )
            .prop_map(|(metadata, host_network, node, pod_ip, ips)| {
                let pod_ips: Vec<Value> = ips.into_iter().map(|ip| json!({"ip": ip})).collect();
                prune(json!({
                    "metadata": metadata,
                    "spec": {"hostNetwork": host_network, "nodeName": node, "containers": []},
                    "status": {"podIP": pod_ip, "podIPs": pod_ips},
                }))
            })
    }

    fn service() -> impl Strategy<Value = Value> {
        let port = (
            field(text()),
            field(prop_oneof![3 => 0..=65535i32, 1 => any::<i32>()].prop_map(Value::from)),
            field(prop_oneof![
                any::<i32>().prop_map(Value::from),
                "\\PC{0,8}".prop_map(Value::from)
            ]),
            field(prop_oneof![Just(Value::from("TCP")), text()]),
        )
            .prop_map(|(name, port, target, proto)| {
                json!({"name": name, "port": port, "targetPort": target, "protocol": proto})
            });
        (
            metadata(),
            field(text()),
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(port, 0..3),
        )
            .prop_map(|(metadata, ip, ips, ports)| {
                prune(json!({
                    "metadata": metadata,
                    "spec": {"clusterIP": ip, "clusterIPs": ips, "ports": ports},
                }))
            })
    }

    /// Into the names, then out again: whatever went in is gone.
    fn round_trip<K: Indexed>(o: &K, n: &mut Names) {
        o.upsert(n);
        o.remove(n);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn any_pod_the_api_could_send_is_indexed_by_the_addresses_it_has(v in pod()) {
            let Ok(p) = serde_json::from_value::<Pod>(v.clone()) else { return Ok(()) };
            let mut n = Names::default();
            let keys = p.upsert(&mut n);
            let host = p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
            for ip in &keys {
                prop_assert!(!host, "a host-network pod is no pod identity: {v}");
                prop_assert!(n.pod(&ip.to_string()).is_some());
            }
            round_trip(&p, &mut n);
            prop_assert_eq!(n.pod_count(), 0, "{}", v);
        }

        #[test]
        fn any_service_the_api_could_send_is_indexed_by_the_ports_it_has(v in service()) {
            let Ok(s) = serde_json::from_value::<Service>(v.clone()) else { return Ok(()) };
            let mut n = Names::default();
            for (ip, port, _) in s.upsert(&mut n) {
                let spec = s.spec.as_ref().expect("entries come from a spec");
                prop_assert!(spec.ports.iter().flatten().any(|p| i64::from(p.port) == i64::from(port)));
                prop_assert!(ip.to_string().parse::<IpAddr>().is_ok());
            }
            round_trip(&s, &mut n);
            prop_assert!(n.services.is_empty(), "{}", v);
        }

        #[test]
        fn any_json_for_a_pod_or_service_is_refused_or_indexed(
            v in prop::collection::vec(anything(text()), 3),
            o in prop_oneof![pod(), service()],
        ) {
            // A well-formed object with a value of any type in one place.
            let mut o = o;
            o["metadata"]["name"] = v[0].clone();
            o["spec"][if v[1].is_string() { "nodeName" } else { "ports" }] = v[1].clone();
            o["status"] = v[2].clone();
            if let Ok(p) = serde_json::from_value::<Pod>(o.clone()) {
                round_trip(&p, &mut Names::default());
            }
            if let Ok(s) = serde_json::from_value::<Service>(o) {
                round_trip(&s, &mut Names::default());
            }
        }
    }
}
