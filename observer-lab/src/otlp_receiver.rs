//! A real OTLP/gRPC logs receiver (tonic, with the `opentelemetry-proto` crate's service
//! definitions), listening inside a lab node's network namespace, keeping what it is sent:
//! `observer-lab otlp-receiver` prints it (a newcomer sees the agent's OTLP export arrive without
//! an OpenTelemetry Collector), and the tests read it.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    logs::v1::LogRecord,
};

/// What it was sent, and how long it takes to answer each call (ms): a slow receiver; with
/// `print`, each record's body on stdout as it comes.
struct Keep {
    logs: Arc<Mutex<Vec<LogRecord>>>,
    delay: Arc<AtomicU64>,
    print: bool,
}

#[tonic::async_trait]
impl LogsService for Keep {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let delay = self.delay.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            // A client that gave up meanwhile sends the batch again: keep nothing of this one.
            return Err(tonic::Status::deadline_exceeded("slow on purpose"));
        }
        let records = req
            .into_inner()
            .resource_logs
            .into_iter()
            .flat_map(|r| r.scope_logs)
            .flat_map(|s| s.log_records);
        let mut logs = self.logs.lock().expect("not poisoned");
        for r in records {
            if self.print {
                println!("{}", body_text(&r));
            }
            logs.push(r);
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// Stops (and joins its thread) when dropped.
pub struct Receiver {
    pub logs: Arc<Mutex<Vec<LogRecord>>>,
    /// Milliseconds each call takes before it is refused (0: answered at once).
    pub delay: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A log record's body as text (observer sends the JSON record as a string body).
pub fn body_text(r: &LogRecord) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match r.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

impl Receiver {
    /// Listen on `addr` inside the network namespace `ns` (`ip netns` name); with `print`, each
    /// record's body goes to stdout as it arrives.
    pub fn start(ns: &str, addr: &str, print: bool) -> anyhow::Result<Receiver> {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let delay = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (path, addr, kept, slow) = (
            format!("/run/netns/{ns}"),
            addr.to_owned(),
            logs.clone(),
            delay.clone(),
        );
        let thread = std::thread::spawn(move || {
            let serve = async move {
                let f = std::fs::File::open(&path)
                    .with_context(|| format!("network namespace {path}"))?;
                // SAFETY: setns on this thread only, with a namespace file we hold open.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering {path}: {}", std::io::Error::last_os_error());
                }
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("listening on {addr} in {path}"))?;
                Ok(listener)
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(async move {
                let listener = match serve.await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let keep = Keep {
                    logs: kept,
                    delay: slow,
                    print,
                };
                let served = tonic::transport::Server::builder()
                    .add_service(LogsServiceServer::new(keep))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
                if let Err(e) = served {
                    log::error!("OTLP receiver: {e}");
                }
            });
        });
        ready
            .recv()
            .context("the receiver's thread ended before listening")??;
        Ok(Receiver {
            logs,
            delay,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Serve until the process is stopped.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
