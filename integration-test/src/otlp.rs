//! A real OTLP/gRPC logs receiver (tonic, with the `opentelemetry-proto` crate's service
//! definitions), listening inside a lab node's network namespace, keeping what it is sent.

use std::{
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    logs::v1::LogRecord,
};

struct Keep(Arc<Mutex<Vec<LogRecord>>>);

#[tonic::async_trait]
impl LogsService for Keep {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    /// Listen on `addr` inside the network namespace `ns` (`ip netns` name).
    pub fn start(ns: &str, addr: &str) -> Receiver {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (path, addr, kept) = (format!("/run/netns/{ns}"), addr.to_owned(), logs.clone());
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
                    .add_service(LogsServiceServer::new(Keep(kept)))
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
