//! The socket load balancer's map types, shared with the lab (which includes this file by path:
//! plain `repr(C)` integers, the same bytes on both sides).
//!
//! Addresses and ports are kept as `bpf_sock_addr` holds them: `user_ip4` in network byte order
//! as a `u32` read from memory, `user_port` as the network-order 16-bit port in the low bytes.

/// A Service port (or, in `LB_REVERSE`, a backend) as the socket sees it: `user_ip4` in `ip[0]`
/// (the rest zero) or `user_ip6`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LbAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
}

/// A Service port's backends: `count` entries `(id, 0..count)` in `LB_BACKENDS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct LbService {
    pub id: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LbBackendKey {
    pub id: u32,
    pub index: u32,
}

pub const LB_MAX_SERVICES: u32 = 1024;
pub const LB_MAX_BACKENDS: u32 = 8192;
pub const LB_MAX_NETNS: u32 = 1024;

const _: () = assert!(core::mem::size_of::<LbAddr>() == 20);
const _: () = assert!(core::mem::size_of::<LbService>() == 8);
const _: () = assert!(core::mem::size_of::<LbBackendKey>() == 8);
