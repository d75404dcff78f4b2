//! An agent's `/flows` over HTTP (hyper): the recent records at once (`explain`), or followed as
//! they are made (`observe -f`). Every wait is bounded: connecting, the answer's head, and for
//! a snapshot its whole body and size.

use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The most of an agent's answer read at once (it serves 1,000 final records and the open
/// connections' latest: a few MiB).
pub const FETCH_MAX: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// When a record line was written (its `time`), without parsing the rest.
pub fn time_of(line: &str) -> Option<&str> {
    let rest = &line[line.find("\"time\":\"")? + 8..];
    Some(&rest[..rest.find('"')?])
}

/// The agent's header naming how many first lines of a followed answer are history.
const SNAPSHOT_LINES: &str = "x-observer-snapshot-lines";

/// `http://HOST:PORT[/PATH]`, the path `/flows` if none; with what its discovery knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    pub host: String,
    pub path: String,
    /// Connect from inside this network namespace (a lab node's), not the reader's own.
    pub netns: Option<String>,
    /// The token this agent wants, over the reader's `--token-file`.
    pub token: Option<String>,
}

impl AgentUrl {
    pub fn parse(url: &str) -> anyhow::Result<AgentUrl> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs"))?;
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/flows".to_owned()), |(h, p)| (h, format!("/{p}")));
        if host.is_empty() {
            bail!("{url}: no host");
        }
        Ok(AgentUrl {
            host: host.to_owned(),
            path,
            netns: None,
            token: None,
        })
    }

    fn with_query(&self, q: &str) -> String {
        let sep = if self.path.contains('?') { '&' } else { '?' };
        format!("{}{sep}{q}", self.path)
    }
}

impl std::fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.host, self.path)
    }
}

/// A connection made from inside network namespace `ns`: the socket stays in the namespace it
/// was made in, so only the connecting thread (one of its own, as setns moves the caller)
/// enters it.
async fn connect_in(
    ns: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<std::io::Result<tokio::net::TcpStream>> {
    let ns = ns.to_owned();
    let made = tokio::task::spawn_blocking(move || {
        std::thread::spawn(
            move || -> anyhow::Result<std::io::Result<std::net::TcpStream>> {
                crate::netns::enter(&ns)?;
                Ok(std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
            },
        )
        .join()
        .map_err(|_| anyhow::anyhow!("the thread connecting in a network namespace panicked"))?
    })
    .await??;
    Ok(made.and_then(|s| {
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    }))
}

async fn get(
    url: &AgentUrl,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<http::Response<Incoming>> {
    let addr = tokio::net::lookup_host(&url.host)
        .await
        .with_context(|| format!("resolving {}", url.host))?
        .next()
        .with_context(|| format!("{} has no address", url.host))?;
    let tcp = match &url.netns {
        None => tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {}: timed out", url.host))?,
        Some(ns) => connect_in(ns, addr).await?,
    }
    .with_context(|| format!("connecting to {}", url.host))?;
    let token = url.token.as_deref().or(token);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .with_context(|| format!("talking to {}", url.host))?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header(header::HOST, &url.host);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {ANSWER_TIMEOUT:?}"))?
        .with_context(|| format!("{url}: the request failed"))?;
    match resp.status() {
        StatusCode::OK => Ok(resp),
        StatusCode::UNAUTHORIZED => {
            bail!("{url}: 401 Unauthorized: the agent wants its /flows token (--token-file)")
        }
        s => {
            let why = tokio::time::timeout(
                ANSWER_TIMEOUT,
                Limited::new(resp.into_body(), 4096).collect(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
            bail!("{url}: {s}: {why}")
        }
    }
}

/// The agent's recent records (its /flows body): final ones and open connections' latest.
pub async fn fetch(url: &AgentUrl, token: Option<&str>) -> anyhow::Result<String> {
    let resp = get(url, &url.path, token).await?;
    let body = tokio::time::timeout(
        ANSWER_TIMEOUT,
        Limited::new(resp.into_body(), FETCH_MAX).collect(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("{url}: the answer took over {ANSWER_TIMEOUT:?}"))?
    .map_err(|e| anyhow::anyhow!("{url}: {e} (the most read is {} MiB)", FETCH_MAX >> 20))?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// [`fetch`] for callers without a runtime.
pub fn fetch_blocking(url: &str, token: Option<&str>) -> anyhow::Result<String> {
    let url = AgentUrl::parse(url)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fetch(&url, token))
}

/// A followed /flows: lines as they come, the first `history` of them already recorded when
/// the request arrived.
pub struct Followed {
    pub history: usize,
    body: Incoming,
    partial: Vec<u8>,
}

/// Follow the agent's records: first the last `last` final ones (all it keeps, if None), or
/// those written after `since` (picking up where a cut stream left off).
pub async fn follow(
    url: &AgentUrl,
    token: Option<&str>,
    last: Option<usize>,
    since: Option<&str>,
) -> anyhow::Result<Followed> {
    let mut q = "follow=1".to_owned();
    if let Some(n) = last {
        q += &format!("&last={n}");
    }
    if let Some(t) = since {
        q += &format!("&since={t}");
    }
    let resp = get(url, &url.with_query(&q), token).await?;
    let history = resp
        .headers()
        .get(SNAPSHOT_LINES)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    Ok(Followed {
        history,
        body: resp.into_body(),
        partial: Vec::new(),
    })
}

impl Followed {
    /// The next complete lines; None when the agent ended the stream.
    pub async fn lines(&mut self) -> anyhow::Result<Option<Vec<String>>> {
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            self.partial.extend_from_slice(&data);
            if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
                let rest = self.partial.split_off(end + 1);
                let done = std::mem::replace(&mut self.partial, rest);
                return Ok(Some(
                    String::from_utf8_lossy(&done)
                        .lines()
                        .map(str::to_owned)
                        .collect(),
                ));
            }
            if self.partial.len() > FETCH_MAX {
                bail!("a line of over {} MiB", FETCH_MAX >> 20);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AgentUrl;

    #[test]
    fn record_times() {
        let l =
            r#"{"schema":"observer.flow/v3","time":"2026-12-02T14:29:46.147781029Z","node":"a"}"#;
        assert_eq!(super::time_of(l), Some("2026-12-02T14:29:46.147781029Z"));
        assert_eq!(super::time_of("{}"), None);
    }

    #[test]
    fn agent_urls() {
        let u = AgentUrl::parse("http://10.0.0.5:9465").unwrap();
        assert_eq!(
            (u.host.as_str(), u.path.as_str()),
            ("10.0.0.5:9465", "/flows")
        );
        assert_eq!(u.with_query("follow=1"), "/flows?follow=1");
        let u = AgentUrl::parse("http://[fd00::1]:9465/flows?last=3").unwrap();
        assert_eq!(u.with_query("follow=1"), "/flows?last=3&follow=1");
        assert!(AgentUrl::parse("https://x/flows").is_err());
        assert!(AgentUrl::parse("http:///flows").is_err());
    }
}
