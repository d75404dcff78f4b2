//! Recorded API answers replayed through tower-test: the field-selected, paged pod list, the
//! metadata-only namespace list, watch events, and a relist (after 410 Gone) that drops what
//! the cluster no longer has. Fast; in addition to the real kube-apiserver tests
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
