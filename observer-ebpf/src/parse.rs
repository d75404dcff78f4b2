//! Header parsing shared by the tc and cgroup_skb programs.
//!
//! Everything is read with `bpf_skb_load_bytes` (`load`), so a short packet is a clean error
//! (counted as [`Stat::Truncated`]) rather than a verifier bounds problem or a mis-parse.

use aya_ebpf::{
    cty::c_long,
    programs::{SkBuffContext, TcContext},
};
use observer_common::{
    AF_INET, AF_INET6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat,
};

pub trait Packet {
    fn load<T>(&self, offset: usize) -> Result<T, c_long>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        TcContext::load(self, offset)
    }
}

impl Packet for SkBuffContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        SkBuffContext::load(self, offset)
    }
}

/// The L3/L4 identity of one packet.
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub tcp_flags: u8,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HDR_LEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
fn ld<P: Packet, T>(p: &P, off: usize) -> Result<T, Stat> {
    p.load::<T>(off).map_err(|_| Stat::Truncated)
}

/// Parse an Ethernet frame (tc programs), with at most one VLAN tag.
#[inline(always)]
pub fn parse_eth<P: Packet>(p: &P) -> Result<Tuple, Stat> {
    let mut proto = u16::from_be(ld::<P, u16>(p, 12)?);
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be(ld::<P, u16>(p, 16)?);
        l3 += 4;
    }
    match proto {
        ETH_P_IP => parse_ipv4(p, l3),
        ETH_P_IPV6 => parse_ipv6(p, l3),
        _ => Err(Stat::NonIp),
    }
}

/// Parse a packet that starts at the IP header (cgroup_skb programs).
#[inline(always)]
pub fn parse_ip<P: Packet>(p: &P) -> Result<Tuple, Stat> {
    match ld::<P, u8>(p, 0)? >> 4 {
        4 => parse_ipv4(p, 0),
        6 => parse_ipv6(p, 0),
        _ => Err(Stat::NonIp),
    }
}

// One `bpf_skb_load_bytes` per header: helper calls dominate the per-packet cost.

#[inline(always)]
fn parse_ipv4<P: Packet>(p: &P, l3: usize) -> Result<Tuple, Stat> {
    let h: [u8; 20] = ld(p, l3)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(Stat::Malformed);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let mut t = Tuple {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: h[9],
        family: AF_INET,
        tcp_flags: 0,
    };
    t.src[..4].copy_from_slice(&h[12..16]);
    t.dst[..4].copy_from_slice(&h[16..20]);
    if frag & 0x1fff != 0 {
        // Non-first fragment: no L4 header to read.
        return Ok(t);
    }
    parse_l4(p, l3 + ihl, &mut t)?;
    Ok(t)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(p: &P, l3: usize) -> Result<Tuple, Stat> {
    let h: [u8; IPV6_HDR_LEN] = ld(p, l3)?;
    let mut next = h[6];
    let mut t = Tuple {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: next,
        family: AF_INET6,
        tcp_flags: 0,
    };
    t.src.copy_from_slice(&h[8..24]);
    t.dst.copy_from_slice(&h[24..40]);
    let mut off = l3 + IPV6_HDR_LEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: [u8; 2] = ld(p, off)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let e: [u8; 4] = ld(p, off)?;
                next = e[0];
                let frag_off = u16::from_be_bytes([e[2], e[3]]) & 0xfff8;
                t.proto = next;
                if frag_off != 0 {
                    return Ok(t);
                }
                off += 8;
            }
            _ => break,
        }
    }
    t.proto = next;
    parse_l4(p, off, &mut t)?;
    Ok(t)
}

#[inline(always)]
fn parse_l4<P: Packet>(p: &P, l4: usize, t: &mut Tuple) -> Result<(), Stat> {
    match t.proto {
        IPPROTO_TCP => {
            // Ports, then the flags byte at offset 13.
            let h: [u8; 14] = ld(p, l4)?;
            t.sport = u16::from_be_bytes([h[0], h[1]]);
            t.dport = u16::from_be_bytes([h[2], h[3]]);
            t.tcp_flags = h[13];
        }
        IPPROTO_UDP => {
            let h: [u8; 4] = ld(p, l4)?;
            t.sport = u16::from_be_bytes([h[0], h[1]]);
            t.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        _ => {}
    }
    Ok(())
}

/// Count what a parsed packet is, beyond TCP/UDP.
#[inline(always)]
pub fn note_kind(t: &Tuple) -> Option<Stat> {
    match t.proto {
        IPPROTO_TCP | IPPROTO_UDP if t.sport != 0 || t.dport != 0 => None,
        IPPROTO_TCP | IPPROTO_UDP => Some(Stat::Fragment),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => Some(Stat::Icmp),
        _ => Some(Stat::OtherL4),
    }
}
