//! OTLP export: flow records as OpenTelemetry log records over gRPC (LogsService/Export), to an
//! OpenTelemetry Collector, the usual sink in front of Kafka, ClickHouse, Loki or Elasticsearch.
//! The body is the record as the flow log has it (JSON); attributes carry the fields people
//! filter on, named after the OpenTelemetry semantic conventions where they exist
//! (`source.address`, `destination.port`, `network.transport`, `k8s.pod.name`, ...) and
//! `observer.*` where they do not. Records wait in a bounded queue; a batch that fails is tried
//! again (1 s, doubling to 30 s) while new records queue behind it; what does not fit is counted
//! lost (`observer_records_lost_total{reason="otlp_queue_full"}`), never waited for.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use tokio::sync::Notify;

use super::metrics::Metrics;
use crate::record::{FlowRecord, SCHEMA, TupleView};

/// Records sent in one Export call at most.
const BATCH: usize = 512;
/// A batch is sent when full or after this long.
const LINGER: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The exporter stage's side: hands records to the sender without waiting.
#[derive(Clone)]
pub struct Otlp {
    queue: Arc<Mutex<VecDeque<LogRecord>>>,
    cap: usize,
    ready: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Otlp {
    /// Start sending to `endpoint` (`http://HOST:4317`) from a task of its own, queueing at most
    /// `cap` records.
    pub fn start(
        endpoint: &str,
        node: &str,
        cap: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Otlp> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint}: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(TIMEOUT)
            .connect_lazy();
        let otlp = Otlp {
            queue: Default::default(),
            cap,
            ready: Default::default(),
            metrics,
        };
        let sender = Sender {
            client: LogsServiceClient::new(channel),
            resource: resource(node),
            otlp: otlp.clone(),
        };
        info!("flow records also go to {endpoint} (OTLP logs, gRPC)");
        tokio::spawn(sender.run(endpoint.to_owned()));
        Ok(otlp)
    }

    /// Queue `records` (their JSON lines beside them); those that do not fit are counted lost.
    pub fn offer(&self, records: &[FlowRecord], lines: &[Option<String>]) {
        let now = unix_nanos(SystemTime::now());
        let mut lost = 0u64;
        {
            let mut q = self.queue.lock().expect("not poisoned");
            for (r, line) in records.iter().zip(lines) {
                if q.len() >= self.cap {
                    lost += 1;
                    continue;
                }
                q.push_back(log_record(r, line.as_deref().unwrap_or_default(), now));
            }
        }
        if lost > 0 {
            self.metrics
                .records_lost
                .with_label_values(&["otlp_queue_full"])
                .inc_by(lost);
        }
        self.ready.notify_one();
    }

    fn take(&self, n: usize) -> Vec<LogRecord> {
        let mut q = self.queue.lock().expect("not poisoned");
        let n = n.min(q.len());
        q.drain(..n).collect()
    }

    fn queued(&self) -> usize {
        self.queue.lock().expect("not poisoned").len()
    }
}

struct Sender {
    client: LogsServiceClient<tonic::transport::Channel>,
    resource: Resource,
    otlp: Otlp,
}

