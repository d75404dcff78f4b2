//! tc programs on pod veths (host side) and node uplinks.
//!
//! Four entry points, one per observation point, so the point is fixed at attach time and the
//! kernel does not need a per-interface lookup on the fast path.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use observer_common::Point;

use crate::{account, maps, nat, parse};

#[classifier]
pub fn tc_pod_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Point::PodIngress)
}

#[classifier]
pub fn tc_pod_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Point::PodEgress)
}

#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    observe(&ctx, Point::UplinkIngress)
}

#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    observe(&ctx, Point::UplinkEgress)
}

/// Always returns `TC_ACT_UNSPEC` (tcx: `TCX_NEXT`): the packet goes on untouched and any program
/// after ours (Cilium, Calico eBPF, ...) still runs.
#[inline(always)]
fn observe(ctx: &TcContext, point: Point) -> i32 {
    if let Err(stat) = try_observe(ctx, point) {
        maps::count(stat);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn try_observe(ctx: &TcContext, point: Point) -> Result<(), observer_common::Stat> {
    let t = parse::parse_eth(ctx)?;
    if let Some(stat) = parse::note_kind(&t) {
        maps::count(stat);
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let key = t.key(point as u8, ifindex);
    let new = account::record(&key, ctx.len(), t.tcp_flags);
    if new && point.is_egress() {
        // The context pointer is the kernel's sk_buff.
        nat::note_original(ctx.skb.skb as u64, &key);
    }
    Ok(())
}
