//! Ethernet frames for the cost runs: TCP segments over IPv4 or IPv6 with valid lengths (the
//! programs do not check checksums, so they are left zero).

use std::net::IpAddr;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment from `src:sport` to `dst:dport` with `flags`, as an Ethernet frame.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let (ethertype, ip) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (0x0800u16, ipv4(s.octets(), d.octets(), 6, &tcp)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (0x86DD, ipv6(s.octets(), d.octets(), 6, &tcp)),
        _ => panic!("mixed address families"),
    };
    let mut frame = Vec::with_capacity(14 + ip.len());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src);
    h[24..40].copy_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_fields_are_where_the_headers_say() {
        let f = tcp(
            "10.0.0.1".parse().unwrap(),
            1234,
            "10.0.0.2".parse().unwrap(),
            80,
            TCP_SYN,
        );
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 40);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1234);
        assert_eq!(f[47], TCP_SYN);
        let f6 = tcp(
            "fd00::1".parse().unwrap(),
            1,
            "fd00::2".parse().unwrap(),
            2,
            TCP_ACK,
        );
        assert_eq!(f6.len(), 14 + 40 + 20);
        assert_eq!(u16::from_be_bytes([f6[18], f6[19]]), 20);
        assert_eq!(f6[20], 6);
    }
}
