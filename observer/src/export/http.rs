//! The agent's HTTP endpoints, on hyper: /metrics, /healthz and /readyz for Prometheus and the
//! kubelet, and, on a listener of its own and only for whom `flows_auth` lets in, /flows (the
//! recent records, or with `?follow=1` every record as it is made).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{net::TcpListener, sync::Notify};

use super::{
    flows_auth::{FLOWS_PATH, FlowsAuth, Verdict},
    metrics::Metrics,
    recent::{Follow, RecentFlows, Select},
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

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// A client gets this long to send its request and take the answer: a stuck scraper holds one
/// task and a socket for that long, never the agent's loop. A following client has no such
/// limit; it is closed when it falls behind instead.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

/// What one connection's answer needs from its request handler: whether it became a stream
/// (no overall timeout then) and the signal to close it (a follower dropped for lagging).
#[derive(Default)]
struct Conn {
    streaming: AtomicBool,
    close: Arc<Notify>,
}

/// Kernel send buffer of a /flows connection: with the per-client queue, what a client that
/// stopped reading can hold up before it is dropped (Linux would grow it to `tcp_wmem`'s 4 MiB).
const FLOWS_SNDBUF: usize = 256 << 10;
/// hyper's own buffer per connection, likewise.
const FLOWS_HYPER_BUF: usize = 64 << 10;

/// Accept forever; each connection is served (one request, no keep-alive) in a task of its own.
/// `bounded` caps the connection's send buffers (a following client's).
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, bounded: bool, answer: F)
where
    F: Fn(Request<hyper::body::Incoming>, Arc<Conn>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        if bounded
            && let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(FLOWS_SNDBUF)
        {
            debug!("{what} client {peer}: SO_SNDBUF: {e}");
        }
        tokio::spawn(async move {
            let conn = Arc::new(Conn::default());
            let svc = {
                let conn = conn.clone();
                service_fn(move |req| {
                    let fut = answer(req, conn.clone());
                    async move { Ok::<_, Infallible>(fut.await) }
                })
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                .keep_alive(false);
            if bounded {
                builder.max_buf_size(FLOWS_HYPER_BUF);
            }
            let serving = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(serving);
            let deadline = tokio::time::sleep(CLIENT_TIMEOUT);
            tokio::pin!(deadline);
            let mut timed = true;
            loop {
                tokio::select! {
                    r = &mut serving => {
                        if let Err(e) = r {
                            debug!("{what} client {peer}: {e}");
                        }
                        return;
                    }
                    () = &mut deadline, if timed => {
                        // A stream has no overall limit: it is closed when it falls behind.
                        if conn.streaming.load(Ordering::Relaxed) {
                            timed = false;
                            continue;
                        }
                        debug!("{what} client {peer}: timed out");
                        return;
                    }
                    () = conn.close.notified() => {
                        debug!("{what} client {peer}: fell behind, closed");
                        return;
                    }
                }
            }
        });
    }
}

/// /metrics, /healthz and /readyz: what Prometheus and the kubelet read, no secrets in them.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    accept_loop(listener, "metrics", false, move |req, _conn| {
        let (metrics, health) = (metrics.clone(), health.clone());
        async move {
            match req.uri().path() {
                "/metrics" => text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.encode(),
                ),
                "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
                "/readyz" if health.ready.load(Ordering::Relaxed) => text(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready\n{}\n", health.hooks.get().map_or("", String::as_str)),
                ),
                "/readyz" => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "hooks not attached yet\n",
                ),
                _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
            }
        }
    })
    .await
}

/// `/flows` query: `follow=1` streams; `last=N` limits the final records sent first, `since=T`
/// to those written after T.
#[derive(Debug, Default, PartialEq)]
struct FlowsQuery {
    follow: bool,
    select: Select,
}

