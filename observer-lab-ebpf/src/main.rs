//! The lab's socket-level load balancer: at connect() and sendmsg() a ClusterIP:port is
//! rewritten to one of its backends, and at recvmsg() a backend's reply is shown to the app as
//! coming from the ClusterIP, as Cilium's and Calico's eBPF kube-proxy replacements do (kernel
//! `BPF_CGROUP_INET4_CONNECT`, `..._UDP4_SENDMSG`, `..._UDP4_RECVMSG`). No packet ever carries
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
    to_backend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    if !in_lab(&ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let from = LbAddr {
        ip: sa.user_ip4,
        port: sa.user_port as u16,
        proto: IPPROTO_UDP,
        _pad: 0,
    };
    if let Some(svc) = unsafe { LB_REVERSE.get(from) } {
        sa.user_ip4 = svc.ip;
        sa.user_port = svc.port as u32;
    }
    ALLOW
}

#[inline(always)]
fn in_lab(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    unsafe { LB_NETNS.get(cookie) }.is_some()
}

#[inline(always)]
fn to_backend(ctx: &SockAddrContext) {
    if !in_lab(ctx) {
        return;
    }
    // SAFETY: as above; the verifier allows these 4-byte accesses of bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let asked = LbAddr {
        ip: sa.user_ip4,
        port: sa.user_port as u16,
        proto,
        _pad: 0,
    };
    let Some(svc) = (unsafe { LB_SERVICES.get(asked) }) else {
        return;
    };
    if svc.count == 0 {
        return;
    }
    let index = unsafe { bpf_get_prandom_u32() } % svc.count;
    let key = LbBackendKey { id: svc.id, index };
    if let Some(b) = unsafe { LB_BACKENDS.get(key) } {
        sa.user_ip4 = b.ip;
        sa.user_port = b.port as u32;
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
