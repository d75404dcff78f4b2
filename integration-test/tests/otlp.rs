//! OTLP export: flow records arrive at a real OTLP/gRPC receiver as log records, complete; a
//! receiver that is down at first loses nothing that was queued for it.

use std::time::{Duration, Instant};

use integration_test::{otlp::Receiver, *};
use opentelemetry_proto::tonic::{common::v1::any_value::Value as Any, logs::v1::LogRecord};
use serde_json::Value;

/// Upper bound: a receiver back after failures is retried within 30 s (the backoff's cap).
const WAIT: Duration = Duration::from_secs(60);
const RECEIVER: &str = "127.0.0.1:4317";

fn attr<'a>(l: &'a LogRecord, key: &str) -> Option<&'a Any> {
    l.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn body(l: &LogRecord) -> Value {
    match l.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Any::StringValue(s)) => serde_json::from_str(s).unwrap(),
        other => panic!("body is no JSON record: {other:?}"),
    }
}

/// The final records of connections to the Service in node-a's flow log.
fn finals_to_service(lab: &LabRun) -> Vec<Value> {
    lab.records("node-a")
        .unwrap()
        .into_iter()
        .filter(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443)
        .collect()
}

/// Wait until the receiver holds a log record for each of `want` (by body).
fn wait_received(rx: &Receiver, want: &[Value]) -> Vec<LogRecord> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = rx.logs.lock().unwrap().clone();
        let bodies: Vec<Value> = got.iter().map(body).collect();
        if want.iter().all(|w| bodies.contains(w)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} records arrived",
            want.iter().filter(|w| bodies.contains(w)).count(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A lab whose agents export to [`RECEIVER`] (inside their nodes).
fn otlp_lab(prefix: &str) -> LabRun {
    lab_with_agent_args(
        prefix,
        "1s",
        None,
        &["--otlp-endpoint", &format!("http://{RECEIVER}")],
    )
}

/// `n` connections to the Service, made and recorded in node-a's flow log.
fn connect(lab: &LabRun, n: usize) {
    for _ in 0..n {
        assert!(curl_web(lab, "pod-a", 5).status.success());
    }
    lab.wait_records("node-a", WAIT, |rs| {
        rs.iter()
            .filter(|r| r["final"] == true && r["pre_dnat"]["dport"] == 443)
            .count()
            >= n
    })
    .unwrap();
}

/// Wait until the agent has counted a failed export.
fn wait_export_failure(lab: &LabRun) {
    let deadline = Instant::now() + WAIT;
    while metric(
        &lab.metrics("node-a").unwrap(),
        "observer_otlp_export_failures_total",
        &[],
    )
    .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < deadline, "no failed export counted");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn records_arrive_as_otlp_log_records_with_semantic_attributes() {
    let lab = otlp_lab("otlp");
    let rx = Receiver::start(&lab.ns("node-a"), RECEIVER, false).expect("receiver listens");
    connect(&lab, 1);
    let want = finals_to_service(&lab);
    let got = wait_received(&rx, &want);
    let l = got.iter().find(|l| body(l) == want[0]).unwrap();
    let s = |k: &str| match attr(l, k) {
        Some(Any::StringValue(v)) => v.clone(),
        other => panic!("{k}: {other:?}"),
    };
    let i = |k: &str| match attr(l, k) {
        Some(Any::IntValue(v)) => *v,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(s("network.transport"), "tcp");
    assert_eq!(s("source.address"), "10.244.1.10");
    assert_eq!(s("destination.address"), "10.244.2.10");
    assert_eq!(i("destination.port"), 8443, "after DNAT");
    assert_eq!(s("observer.pre_dnat.destination.address"), "100.64.0.10");
    assert_eq!(i("observer.pre_dnat.destination.port"), 443);
    assert_eq!(s("k8s.pod.name"), "pod-a");
    assert_eq!(s("k8s.namespace.name"), "shop");
    assert_eq!(s("observer.service.name"), "web");
    assert_eq!(s("k8s.node.name"), "node-a");
    assert!(matches!(
        attr(l, "observer.translated"),
        Some(Any::BoolValue(true))
    ));
    let m = lab.metrics("node-a").unwrap();
    assert!(metric(&m, "observer_otlp_records_exported_total", &[]).unwrap() >= 1.0);
    assert_eq!(
        metric(
            &m,
            "observer_records_lost_total",
            &[("reason", "otlp_queue_full")]
        ),
        Some(0.0)
    );
}

#[test]
fn a_receiver_down_at_first_gets_every_queued_record_when_it_comes_up() {
    let lab = otlp_lab("otlpd");
    connect(&lab, 3);
    // Nobody listens yet: the agent records on, and counts its failed exports.
    wait_export_failure(&lab);
    let rx = Receiver::start(&lab.ns("node-a"), RECEIVER, false).expect("receiver listens");
    let want = finals_to_service(&lab);
    assert_eq!(want.len(), 3);
    wait_received(&rx, &want);
    assert_eq!(
        metric(
            &lab.metrics("node-a").unwrap(),
            "observer_records_lost_total",
            &[("reason", "otlp_queue_full")]
        ),
        Some(0.0)
    );
}

#[test]
fn a_slow_receiver_holds_up_nothing_and_gets_every_record_once_it_keeps_up() {
    let lab = otlp_lab("otlps");
    let rx = Receiver::start(&lab.ns("node-a"), RECEIVER, false).expect("receiver listens");
    // Slower than the agent waits (10 s): every call fails.
    rx.delay.store(15_000, std::sync::atomic::Ordering::Relaxed);
    connect(&lab, 2);
    // The agent answers at once meanwhile.
    let t0 = Instant::now();
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    wait_export_failure(&lab);
    assert!(rx.logs.lock().unwrap().is_empty());
    // It keeps up again: what waited arrives.
    rx.delay.store(0, std::sync::atomic::Ordering::Relaxed);
    wait_received(&rx, &finals_to_service(&lab));
}
