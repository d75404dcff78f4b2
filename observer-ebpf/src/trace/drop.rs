//! `tp_btf/kfree_skb`: packets the kernel dropped, with the reason, in this node's namespace.
//!
//! `sk_buff` and friends are read with `bpf_probe_read_kernel` at offsets the agent takes from
//! the running kernel's BTF and sets as globals before loading: no hard-coded layout.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::RingBuf,
    programs::BtfTracePointContext,
};
use observer_common::{
    AF_INET, AF_INET6, DROP_EVENTS_BYTES, DropEvent, IPPROTO_TCP, IPPROTO_UDP, Stat,
};

use crate::{
    kmem::{OFF_DEV_IFINDEX, OFF_SKB_HEAD, OFF_SKB_NETWORK_HEADER, global, read},
    maps::count,
};

#[map]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(DROP_EVENTS_BYTES, 0);

// Set by the agent from BTF at load time (see observer/src/hooks/drop.rs).
#[unsafe(no_mangle)]
static OFF_SKB_TRANSPORT_HEADER: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SKB_DEV: u32 = 0;
#[unsafe(no_mangle)]
static OFF_DEV_NET: u32 = 0;
/// `sk_buff.sk` and `sock.__sk_common.skc_net`: the namespace of a local process's packet that
/// has no device yet (dropped at LOCAL_OUT, before routing set one).
#[unsafe(no_mangle)]
static OFF_SKB_SK: u32 = 0;
#[unsafe(no_mangle)]
static OFF_SK_NET: u32 = 0;
#[unsafe(no_mangle)]
static OFF_NET_INUM: u32 = 0;
/// Inode of the agent's network namespace: drops elsewhere are another node's.
#[unsafe(no_mangle)]
static NETNS_INO: u32 = 0;
/// Reasons up to this value (not dropped, consumed, not specified) are not drops we report.
#[unsafe(no_mangle)]
static REASON_MIN: u32 = 2;

#[btf_tracepoint(function = "kfree_skb")]
pub fn trace_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_drop(&ctx);
    0
}

#[inline(always)]
fn try_drop(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let reason: u32 = ctx.arg(2);
    if reason <= global(&REASON_MIN) {
        return Ok(());
    }
    let dev: u64 = read(skb, global(&OFF_SKB_DEV))?;
    let net: u64 = if dev != 0 {
        read(dev, global(&OFF_DEV_NET))?
    } else {
        let sk: u64 = read(skb, global(&OFF_SKB_SK))?;
        if sk == 0 {
            return Ok(());
        }
        read(sk, global(&OFF_SK_NET))?
    };
    let inum: u32 = read(net, global(&OFF_NET_INUM))?;
    if inum != global(&NETNS_INO) {
        return Ok(());
    }
    let head: u64 = read(skb, global(&OFF_SKB_HEAD))?;
    let nh: u16 = read(skb, global(&OFF_SKB_NETWORK_HEADER))?;
    let th: u16 = read(skb, global(&OFF_SKB_TRANSPORT_HEADER))?;
    let l3 = head + nh as u64;
    let ver: u8 = read(l3, 0)?;
    let mut ev = DropEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        location,
        reason,
        ifindex: if dev != 0 {
            read(dev, global(&OFF_DEV_IFINDEX))?
        } else {
            0
        },
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: 0,
        family: 0,
        _pad: [0; 2],
    };
    let l4 = match ver >> 4 {
        4 => {
            let h: [u8; 20] = read(l3, 0)?;
            ev.family = AF_INET;
            ev.proto = h[9];
            ev.src[..4].copy_from_slice(&h[12..16]);
            ev.dst[..4].copy_from_slice(&h[16..20]);
            let frag = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            (frag == 0).then(|| l3 + ((h[0] & 0x0f) as u64) * 4)
        }
        6 => {
            let h: [u8; 40] = read(l3, 0)?;
            ev.family = AF_INET6;
            ev.proto = h[6];
            ev.src.copy_from_slice(&h[8..24]);
            ev.dst.copy_from_slice(&h[24..40]);
            // Extension headers: trust the stack's transport offset when it set one.
            Some(if th != u16::MAX && th > nh {
                head + th as u64
            } else {
                l3 + 40
            })
        }
        _ => return Ok(()),
    };
    if let Some(l4) = l4
        && (ev.proto == IPPROTO_TCP || ev.proto == IPPROTO_UDP)
    {
        let p: [u8; 4] = read(l4, 0)?;
        ev.sport = u16::from_be_bytes([p[0], p[1]]);
        ev.dport = u16::from_be_bytes([p[2], p[3]]);
    }
    if DROP_EVENTS.output::<DropEvent>(&ev, 0).is_err() {
        count(Stat::DropEventsLost);
    }
    Ok(())
}
