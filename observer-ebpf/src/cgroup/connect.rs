//! connect4/connect6/sendmsg4/sendmsg6: remember the asked-for destination per socket.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use observer_common::{AF_INET, AF_INET6, SockInfo, Stat};

use crate::maps::{SOCKS, count};

/// Return value that lets the syscall proceed unchanged.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET6);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET6);
    ALLOW
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, family: u8) {
    // SAFETY: the context pointer is valid for the program's lifetime; fields are read with the
    // 4-byte loads the verifier allows for bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let mut dst = [0u8; 16];
    if family == AF_INET {
        dst[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    } else {
        let w = sa.user_ip6;
        dst[..4].copy_from_slice(&w[0].to_ne_bytes());
        dst[4..8].copy_from_slice(&w[1].to_ne_bytes());
        dst[8..12].copy_from_slice(&w[2].to_ne_bytes());
        dst[12..].copy_from_slice(&w[3].to_ne_bytes());
    }
    let dport = u16::from_be(sa.user_port as u16);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };

    // sendmsg() runs for every datagram: skip the map write when nothing changed.
    if let Some(old) = SOCKS.get_ptr(cookie) {
        // SAFETY: pointer into a live map value.
        let old = unsafe { &*old };
        if old.asked_dst == dst && old.asked_dport == dport {
            return;
        }
    }
    let info = SockInfo {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        asked_dport: dport,
        family,
        reported: 0,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        asked_dst: dst,
    };
    if SOCKS.insert(cookie, info, 0).is_err() {
        count(Stat::SockMapFull);
    }
}
