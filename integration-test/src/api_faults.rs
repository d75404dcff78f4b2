//! Faults of a real kube-apiserver, on demand: a proxy on loopback that the agent reaches over
//! plain HTTP (kube-rs speaks `http://` too) and that reaches the API server over TLS. It passes
//! requests through, or answers them itself as a broken API server would: every request with
//! 500, or every watch with the `410 Gone` event of a resource version too old (how the API
//! server says a watch must start again from a list: "Efficient detection of changes",
//! https://kubernetes.io/docs/reference/using-api/api-concepts/). Changing the fault cuts the
//! connections open at that moment, as a restarting API server would.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsConnector, rustls};

use crate::kube::KubeApi;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every request: `500 Internal Server Error`.
    InternalError,
    /// Every watch: a `410 Gone` error event, as for an expired resource version; lists pass.
    WatchGone,
}

pub struct ApiFaults {
    /// A kubeconfig for the admin user through the proxy.
    pub kubeconfig: PathBuf,
    fault: watch::Sender<Fault>,
    _rt: tokio::runtime::Runtime,
}

impl ApiFaults {
    pub fn start(api: &KubeApi, dir: &Path) -> anyhow::Result<ApiFaults> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&api.ca)? {
            roots.add(c?)?;
        }
        let tls = TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ));
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let (fault, _) = watch::channel(Fault::None);
        let upstream = api.port;
        let faults = fault.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (tls, rx) = (tls.clone(), faults.subscribe());
                tokio::spawn(async move {
                    let _ = proxy(client, upstream, tls, rx).await;
                });
            }
        });
        let kubeconfig = dir.join("kubeconfig-faults");
        std::fs::write(
            &kubeconfig,
            crate::kube::kubeconfig(&format!("http://127.0.0.1:{port}"), None),
        )
        .context("writing the proxy's kubeconfig")?;
        Ok(ApiFaults {
            kubeconfig,
            fault,
            _rt: rt,
        })
    }

    pub fn set(&self, f: Fault) {
        self.fault.send_replace(f);
    }
}

/// One client connection: one request (it is asked to close after it, so the next request
/// comes on a new connection and meets the fault of its time).
async fn proxy(
    mut client: TcpStream,
    upstream: u16,
    tls: TlsConnector,
    mut fault: watch::Receiver<Fault>,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = client.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before a request");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(head.len() < 64 << 10, "request head too long");
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("/");
    let is_watch = target.contains("watch=true") || target.contains("watch=1");
    let now = *fault.borrow_and_update();
    match now {
        Fault::InternalError => {
            return answer(
                &mut client,
                "500 Internal Server Error",
                &status(500, "InternalError"),
            )
            .await;
        }
        Fault::WatchGone if is_watch => {
            let event = format!(
                "{{\"type\":\"ERROR\",\"object\":{}}}\n",
                status(410, "Expired")
            );
            return answer(&mut client, "200 OK", &event).await;
        }
        _ => {}
    }
    let mut lines: Vec<&str> = text[..end - 4]
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.push("Connection: close");
    let mut request = (lines.join("\r\n") + "\r\n\r\n").into_bytes();
    request.extend_from_slice(&head[end..]);

    let tcp = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut server = tls.connect(name, tcp).await?;
    server.write_all(&request).await?;
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => { r?; }
        _ = fault.changed() => {}
    }
    Ok(())
}

fn status(code: u16, reason: &str) -> String {
    format!(
        r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"injected by the test","reason":"{reason}","code":{code}}}"#
    )
}

async fn answer(client: &mut TcpStream, status: &str, body: &str) -> anyhow::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(body.as_bytes()).await?;
    client.shutdown().await?;
    Ok(())
}
