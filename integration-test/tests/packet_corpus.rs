//! Malformed and adversarial frames through the real tc programs with `BPF_PROG_TEST_RUN`
//! (`observer test-run frames`): each is counted under the right stat and never becomes a flow
//! key with a wrong tuple. The frames are built here, independently of the programs' parser.

use std::collections::BTreeMap;

use integration_test::*;
use serde_json::Value;

const SRC4: [u8; 4] = [10, 1, 0, 1];
const DST4: [u8; 4] = [10, 2, 0, 1];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// IPv4 with `options` bytes of options (a multiple of 4) and the fragment field `frag`.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, options: usize, frag: u16, l4: &[u8]) -> Vec<u8> {
    let hl = 20 + options;
    let mut h = vec![0u8; hl];
    h[0] = 0x40 | (hl / 4) as u8;
    h[2..4].copy_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    for b in h.iter_mut().skip(20) {
        *b = 1; // NOP options
    }
    h.extend_from_slice(l4);
    h
}

/// IPv6 with extension headers `exts` (each: its type, 8 bytes long) before `proto`.
fn ipv6(exts: &[u8], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, _) in exts.iter().enumerate() {
        let next = exts.get(i + 1).copied().unwrap_or(proto);
        chain.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    h[6] = exts.first().copied().unwrap_or(proto);
    h[7] = 64;
    h[8..24].copy_from_slice(&SRC6);
    h[24..40].copy_from_slice(&DST6);
    h.extend_from_slice(&chain);
    h.extend_from_slice(l4);
    h
}

fn v4_tcp() -> Vec<u8> {
    ethernet(
        &[],
        0x0800,
        &ipv4(SRC4, DST4, 6, 0, 0x4000, &tcp(40000, 8443, 0x02)),
    )
}

fn v6_tcp(exts: &[u8]) -> Vec<u8> {
    ethernet(&[], 0x86DD, &ipv6(exts, 6, &tcp(40000, 8443, 0x02)))
}

/// What a frame must come to.
#[derive(Debug, Clone)]
enum Expect {
    /// Exactly this key (proto, src, dst), with these stats counted.
    Key(u8, &'static str, &'static str, &'static [&'static str]),
    /// No key; this stat counted once.
    Counted(&'static str),
    /// Either the kernel refuses it (no room for an Ethernet header) or it is counted as
    /// `Truncated` with no key.
    TooShort,
    /// Cut short: counted as `Truncated` with no key, or, when what is left still holds every
    /// field of the tuple, this exact key. Shorter than the fixed IP header (the last field),
    /// the kernel's test run may refuse it before the program runs (net/bpf/test_run.c).
    CutShort(u8, &'static str, &'static str, usize),
}

