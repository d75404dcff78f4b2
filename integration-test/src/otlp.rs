//! A real OTLP/gRPC logs receiver (tonic, with the `opentelemetry-proto` crate's service
//! definitions), listening inside a lab node's network namespace, keeping what it is sent.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    logs::v1::LogRecord,
};

/// What it was sent, and how long it takes to answer each call (ms): a slow receiver.
struct Keep(Arc<Mutex<Vec<LogRecord>>>, Arc<AtomicU64>);

#[tonic::async_trait]
impl LogsService for Keep {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let delay = self.1.load(Ordering::Relaxed);
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
        self.0.lock().unwrap().extend(records);
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

impl Receiver {
    /// Listen on `addr` inside the network namespace `ns` (`ip netns` name).
    pub fn start(ns: &str, addr: &str) -> Receiver {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let delay = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (path, addr, kept, slow) = (
            format!("/run/netns/{ns}"),
            addr.to_owned(),
            logs.clone(),
            delay.clone(),
        );
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
                ready_tx.send(()).unwrap();
                tonic::transport::Server::builder()
                    .add_service(LogsServiceServer::new(Keep(kept, slow)))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .expect("serving");
            });
        });
        ready.recv().expect("receiver listening");
        Receiver {
            logs,
            delay,
            stop: Some(stop),
            thread: Some(thread),
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
