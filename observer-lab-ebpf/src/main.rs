//! The lab's socket-level load balancer (IPv4 and IPv6): at connect() and sendmsg() a ClusterIP:port is
//! rewritten to one of its backends, and at recvmsg() a backend's reply is shown to the app as
//! coming from the ClusterIP, as Cilium's and Calico's eBPF kube-proxy replacements do (kernel
//! `BPF_CGROUP_INET{4,6}_CONNECT`, `..._UDP{4,6}_SENDMSG`, `..._UDP{4,6}_RECVMSG`). No packet ever carries
//! the ClusterIP, and conntrack knows nothing of it.
//!
//! It acts only in the lab's pod namespaces (`LB_NETNS`, by netns cookie), so the machine's own
//! sockets are never touched wherever it is attached.
#![no_std]
#![no_main]

mod types;

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32},
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use types::{LB_MAX_BACKENDS, LB_MAX_NETNS, LB_MAX_SERVICES, LbAddr, LbBackendKey, LbService};

#[map]
static LB_SERVICES: HashMap<LbAddr, LbService> = HashMap::with_max_entries(LB_MAX_SERVICES, 0);
#[map]
static LB_BACKENDS: HashMap<LbBackendKey, LbAddr> = HashMap::with_max_entries(LB_MAX_BACKENDS, 0);
/// Backend -> the Service port it stands for, for UDP replies.
#[map]
static LB_REVERSE: HashMap<LbAddr, LbAddr> = HashMap::with_max_entries(LB_MAX_BACKENDS, 0);
/// Network namespaces (cookies) the balancer acts in.
#[map]
static LB_NETNS: HashMap<u64, u8> = HashMap::with_max_entries(LB_MAX_NETNS, 0);

const ALLOW: i32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, 4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, 6);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, 4);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, 6);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx, 4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_service(&ctx, 6);
    ALLOW
}

#[inline(always)]
fn in_lab(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { LB_NETNS.get(cookie) }.is_some()
}

/// The call's address as a map key.
#[inline(always)]
fn address(ctx: &SockAddrContext, family: u8, proto: u8) -> LbAddr {
    // SAFETY: the context pointer is valid for the program's lifetime; the verifier allows
    // these 4-byte loads of bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let ip = if family == 4 {
        [sa.user_ip4, 0, 0, 0]
    } else {
        let w = sa.user_ip6;
        [w[0], w[1], w[2], w[3]]
    };
    LbAddr {
        ip,
        port: sa.user_port as u16,
        proto,
        family,
    }
}

/// `family` is the program's own (a constant once inlined): the verifier refuses any access of a
/// v6 field from a v4 program, even on a path not taken.
#[inline(always)]
fn set_address(ctx: &SockAddrContext, family: u8, to: &LbAddr) {
    // SAFETY: as above; 4-byte stores.
    let sa = unsafe { &mut *ctx.sock_addr };
    if family == 4 {
        sa.user_ip4 = to.ip[0];
    } else {
        sa.user_ip6[0] = to.ip[0];
        sa.user_ip6[1] = to.ip[1];
        sa.user_ip6[2] = to.ip[2];
        sa.user_ip6[3] = to.ip[3];
    }
    sa.user_port = to.port as u32;
}

/// A backend's UDP reply, shown to the app as coming from the Service it asked.
#[inline(always)]
fn to_service(ctx: &SockAddrContext, family: u8) {
    if !in_lab(ctx) {
        return;
    }
    let from = address(ctx, family, IPPROTO_UDP);
    if let Some(svc) = unsafe { LB_REVERSE.get(from) } {
        set_address(ctx, family, svc);
    }
}

#[inline(always)]
fn to_backend(ctx: &SockAddrContext, family: u8) {
    if !in_lab(ctx) {
        return;
    }
    // SAFETY: as in `address`.
    let proto = unsafe { (*ctx.sock_addr).protocol } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let asked = address(ctx, family, proto);
    let Some(svc) = (unsafe { LB_SERVICES.get(asked) }) else {
        return;
    };
    if svc.count == 0 {
        return;
    }
    let index = unsafe { bpf_get_prandom_u32() } % svc.count;
    let key = LbBackendKey { id: svc.id, index };
    if let Some(b) = unsafe { LB_BACKENDS.get(key) } {
        set_address(ctx, family, b);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
