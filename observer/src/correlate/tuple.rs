//! Userspace view of kernel tuples.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use observer_common::{
    AF_INET, DropEvent, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    SocketEvent,
};

use crate::record::TupleView;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// One direction of one flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Tuple {
    pub proto: u8,
    pub src: Endpoint,
    pub dst: Endpoint,
}

pub fn addr(family: u8, raw: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*raw))
    }
}

impl Tuple {
    /// From the kernel's raw form (addresses in network order, ports in host order).
    pub fn from_raw(
        proto: u8,
        family: u8,
        src: &[u8; 16],
        sport: u16,
        dst: &[u8; 16],
        dport: u16,
    ) -> Tuple {
        Tuple {
            proto,
            src: Endpoint {
                ip: addr(family, src),
                port: sport,
            },
            dst: Endpoint {
                ip: addr(family, dst),
                port: dport,
            },
        }
    }

    pub fn from_key(k: &FlowKey) -> Tuple {
        Tuple::from_raw(k.proto, k.family, &k.src, k.sport, &k.dst, k.dport)
    }

    pub fn from_socket(e: &SocketEvent) -> Tuple {
        Tuple::from_raw(e.proto, e.family, &e.src, e.sport, &e.dst, e.dport)
    }

    pub fn from_drop(e: &DropEvent) -> Tuple {
        Tuple::from_raw(e.proto, e.family, &e.src, e.sport, &e.dst, e.dport)
    }

    /// The other direction.
    pub fn reversed(&self) -> Tuple {
        Tuple {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
        }
    }

    /// TCP and UDP identify a connection by ports; other protocols have none.
    pub fn has_ports(&self) -> bool {
        matches!(self.proto, IPPROTO_TCP | IPPROTO_UDP)
    }

    pub fn view(&self) -> TupleView {
        TupleView {
            src: self.src.ip.to_string(),
            sport: self.src.port,
            dst: self.dst.ip.to_string(),
            dport: self.dst.port,
        }
    }

    pub fn family_name(&self) -> &'static str {
        if self.src.ip.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        }
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", proto_name(self.proto), self.src, self.dst)
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_ICMP => "ICMP".into(),
        IPPROTO_ICMPV6 => "ICMPv6".into(),
        n => format!("IP{n}"),
    }
}

pub fn tcp_flags_string(flags: u8) -> String {
    const NAMES: [(u8, &str); 8] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x08, "PSH"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    NAMES
        .iter()
        .filter(|(b, _)| flags & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}