impl FlowsQuery {
    fn parse(q: Option<&str>) -> Result<FlowsQuery, String> {
        let mut out = FlowsQuery::default();
        for kv in q.unwrap_or_default().split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "follow" => out.follow = matches!(v, "" | "1" | "true"),
                "last" => {
                    out.select.last = Some(v.parse().map_err(|_| format!("last={v}: not a count"))?)
                }
                "since" => {
                    humantime::parse_rfc3339_weak(v)
                        .map_err(|_| format!("since={v}: not an RFC 3339 time"))?;
                    out.select.since = Some(v.to_owned())
                }
                _ => return Err(format!("unknown parameter {k:?} (follow, last, since)")),
            }
        }
        Ok(out)
    }
}

/// Header of a following answer: how many of its first lines were already recorded (the
/// snapshot); the rest are new. `observer observe` tells history from live by it.
pub const SNAPSHOT_LINES: &str = "x-observer-snapshot-lines";

fn stream(f: Follow) -> Response<Body> {
    let n = f.snapshot.len();
    let history = futures_util::stream::iter(f.snapshot);
    let live =
        futures_util::stream::unfold(
            f.live,
            |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
        );
    let frames = futures_util::StreamExt::map(futures_util::StreamExt::chain(history, live), |b| {
        Ok::<_, Infallible>(Frame::data(b))
    });
    let mut r = Response::new(StreamBody::new(frames).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(SNAPSHOT_LINES, n.into());
    r
}

/// /flows on a listener of its own (`--flows-addr`): every pod's connections, with pids and
/// process names, so only for a client that `auth` lets in.
pub async fn serve_flows(
    listener: TcpListener,
    flows: Arc<RecentFlows>,
    auth: Arc<FlowsAuth>,
    metrics: Arc<Metrics>,
) {
    accept_loop(listener, "flows", true, move |req, conn| {
        let (flows, auth, metrics) = (flows.clone(), auth.clone(), metrics.clone());
        async move {
            if req.uri().path() != FLOWS_PATH {
                return text(StatusCode::NOT_FOUND, "text/plain", "not found\n");
            }
            let query = match FlowsQuery::parse(req.uri().query()) {
                Ok(q) => q,
                Err(e) => return text(StatusCode::BAD_REQUEST, "text/plain", e + "\n"),
            };
            let bearer = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let verdict = auth.check(bearer).await;
            metrics.on_flows_request(verdict.outcome());
            match verdict {
                Verdict::Allowed if query.follow => {
                    match flows.follow(&query.select, conn.close.clone()) {
                        Some(f) => {
                            conn.streaming.store(true, Ordering::Relaxed);
                            stream(f)
                        }
                        None => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "text/plain",
                            "too many clients follow this agent's flows; try again later\n",
                        ),
                    }
                }
                Verdict::Allowed => text(
                    StatusCode::OK,
                    "application/x-ndjson",
                    flows.body(&query.select),
                ),
                Verdict::Unauthenticated => {
                    let mut r = text(
                        StatusCode::UNAUTHORIZED,
                        "text/plain",
                        "a valid bearer token is required (--token-file for observer explain)\n",
                    );
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer realm=\"observer flows\""),
                    );
                    r
                }
                Verdict::Forbidden => text(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    format!("this token's user may not get {FLOWS_PATH}\n"),
                ),
                Verdict::Unavailable(why) => {
                    warn!("/flows: the token could not be checked: {why}");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("the token could not be checked: {why}\n"),
                    )
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::{FlowsQuery, Select};

    #[test]
    fn flows_query() {
        assert_eq!(FlowsQuery::parse(None).unwrap(), FlowsQuery::default());
        assert_eq!(
            FlowsQuery::parse(Some("follow=1&last=5&since=2026-12-02T13:00:00.000000000Z"))
                .unwrap(),
            FlowsQuery {
                follow: true,
                select: Select {
                    last: Some(5),
                    since: Some("2026-12-02T13:00:00.000000000Z".into())
                }
            }
        );
        assert!(FlowsQuery::parse(Some("since=yesterday")).is_err());
        assert!(FlowsQuery::parse(Some("last=x")).is_err());
        assert!(FlowsQuery::parse(Some("grep=1")).is_err());
    }
}
