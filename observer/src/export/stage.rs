//! The exporter stage: names each record (pods, Service), counts it in the metrics, keeps the
//! final ones for `/flows`, and hands batches to the flow-log writer, a thread of its own, so a
//! slow disk or a blocked stdout never stalls the event loop. Batches wait in a bounded channel;
//! when the writer is behind, correlation waits for it, and the kernel keeps counting meanwhile.

use std::sync::{Arc, RwLock};

use log::warn;
use tokio::sync::mpsc;

use super::{json::FlowLog, metrics::Metrics, recent::RecentFlows};
use crate::{names::Names, record::FlowRecord};

/// Batches waiting for the writer.
const WRITER_QUEUE: usize = 64;

pub struct Exporter {
    pub names: Arc<RwLock<Names>>,
    pub metrics: Arc<Metrics>,
    pub recent: Arc<RecentFlows>,
    /// `--otlp-endpoint`: records also go there.
    pub otlp: Option<super::otlp::Otlp>,
}

impl Exporter {
    /// Run until correlation closes `batches`; then wait for the writer to finish the log.
    pub async fn run(self, log: FlowLog, mut batches: mpsc::Receiver<Vec<FlowRecord>>) {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = {
            let metrics = self.metrics.clone();
            std::thread::Builder::new()
                .name("flow-log".into())
                .spawn(move || write_all(log, rx, &metrics))
                .expect("spawning the flow-log writer")
        };
        while let Some(mut batch) = batches.recv().await {
            self.prepare(&mut batch);
            let n = batch.len() as u64;
            if tx.send(batch).await.is_err() {
                self.metrics
                    .records_lost
                    .with_label_values(&["writer_gone"])
                    .inc_by(n);
            }
        }
        drop(tx);
        // The writer ends with the channel; joining it is blocking, so not on the event loop.
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    }

    fn prepare(&self, batch: &mut [FlowRecord]) {
        {
            let names = self.names.read().expect("not poisoned");
            for r in batch.iter_mut() {
                names.enrich(r);
            }
        }
        for r in batch.iter() {
            self.metrics.on_record(r);
        }
        let lines: Vec<Option<String>> = batch
            .iter()
            .map(|r| serde_json::to_string(r).ok())
            .collect();
        if let Some(o) = &self.otlp {
            o.offer(batch, &lines);
        }
        self.recent.push(
            batch.iter().zip(lines).filter_map(|(r, line)| {
                Some((r.connection_id(), r.time.clone(), line?, r.is_final))
            }),
        );
    }
}

/// How often a failing flow log is warned about; every lost record is counted in between.
const WRITE_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

fn write_all(mut log: FlowLog, mut rx: mpsc::Receiver<Vec<FlowRecord>>, metrics: &Metrics) {
    let mut warned: Option<std::time::Instant> = None;
    let mut lost_since = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        match log.write(&batch) {
            Ok(()) => {
                if lost_since > 0 {
                    warn!("flow log writable again; {lost_since} records were lost");
                    (lost_since, warned) = (0, None);
                }
            }
            Err(e) => {
                metrics.record_write_errors.inc();
                let n = batch.len() as u64;
                metrics
                    .records_lost
                    .with_label_values(&["write_failed"])
                    .inc_by(n);
                lost_since += n;
                if warned.is_none_or(|t| t.elapsed() >= WRITE_WARN_EVERY) {
                    warn!(
                        "{e}: {lost_since} records lost so far (observer_records_lost_total{{reason=\"write_failed\"}}); retrying with the next batch"
                    );
                    warned = Some(std::time::Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Vec<FlowRecord> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/explain/answered/node-a.jsonl"
        );
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn batches_are_named_counted_kept_and_written_in_order() {
        let dir = std::env::temp_dir().join(format!("observer-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flows.jsonl");
        let log = FlowLog::open(path.to_str().unwrap()).unwrap();
        let mut names = Names::default();
        names.insert_pod(
            "10.244.1.10".parse().unwrap(),
            crate::names::PodName {
                name: "client-x".into(),
                namespace: "shop".into(),
                labels: Default::default(),
                node: "node-a".into(),
            },
        );
        let metrics = Arc::new(Metrics::new("node-a"));
        let recent = Arc::new(RecentFlows::new(10, 16, || {}));
        let exporter = Exporter {
            names: Arc::new(RwLock::new(names)),
            metrics: metrics.clone(),
            recent: recent.clone(),
            otlp: None,
        };
        let (tx, rx) = mpsc::channel(2);
        let task = tokio::spawn(exporter.run(log, rx));
        let mut records = recorded();
        for r in &mut records {
            r.src_pod = None;
        }
        let n = records.len();
        tx.send(records.clone()).await.unwrap();
        tx.send(records).await.unwrap();
        drop(tx);
        task.await.unwrap();

        let written: Vec<FlowRecord> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            written.len(),
            2 * n,
            "both batches, every record, when the stage ends"
        );
        let tcp = written
            .iter()
            .find(|r| r.proto == "TCP")
            .expect("the TCP record");
        assert_eq!(
            tcp.src_pod.as_ref().unwrap().name,
            "client-x",
            "named on the way"
        );
        assert_eq!(
            metrics.records.with_label_values(&["final"]).get(),
            2 * n as u64
        );
        assert!(
            recent
                .body(&Default::default())
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                == 2 * n,
            "final records are kept for /flows"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
