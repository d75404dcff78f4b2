//! Header parsing shared by the tc and cgroup_skb programs.
//!
//! Everything is read with `bpf_skb_load_bytes` (`load`), so a short packet is a clean error
//! (counted as [`Stat::Truncated`]) rather than a verifier bounds problem or a mis-parse.

use aya_ebpf::{
    cty::c_long,
    programs::{SkBuffContext, TcContext},
};
use observer_common::{
    AF_INET, AF_INET6, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat,
};

pub trait Packet {
    fn load<T>(&self, offset: usize) -> Result<T, c_long>;
}

impl Packet for TcContext {
    /// Straight from the packet when the header is in its linear part (almost always at tc), a
    /// helper call otherwise: the call and its copy were an eighth of a tc program's time
    /// (docs/benchmarks.md).
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        let start = self.data();
        if start + offset + core::mem::size_of::<T>() <= self.data_end() {
            // SAFETY: within [data, data_end), checked just above (and by the verifier). The
            // header may sit at any byte offset; x86-64 and arm64 load it unaligned, and the
            // verifier allows that on such architectures.
            Ok(unsafe { core::ptr::read((start + offset) as *const T) })
        } else {
            TcContext::load(self, offset)
        }
    }
}

impl Packet for SkBuffContext {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        SkBuffContext::load(self, offset)
    }
}

/// The L3/L4 identity of one packet. Addresses are kept as words in network byte order, so
/// they move as 4-byte loads and stores: as byte arrays (alignment 1) the compiler copied them a
/// byte at a time, most of a tc program's run time (docs/benchmarks.md).
pub struct Tuple {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub tcp_flags: u8,
}

impl Tuple {
    /// This packet's flow key at `point` (a [`observer_common::Point`]) on `ifindex`.
    #[inline(always)]
    pub fn key(&self, point: u8, ifindex: u32) -> FlowKey {
        FlowKey {
            src: addr_bytes(self.src),
            dst: addr_bytes(self.dst),
            sport: self.sport,
            dport: self.dport,
            ifindex,
            proto: self.proto,
            family: self.family,
            point,
            retired: 0,
        }
    }
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPV6_HDR_LEN: usize = 40;

/// The fixed IPv4 header, word-aligned.
#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    _tot_len: u16,
    _id: u16,
    frag_off: u16,
    _ttl: u8,
    proto: u8,
    _check: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
struct Ipv6Hdr {
    _vtc_flow: u32,
    _payload_len: u16,
    next: u8,
    _hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// TCP up to the flags byte (16 bytes read; every TCP header has at least 20).
#[repr(C)]
struct TcpHead {
    sport: u16,
    dport: u16,
    _seq: u32,
    _ack: u32,
    _doff: u8,
    flags: u8,
}
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
fn ld<P: Packet, T>(p: &P, off: usize) -> Result<T, Stat> {
    p.load::<T>(off).map_err(|_| Stat::Truncated)
}

/// Parse an Ethernet frame (tc programs), with up to two VLAN tags in the frame (QinQ; a tag
/// the NIC took out into `skb->vlan_tci` is not in it).
#[inline(always)]
pub fn parse_eth<P: Packet>(p: &P) -> Result<Tuple, Stat> {
    let mut proto = u16::from_be(ld::<P, u16>(p, 12)?);
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be(ld::<P, u16>(p, 16)?);
        l3 += 4;
    }
    if proto == ETH_P_8021Q {
        proto = u16::from_be(ld::<P, u16>(p, 20)?);
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

// One `bpf_skb_load_bytes` per header: each helper call costs more than the few loads it saves.

#[inline(always)]
fn parse_ipv4<P: Packet>(p: &P, l3: usize) -> Result<Tuple, Stat> {
    let h: Ipv4Hdr = ld(p, l3)?;
    let ihl = ((h.version_ihl & 0x0f) as usize) * 4;
    if h.version_ihl >> 4 != 4 || ihl < 20 {
        return Err(Stat::Malformed);
    }
    let mut t = Tuple {
        src: [h.saddr, 0, 0, 0],
        dst: [h.daddr, 0, 0, 0],
        sport: 0,
        dport: 0,
        proto: h.proto,
        family: AF_INET,
        tcp_flags: 0,
    };
    if u16::from_be(h.frag_off) & 0x1fff != 0 {
        // Non-first fragment: no L4 header to read.
        return Ok(t);
    }
    parse_l4(p, l3 + ihl, &mut t)?;
    Ok(t)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(p: &P, l3: usize) -> Result<Tuple, Stat> {
    let h: Ipv6Hdr = ld(p, l3)?;
    let mut next = h.next;
    let mut t = Tuple {
        src: h.saddr,
        dst: h.daddr,
        sport: 0,
        dport: 0,
        proto: next,
        family: AF_INET6,
        tcp_flags: 0,
    };
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
    if matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT
    ) {
        // Still inside the chain: the transport is unknown, and a key naming an extension
        // header as the protocol would be a wrong tuple.
        return Err(Stat::ExtHeaders);
    }
    t.proto = next;
    parse_l4(p, off, &mut t)?;
    Ok(t)
}

#[inline(always)]
fn parse_l4<P: Packet>(p: &P, l4: usize, t: &mut Tuple) -> Result<(), Stat> {
    match t.proto {
        IPPROTO_TCP => {
            let h: TcpHead = ld(p, l4)?;
            t.sport = u16::from_be(h.sport);
            t.dport = u16::from_be(h.dport);
            t.tcp_flags = h.flags;
        }
        IPPROTO_UDP => {
            let h: [u16; 2] = ld(p, l4)?;
            t.sport = u16::from_be(h[0]);
            t.dport = u16::from_be(h[1]);
        }
        _ => {}
    }
    Ok(())
}

/// Addresses as the byte arrays of the shared types; a plain 16-byte move.
#[inline(always)]
pub fn addr_bytes(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, both plain data; the words hold the address bytes in wire order.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
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
