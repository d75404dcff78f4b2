//! Malformed and truncated frames entering from a pod are counted, never turned into flows; stuck
//! HTTP clients hold nothing up.

use std::{ffi::CString, os::fd::AsRawFd as _, time::Duration};

use integration_test::*;

/// Send raw Ethernet frames out of `eth0` inside network namespace `ns`, from a thread that
/// enters it (setns moves only the calling thread).
fn send_frames(ns: &str, frames: Vec<Vec<u8>>) {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || unsafe {
        let f = std::fs::File::open(&path).expect("netns file");
        assert_eq!(libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
        let ifname = CString::new("eth0").unwrap();
        let ifindex = libc::if_nametoindex(ifname.as_ptr());
        assert_ne!(ifindex, 0);
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        for frame in frames {
            let n = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(n, frame.len() as isize, "sendto");
        }
        libc::close(fd);
    })
    .join()
    .expect("sender thread");
}

fn ipv4(ver_ihl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = vec![ver_ihl, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 1, 0, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&[10, 9, 9, 9]);
    h.extend_from_slice(&[10, 244, 2, 10]);
    h.extend_from_slice(payload);
    h
}

#[test]
fn malformed_and_truncated_frames_are_counted_not_parsed() {
    let mut lab = lab("junk", None);
    lab.start_agent(
        "node-a",
        &["--idle-timeout", "1s", "--poll-interval", "200ms"],
    )
    .unwrap();
    let frames = vec![
        // IHL 2 (8 bytes): impossible IPv4 header.
        ethernet(&[], 0x0800, &ipv4(0x42, 6, &[0; 20])),
        // IPv4 header announcing TCP, with only 2 bytes of TCP header.
        ethernet(&[], 0x0800, &ipv4(0x45, 6, &[0x1f, 0x90]))[..14 + 22].to_vec(),
        // IPv6 header cut after 20 bytes.
        ethernet(
            &[],
            0x86dd,
            &[
                0x60, 0, 0, 0, 0, 20, 6, 64, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        // Not IP at all.
        ethernet(&[], 0x88b5, &[0; 46]),
    ];
    send_frames(&lab.ns("pod-a"), frames);
    std::thread::sleep(Duration::from_millis(800));
    let m = lab.metrics("node-a").unwrap();
    promtool_check(&m);
    assert!(
        metric(&m, "observer_parse_errors_total", &[("kind", "malformed")]).unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "observer_parse_errors_total", &[("kind", "truncated")]).unwrap() >= 2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "observer_packets_untracked_total",
            &[("reason", "non_ip")]
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );

    lab.stop_agent("node-a").unwrap();
    let recs = lab.records("node-a").unwrap();
    assert!(
        !recs.iter().any(|r| r.to_string().contains("10.9.9.9")),
        "a malformed frame became a flow: {recs:?}"
    );
}

/// Open `n` connections to the agent's metrics port inside node `ns`, each sending half a request
/// and then nothing; after `hold`, report how many the agent had closed.
fn stuck_clients(ns: &str, n: usize, hold: Duration) -> std::thread::JoinHandle<usize> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let f = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let mut conns: Vec<std::net::TcpStream> = (0..n)
            .map(|_| {
                let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("connect");
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
                s
            })
            .collect();
        std::thread::sleep(hold);
        conns
            .iter_mut()
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                matches!(s.read(&mut [0u8; 64]), Ok(0))
            })
            .filter(|closed| *closed)
            .count()
    })
}

#[test]
fn stuck_http_clients_block_nothing_and_are_let_go() {
    let lab = lab_with_agents("stuck", "1s");
    let holders = stuck_clients(&lab.ns("node-a"), 40, Duration::from_secs(12));
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile the agent answers others and records connections.
    let t0 = std::time::Instant::now();
    assert_eq!(lab.http("node-a", "/healthz").unwrap().trim(), "ok");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(curl_web(&lab, "pod-a", 5).status.success());
    lab.wait_records("node-a", WAIT, |rs| rs.iter().any(|r| r["final"] == true))
        .unwrap();
    // Each stuck client is cut off after the agent's 10 s per client.
    assert_eq!(holders.join().unwrap(), 40, "every stuck client was closed");
}