fn corpus() -> Vec<(String, Vec<u8>, Expect)> {
    let mut c: Vec<(String, Vec<u8>, Expect)> = Vec::new();
    let tcp4 = Expect::Key(6, "10.1.0.1:40000", "10.2.0.1:8443", &[]);
    let tcp6 = Expect::Key(6, "[fd00::1]:40000", "[fd00::2]:8443", &[]);
    c.push(("IPv4 TCP SYN".into(), v4_tcp(), tcp4.clone()));
    c.push(("IPv6 TCP SYN".into(), v6_tcp(&[]), tcp6.clone()));
    let full4 = v4_tcp();
    for len in 0..full4.len() {
        let e = if len <= 14 {
            Expect::TooShort
        } else {
            Expect::CutShort(6, "10.1.0.1:40000", "10.2.0.1:8443", 14 + 20)
        };
        c.push((format!("IPv4 TCP cut at {len}"), full4[..len].to_vec(), e));
    }
    let full6 = v6_tcp(&[0, 60]);
    for len in 0..full6.len() {
        let e = if len <= 14 {
            Expect::TooShort
        } else {
            Expect::CutShort(6, "[fd00::1]:40000", "[fd00::2]:8443", 14 + 40)
        };
        c.push((
            format!("IPv6 TCP (2 ext) cut at {len}"),
            full6[..len].to_vec(),
            e,
        ));
    }
    for ihl in 0..5u8 {
        let mut f = v4_tcp();
        f[14] = 0x40 | ihl;
        c.push((format!("IPv4 IHL {ihl}"), f, Expect::Counted("Malformed")));
    }
    let mut f = v4_tcp();
    f[14] = 0x65; // version 6 under the IPv4 ethertype
    c.push((
        "IPv4 ethertype, version 6".into(),
        f,
        Expect::Counted("Malformed"),
    ));
    let mut f = ethernet(&[], 0x0800, &ipv4(SRC4, DST4, 6, 0, 0, &[]));
    f[14] = 0x4f; // IHL 15: 60 bytes of header announced, 20 there
    c.push((
        "IPv4 IHL 15, no options".into(),
        f,
        Expect::Counted("Truncated"),
    ));
    c.push((
        "IPv4 with 12 bytes of options".into(),
        ethernet(
            &[],
            0x0800,
            &ipv4(SRC4, DST4, 6, 12, 0, &tcp(40000, 8443, 0x10)),
        ),
        tcp4.clone(),
    ));
    c.push((
        "IPv4 first fragment (MF, offset 0)".into(),
        ethernet(
            &[],
            0x0800,
            &ipv4(SRC4, DST4, 6, 0, 0x2000, &tcp(40000, 8443, 0x10)),
        ),
        tcp4.clone(),
    ));
    c.push((
        "IPv4 later fragment".into(),
        ethernet(&[], 0x0800, &ipv4(SRC4, DST4, 6, 0, 185, &[0xab; 64])),
        Expect::Key(6, "10.1.0.1:0", "10.2.0.1:0", &["Fragment"]),
    ));
    for n in 1..=4 {
        let exts: Vec<u8> = [0u8, 60, 43, 60][..n].to_vec();
        c.push((
            format!("IPv6, {n} extension headers"),
            v6_tcp(&exts),
            tcp6.clone(),
        ));
    }
    c.push((
        "IPv6, 5 extension headers (beyond what is followed)".into(),
        v6_tcp(&[0, 60, 43, 60, 60]),
        Expect::Counted("ExtHeaders"),
    ));
    let mut frag = ethernet(&[], 0x86DD, &ipv6(&[44], 6, &[0xab; 32]));
    frag[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&(100u16 << 3).to_be_bytes());
    c.push((
        "IPv6 later fragment".into(),
        frag,
        Expect::Key(6, "[fd00::1]:0", "[fd00::2]:0", &["Fragment"]),
    ));
    let ip = ipv4(SRC4, DST4, 6, 0, 0, &tcp(40000, 8443, 0x10));
    c.push((
        "802.1Q".into(),
        ethernet(&[0x8100], 0x0800, &ip),
        tcp4.clone(),
    ));
    c.push((
        "QinQ".into(),
        ethernet(&[0x88A8, 0x8100], 0x0800, &ip),
        tcp4.clone(),
    ));
    c.push((
        "three VLAN tags".into(),
        ethernet(&[0x88A8, 0x8100, 0x8100], 0x0800, &ip),
        Expect::Counted("NonIp"),
    ));
    // Encapsulated traffic is what the hook sees: the outer header.
    let inner = ethernet(&[], 0x0800, &ip);
    let mut gre = vec![0, 0, 0x65, 0x58]; // GRE, transparent Ethernet bridging
    gre.extend_from_slice(&inner);
    c.push((
        "GRE-encapsulated Ethernet".into(),
        ethernet(
            &[],
            0x0800,
            &ipv4([192, 168, 0, 1], [192, 168, 0, 2], 47, 0, 0, &gre),
        ),
        Expect::Key(47, "192.168.0.1:0", "192.168.0.2:0", &["OtherL4"]),
    ));
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    vxlan.extend_from_slice(&inner);
    c.push((
        "VXLAN".into(),
        ethernet(
            &[],
            0x0800,
            &ipv4(
                [192, 168, 0, 1],
                [192, 168, 0, 2],
                17,
                0,
                0,
                &udp(51000, 4789, &vxlan),
            ),
        ),
        Expect::Key(17, "192.168.0.1:51000", "192.168.0.2:4789", &[]),
    ));
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend_from_slice(&[0; 56]);
    c.push((
        "ICMP echo".into(),
        ethernet(&[], 0x0800, &ipv4(SRC4, DST4, 1, 0, 0, &icmp)),
        Expect::Key(1, "10.1.0.1:0", "10.2.0.1:0", &["Icmp"]),
    ));
    c.push((
        "ARP".into(),
        ethernet(&[], 0x0806, &[0; 28]),
        Expect::Counted("NonIp"),
    ));
    // BPF_PROG_TEST_RUN builds an skb program's packet in one page (net/bpf/test_run.c,
    // bpf_test_init), so the largest frame it takes is about 3.5 KB: longer than any header
    // parse, and the byte count must still be the frame's.
    let jumbo_payload = vec![0x5a; 3000 - 14 - 20 - 20];
    let mut jumbo_tcp = tcp(40000, 8443, 0x10);
    jumbo_tcp.extend_from_slice(&jumbo_payload);
    c.push((
        "3000-byte frame".into(),
        ethernet(&[], 0x0800, &ipv4(SRC4, DST4, 6, 0, 0x4000, &jumbo_tcp)),
        tcp4,
    ));
    c
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check(what: &str, frame: &[u8], e: &Expect, out: &Value) -> Result<(), String> {
    let keys = out["keys"].as_array().cloned().unwrap_or_default();
    let stats: BTreeMap<String, u64> = out["stats"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let only = |stat: &str| stats.len() == 1 && stats.get(stat) == Some(&1) && keys.is_empty();
    let key_is = |proto: u8, src: &str, dst: &str| {
        keys.len() == 1
            && keys[0]["proto"] == proto
            && keys[0]["src"] == src
            && keys[0]["dst"] == dst
            && keys[0]["packets"] == 1
            && keys[0]["bytes"] == frame.len()
    };
    let ok = match e {
        Expect::Key(proto, src, dst, counted) => {
            key_is(*proto, src, dst)
                && stats.len() == counted.len()
                && counted.iter().all(|s| stats.get(*s) == Some(&1))
        }
        Expect::Counted(stat) => only(stat),
        Expect::TooShort => out.get("refused").is_some() || only("Truncated"),
        Expect::CutShort(proto, src, dst, ip_end) => {
            only("Truncated")
                || (stats.is_empty() && key_is(*proto, src, dst))
                || (frame.len() < *ip_end && out.get("refused").is_some())
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} ({} bytes): expected {e:?}, got {out}",
            frame.len()
        ))
    }
}

