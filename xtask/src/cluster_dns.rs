//! A stand-in for cluster DNS in the one-node cluster, which runs none: A records for the names
//! it is given (a headless Service's `NAME.NS.svc.cluster.local`, one per endpoint), NXDOMAIN
//! for the rest, over UDP in the node's network (RFC 1035, section 4). Enough for Prometheus'
//! `dns_sd_configs` in `deploy/prometheus/scrape.yml` to find the agents as in a cluster.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

pub struct Dns {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve `records` on `addr`:53 inside network namespace `ns` until dropped.
pub fn serve(
    ns: &str,
    addr: Ipv4Addr,
    records: Vec<(String, Vec<Ipv4Addr>)>,
) -> anyhow::Result<Dns> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let path = format!("/run/netns/{ns}");
    let thread = std::thread::spawn(move || {
        let sock = (|| -> anyhow::Result<UdpSocket> {
            let f = std::fs::File::open(&path)?;
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering {path}: {}", std::io::Error::last_os_error());
            }
            let s = UdpSocket::bind((addr, 53)).with_context(|| format!("binding {addr}:53"))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })();
        let sock = match sock {
            Ok(s) => {
                let _ = ready_tx.send(Ok(()));
                s
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let mut buf = [0u8; 512];
        while !stopped.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if let Some(answer) = answer(&buf[..n], &records) {
                let _ = sock.send_to(&answer, from);
            }
        }
    });
    ready.recv().context("the DNS thread ended")??;
    Ok(Dns {
        stop,
        thread: Some(thread),
    })
}

/// The reply to one query: its question echoed, then an A record per address of the name asked
/// (for type A or ANY), or NXDOMAIN for a name not in `records`. None for what is no query.
fn answer(q: &[u8], records: &[(String, Vec<Ipv4Addr>)]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let name = labels.join(".");
    let found = records.iter().find(|(n, _)| *n == name);
    let ips: &[Ipv4Addr] = match (found, qtype) {
        (Some((_, ips)), 1 | 255) => ips,
        _ => &[],
    };
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    // QR, opcode 0, AA, RD as asked; RA; RCODE 3 (NXDOMAIN) for an unknown name.
    out.push(0x84 | (q[2] & 0x01));
    out.push(if found.is_some() { 0x80 } else { 0x83 });
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        // A pointer to the question's name, type A, class IN, TTL 5 s, 4 bytes of address.
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn answers_a_records_and_nxdomain() {
        let records = vec![(
            "svc.ns.svc.cluster.local".to_owned(),
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
        )];
        let a = answer(&query("svc.ns.svc.cluster.local", 1), &records).unwrap();
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, 0, "no error");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 2, "two answers");
        assert_eq!(&a[a.len() - 4..], &[10, 0, 0, 2]);
        let none = answer(&query("other.example", 1), &records).unwrap();
        assert_eq!(none[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(u16::from_be_bytes([none[6], none[7]]), 0);
        let aaaa = answer(&query("svc.ns.svc.cluster.local", 28), &records).unwrap();
        assert_eq!(u16::from_be_bytes([aaaa[6], aaaa[7]]), 0, "no AAAA");
        assert!(answer(&[0; 5], &records).is_none());
    }
}
