//! A minimal HTTP/1.1 server for /metrics, /healthz and /readyz, and, on a listener of its own and
//! only for whom `flows_auth` lets in, /flows: a few read-only endpoints do not justify a web
//! framework.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{
    flows_auth::{FLOWS_PATH, FlowsAuth, Verdict},
    metrics::Metrics,
};

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

/// A client gets this long to send its request and take the answer: a stuck scraper holds one
/// task and a socket for that long, never the agent's loop.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request asked for: its path and, if sent, its bearer token.
struct Request {
    path: String,
    bearer: Option<String>,
}

async fn read_request(s: &mut TcpStream) -> std::io::Result<Request> {
    // Headers only, and at most 4 KiB of them: nothing here takes a body.
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
    let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let bearer = req.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        let value = value.trim();
        (name.trim().eq_ignore_ascii_case("authorization"))
            .then(|| value.strip_prefix("Bearer ").map(|t| t.trim().to_owned()))?
    });
    Ok(Request { path, bearer })
}

async fn respond(
    s: &mut TcpStream,
    status: &str,
    ctype: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

/// Accept forever; each connection is answered by `answer` in a task of its own, within
/// [`CLIENT_TIMEOUT`].
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, answer: F)
where
    F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CLIENT_TIMEOUT, answer(stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("{what} client {peer}: {e}"),
                Err(_) => debug!("{what} client {peer}: timed out"),
            }
        });
    }
}

/// /metrics, /healthz and /readyz: what Prometheus and the kubelet read, no secrets in them.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    accept_loop(listener, "metrics", move |mut s| {
        let (metrics, health) = (metrics.clone(), health.clone());
        async move {
            let req = read_request(&mut s).await?;
            let (status, ctype, body) = match req.path.as_str() {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.encode(),
                ),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
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
            respond(&mut s, status, ctype, "", &body).await
        }
    })
    .await
}

/// /flows on a listener of its own (`--flows-addr`): every pod's connections, with pids and
/// process names, so only for a client that `auth` lets in.
pub async fn serve_flows(
    listener: TcpListener,
    flows: Arc<RecentFlows>,
    auth: Arc<FlowsAuth>,
    metrics: Arc<Metrics>,
) {
    accept_loop(listener, "flows", move |mut s| {
        let (flows, auth, metrics) = (flows.clone(), auth.clone(), metrics.clone());
        async move {
            let req = read_request(&mut s).await?;
            if req.path != FLOWS_PATH {
                return respond(&mut s, "404 Not Found", "text/plain", "", "not found\n").await;
            }
            let verdict = auth.check(req.bearer.as_deref()).await;
            metrics.on_flows_request(verdict.outcome());
            match verdict {
                Verdict::Allowed => {
                    respond(&mut s, "200 OK", "application/x-ndjson", "", &flows.body()).await
                }
                Verdict::Unauthenticated => {
                    respond(
                        &mut s,
                        "401 Unauthorized",
                        "text/plain",
                        "WWW-Authenticate: Bearer realm=\"observer flows\"\r\n",
                        "a valid bearer token is required (--token-file for observer explain)\n",
                    )
                    .await
                }
                Verdict::Forbidden => {
                    let why = format!("this token's user may not get {FLOWS_PATH}\n");
                    respond(&mut s, "403 Forbidden", "text/plain", "", &why).await
                }
                Verdict::Unavailable(why) => {
                    warn!("/flows: the token could not be checked: {why}");
                    let body = format!("the token could not be checked: {why}\n");
                    respond(&mut s, "503 Service Unavailable", "text/plain", "", &body).await
                }
            }
        }
    })
    .await
}
