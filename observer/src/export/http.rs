//! A minimal HTTP/1.1 server for /metrics, /healthz and /readyz: three read-only endpoints do
//! not justify a web framework.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use log::debug;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen on {addr}: {source} (is another agent or exporter using this port? pass --metrics-addr)"
)]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

pub struct Health {
    /// Set once every hook is attached.
    pub ready: AtomicBool,
    /// Which hooks run (and whether the filter view is measured), one per line.
    pub hooks: std::sync::OnceLock<String>,
}

/// What /flows serves for `observer explain http://NODE:9464/flows`: the last final records, and
/// the newest interim record of each connection still open (until its final record replaces it).
pub struct RecentFlows {
    lines: Mutex<VecDeque<String>>,
    cap: usize,
    /// Connection -> its newest interim record.
    open: Mutex<HashMap<String, String>>,
}

/// Open connections kept at most; beyond it a new one waits for its final record to be served.
const OPEN_MAX: usize = 10_000;

impl RecentFlows {
    pub fn new(cap: usize) -> RecentFlows {
        RecentFlows {
            lines: Default::default(),
            cap,
            open: Default::default(),
        }
    }

    /// Keep a record of connection `conn`: a final one ends its open entry.
    pub fn push(&self, conn: String, json_line: String, is_final: bool) {
        let mut open = self.open.lock().expect("not poisoned");
        if !is_final {
            if open.len() < OPEN_MAX || open.contains_key(&conn) {
                open.insert(conn, json_line);
            }
            return;
        }
        open.remove(&conn);
        drop(open);
        let mut l = self.lines.lock().expect("not poisoned");
        if l.len() == self.cap {
            l.pop_front();
        }
        l.push_back(json_line);
    }

    pub fn body(&self) -> String {
        let l = self.lines.lock().expect("not poisoned");
        let open = self.open.lock().expect("not poisoned");
        l.iter()
            .chain(open.values())
            .flat_map(|s| [s.as_str(), "\n"])
            .collect()
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    flows: Arc<RecentFlows>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        let flows = flows.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &metrics, &health, &flows).await {
                debug!("metrics client {peer}: {e}");
            }
        });
    }
}

async fn handle(
    mut s: TcpStream,
    metrics: &Metrics,
    health: &Health,
    flows: &RecentFlows,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/flows" => ("200 OK", "application/x-ndjson", flows.body()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => (
            "200 OK",
            "text/plain",
            format!("ready\n{}\n", health.hooks.get().map_or("", String::as_str)),
        ),
        "/readyz" => (
            "503 Service Unavailable",
            "text/plain",
            "hooks not attached yet\n".to_owned(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
