//! Lab traffic: the servers `lab up` runs in pods, and a client to drive requests.
//!
//! TCP servers answer one HTTP-like request per connection with the pod name, so curl works
//! against them; UDP servers echo the pod name.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    time::timeout,
};

use crate::cli::{ClientArgs, L4, ServeArgs};

pub async fn serve(args: ServeArgs) -> std::io::Result<()> {
    let name: Arc<str> = args.name.clone().into();
    let mut tasks = Vec::new();
    for port in args.tcp_ports {
        // `[::]` accepts IPv4 too (bindv6only is 0 in a fresh namespace).
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(answer_tcp(s, name.clone()));
                }
            }
        }));
    }
    for port in args.udp_ports {
        let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).await?;
        let name = name.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                if let Ok((_, peer)) = sock.recv_from(&mut buf).await {
                    let _ = sock.send_to(format!("{name}\n").as_bytes(), peer).await;
                }
            }
        }));
    }
    if let Some(ready) = &args.ready_file {
        std::fs::write(ready, b"ready\n")?;
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn answer_tcp(mut s: TcpStream, name: Arc<str>) {
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    // Read the request head; clients may hold a connection open a while before asking.
    let _ = timeout(Duration::from_secs(30), async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(4).any(|w| w == b"\r\n\r\n") || seen.len() > 64 * 1024 {
                break;
            }
        }
    })
    .await;
    let body = format!("{name}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A TCP connection to `args.to`, from `args.source_port` if given. The previous connection
/// from that port may still be closing (LAST_ACK): the 4-tuple is busy for a moment, so retry.
async fn connect(args: &ClientArgs) -> std::io::Result<TcpStream> {
    let Some(port) = args.source_port else {
        return TcpStream::connect(args.to).await;
    };
    let mut tries = 0;
    loop {
        let sock = if args.to.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        let local: SocketAddr = if args.to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, port).into()
        };
        let r = match sock.bind(local) {
            Ok(()) => sock.connect(args.to).await,
            Err(e) => Err(e),
        };
        match r {
            Err(e)
                if tries < 40
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// What one exchange saw.
pub(crate) struct Exchange {
    /// The answering pod's name.
    pub answer: String,
    /// The peer as the socket API reports it (getpeername() for TCP, the reply's source for
    /// UDP): behind a socket load balancer, the backend it connected to, or the Service address
    /// it shows replies as coming from.
    pub peer: String,
    /// The client's own port: with its address, what names the connection in flow records.
    pub local_port: u16,
}

/// One exchange with `args.to`.
pub(crate) async fn exchange(args: &ClientArgs) -> Result<Exchange, String> {
    match args.proto {
        L4::Tcp => {
            let mut s = timeout(args.timeout, connect(args))
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| format!("connect: {e}"))?;
            let peer = s
                .peer_addr()
                .map_err(|e| format!("getpeername: {e}"))?
                .to_string();
            let local_port = s
                .local_addr()
                .map_err(|e| format!("getsockname: {e}"))?
                .port();
            tokio::time::sleep(args.hold).await;
            s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nUser-Agent: observer-lab\r\n\r\n")
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut resp = Vec::new();
            timeout(args.timeout, s.read_to_end(&mut resp))
                .await
                .map_err(|_| "answer timed out".to_owned())?
                .map_err(|e| format!("receive: {e}"))?;
            let text = String::from_utf8_lossy(&resp);
            text.split("\r\n\r\n")
                .nth(1)
                .map(|b| Exchange {
                    answer: b.trim().to_owned(),
                    peer,
                    local_port,
                })
                .ok_or_else(|| "malformed answer".to_owned())
        }
        L4::Udp => {
            let port = args.source_port.unwrap_or(0);
            let local: SocketAddr = if args.to.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, port).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, port).into()
            };
            let sock = UdpSocket::bind(local)
                .await
                .map_err(|e| format!("bind: {e}"))?;
            tokio::time::sleep(args.hold).await;
            sock.send_to(b"hello\n", args.to)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 2048];
            let (n, from) = timeout(args.timeout, sock.recv_from(&mut buf))
                .await
                .map_err(|_| "answer timed out".to_owned())?
                .map_err(|e| format!("receive: {e}"))?;
            Ok(Exchange {
                answer: String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                peer: from.to_string(),
                local_port: sock
                    .local_addr()
                    .map_err(|e| format!("getsockname: {e}"))?
                    .port(),
            })
        }
    }
}

/// Run `count` exchanges, `concurrency` at a time; print a JSON summary. Returns whether all
/// succeeded.
pub async fn client(args: ClientArgs) -> bool {
    let concurrency = if args.source_port.is_some() {
        1
    } else {
        args.concurrency.max(1)
    };
    let args = Arc::new(args);
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let args = args.clone();
        let permit = gate.clone().acquire_owned().await.expect("semaphore open");
        tasks.push(tokio::spawn(async move {
            let r = exchange(&args).await;
            drop(permit);
            r
        }));
    }
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut peers: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok(Ok(x)) => {
                *answers.entry(x.answer).or_default() += 1;
                *peers.entry(x.peer).or_default() += 1;
            }
            Ok(Err(e)) => *errors.entry(e).or_default() += 1,
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    let ok: usize = answers.values().sum();
    let failed: usize = errors.values().sum();
    println!(
        "{}",
        serde_json::json!({ "to": args.to.to_string(), "ok": ok, "failed": failed, "answers": answers, "peers": peers, "errors": errors })
    );
    failed == 0
}