impl Sender {
    async fn run(mut self, endpoint: String) {
        let mut backoff = Duration::from_secs(1);
        let mut failing_since: Option<SystemTime> = None;
        loop {
            if self.otlp.queued() < BATCH {
                // Wait for a full batch, or send what there is after LINGER.
                let _ = tokio::time::timeout(LINGER, self.otlp.ready.notified()).await;
                if self.otlp.queued() < BATCH {
                    tokio::time::sleep(LINGER).await;
                }
            }
            let batch = self.otlp.take(BATCH);
            if batch.is_empty() {
                continue;
            }
            // The same batch until it is taken: new records queue behind it.
            loop {
                match self.send(batch.clone()).await {
                    Ok(()) => {
                        self.otlp.metrics.otlp_exported.inc_by(batch.len() as u64);
                        if failing_since.take().is_some() {
                            info!("OTLP: {endpoint} takes records again");
                        }
                        backoff = Duration::from_secs(1);
                        break;
                    }
                    Err(e) => {
                        self.otlp.metrics.otlp_export_failures.inc();
                        if failing_since.is_none() {
                            warn!(
                                "OTLP: exporting to {endpoint}: {e}; trying again, records queue meanwhile (at most {}; beyond that they are counted lost)",
                                self.otlp.cap
                            );
                            failing_since = Some(SystemTime::now());
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    async fn send(&mut self, records: Vec<LogRecord>) -> Result<(), tonic::Status> {
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "observer.flow".into(),
                        version: SCHEMA.into(),
                        ..Default::default()
                    }),
                    log_records: records,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let resp = self.client.export(req).await?.into_inner();
        match resp.partial_success {
            Some(p) if p.rejected_log_records > 0 => {
                // The receiver took the request and refused some records: not retried (it
                // would refuse them again), counted.
                self.otlp
                    .metrics
                    .records_lost
                    .with_label_values(&["otlp_rejected"])
                    .inc_by(p.rejected_log_records as u64);
                warn!(
                    "OTLP: the receiver rejected {} records: {}",
                    p.rejected_log_records, p.error_message
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
    }
}

fn text(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(v.into()))
}

fn int(key: &str, v: impl Into<i64>) -> KeyValue {
    kv(key, Value::IntValue(v.into()))
}

fn resource(node: &str) -> Resource {
    Resource {
        attributes: vec![
            text("service.name", "observer"),
            text("k8s.node.name", node),
        ],
        ..Default::default()
    }
}

fn endpoints(attrs: &mut Vec<KeyValue>, prefix: &str, t: &TupleView) {
    attrs.push(text(&format!("{prefix}source.address"), &t.src));
    attrs.push(int(&format!("{prefix}source.port"), t.sport));
    attrs.push(text(&format!("{prefix}destination.address"), &t.dst));
    attrs.push(int(&format!("{prefix}destination.port"), t.dport));
}

/// One flow record as a log record: the JSON record as body, the fields to filter on as
/// attributes.
pub fn log_record(r: &FlowRecord, json: &str, observed: u64) -> LogRecord {
    let mut a = vec![
        text("k8s.node.name", &r.node),
        text("network.transport", r.proto.to_ascii_lowercase()),
        text("network.type", r.family.to_ascii_lowercase()),
        kv("observer.translated", Value::BoolValue(r.translated)),
        kv("observer.final", Value::BoolValue(r.is_final)),
        text("observer.state", &r.state),
        text("observer.last_seen.point", &r.last_seen.point),
        text("observer.observed_as", r.observed_as.as_str()),
    ];
    // The connection as the client sent it (source), and where it went after DNAT.
    if let Some(c) = r.client_tuple() {
        a.push(text("source.address", &c.src));
        a.push(int("source.port", c.sport));
    }
    if let Some(b) = r.backend_tuple() {
        a.push(text("destination.address", &b.dst));
        a.push(int("destination.port", b.dport));
    }
    if let Some(p) = &r.pre_dnat {
        endpoints(&mut a, "observer.pre_dnat.", p);
    }
    if let Some(w) = &r.wire_view {
        endpoints(&mut a, "observer.wire.", w);
    }
    if let Some(t) = &r.translation {
        a.push(text("observer.translation.kind", &t.kind));
        a.push(text("observer.translation.evidence", &t.evidence));
    }
    if let Some(p) = &r.src_pod {
        a.push(text("k8s.namespace.name", &p.namespace));
        a.push(text("k8s.pod.name", &p.name));
    }
    if let Some(p) = &r.dst_pod {
        a.push(text(
            "observer.destination.k8s.namespace.name",
            &p.namespace,
        ));
        a.push(text("observer.destination.k8s.pod.name", &p.name));
    }
    if let Some(s) = &r.service {
        a.push(text("observer.service.namespace", &s.namespace));
        a.push(text("observer.service.name", &s.name));
    }
    if let Some(d) = &r.drop {
        a.push(text("observer.drop.reason", &d.reason));
        a.push(text("observer.drop.point", &d.point));
    }
    let (severity, severity_text) = match r.drop {
        Some(_) => (SeverityNumber::Warn, "WARN"),
        None => (SeverityNumber::Info, "INFO"),
    };
    LogRecord {
        time_unix_nano: humantime::parse_rfc3339_weak(&r.time).map_or(observed, unix_nanos),
        observed_time_unix_nano: observed,
        severity_number: severity as i32,
        severity_text: severity_text.into(),
        body: Some(AnyValue {
            value: Some(Value::StringValue(json.to_owned())),
        }),
        attributes: a,
        event_name: "observer.flow".into(),
        ..Default::default()
    }
}