fn run_corpus(program: &str) {
    require_root();
    let corpus = corpus();
    let dir =
        std::env::temp_dir().join(format!("observer-corpus-{}-{program}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("frames.txt");
    let text: String = corpus.iter().map(|(_, f, _)| hex(f) + "\n").collect();
    std::fs::write(&file, text).unwrap();
    let out = observer(&[
        "test-run",
        "frames",
        "--program",
        program,
        file.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let results: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(results.len(), corpus.len(), "one result per frame:\n{out}");
    let failures: Vec<String> = corpus
        .iter()
        .zip(&results)
        .filter_map(|((what, frame, e), out)| check(what, frame, e, out).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} frames wrong:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    // The corpus reaches every outcome it claims to, so none of the checks above is vacuous.
    for stat in [
        "Truncated",
        "Malformed",
        "ExtHeaders",
        "NonIp",
        "Fragment",
        "Icmp",
        "OtherL4",
    ] {
        assert!(
            results.iter().any(|r| r["stats"].get(stat).is_some()),
            "no frame was counted as {stat}"
        );
    }
}

#[test]
fn corpus_at_pod_ingress() {
    run_corpus("tc_pod_ingress");
}

#[test]
fn corpus_at_uplink_egress() {
    run_corpus("tc_uplink_egress");
}
