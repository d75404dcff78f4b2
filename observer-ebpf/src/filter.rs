//! netfilter programs (BPF_PROG_TYPE_NETFILTER, Linux 6.4+) on both sides of the filter table at
//! FORWARD, LOCAL_IN and LOCAL_OUT: what the table where NetworkPolicy and host firewalls live
//! evaluated (after DNAT, before SNAT), and what it let through.
//!
//! The agent links each program at its hook with `BPF_LINK_CREATE` (`BPF_NETFILTER`): the
//! "before" ones at priority -1, the "passed" ones at +1, around `NF_IP_PRI_FILTER` (0, kernel
//! `include/uapi/linux/netfilter_ipv4.h`). aya 0.14 has no loader for this program type, so the
//! section name is one aya parses but never loads on its own ("classifier/..."); the agent
//! relocates the instructions with aya-obj and loads them itself (observer/src/hooks/filter.rs).
//! Every program returns `NF_ACCEPT`: it only observes.

use observer_common::{FlowKey, Point, Stat};

use crate::{
    account,
    kmem::{KernelL3, OFF_DEV_IFINDEX, OFF_SKB_HEAD, OFF_SKB_NETWORK_HEADER, global, read},
    maps, nat, parse,
};

/// `struct bpf_nf_ctx` (kernel `include/net/netfilter/nf_bpf_link.h`).
#[repr(C)]
pub struct BpfNfCtx {
    state: u64,
    skb: u64,
}

const NF_ACCEPT: i32 = 1;
/// A network namespace's loopback device always has ifindex 1 (kernel `net/core/dev.c`,
/// `dev_index_reserve`): host-internal traffic that no tc point sees is left out.
const LOOPBACK_IFINDEX: u32 = 1;

// Set by the agent from BTF at load time (observer/src/hooks/filter.rs).
#[unsafe(no_mangle)]
static OFF_SKB_LEN: u32 = 0;
/// `nf_hook_state.in` / `.out`: the device a routed or received packet came in on, and the one a
/// local process's packet goes out on.
#[unsafe(no_mangle)]
static OFF_STATE_IN: u32 = 0;
#[unsafe(no_mangle)]
static OFF_STATE_OUT: u32 = 0;

macro_rules! filter_program {
    ($name:ident, $point:expr, $dev:ident) => {
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "classifier/netfilter")]
        pub fn $name(ctx: *mut BpfNfCtx) -> i32 {
            if let Err(stat) = observe(ctx, $point, &$dev) {
                maps::count(stat);
            }
            NF_ACCEPT
        }
    };
}

filter_program!(nf_forward, Point::FilterForward, OFF_STATE_IN);
filter_program!(nf_input, Point::FilterInput, OFF_STATE_IN);
filter_program!(nf_output, Point::FilterOutput, OFF_STATE_OUT);
filter_program!(nf_forward_passed, Point::FilterForwardPassed, OFF_STATE_IN);
filter_program!(nf_input_passed, Point::FilterInputPassed, OFF_STATE_IN);
filter_program!(nf_output_passed, Point::FilterOutputPassed, OFF_STATE_OUT);

#[inline(always)]
fn observe(ctx: *mut BpfNfCtx, point: Point, dev_off: &'static u32) -> Result<(), Stat> {
    // SAFETY: the kernel passes a valid context; both fields are pointers it owns.
    let (state, skb) = unsafe { ((*ctx).state, (*ctx).skb) };
    let dev: u64 = read(state, global(dev_off)).map_err(|_| Stat::KernelRead)?;
    let ifindex: u32 = if dev == 0 {
        0
    } else {
        read(dev, global(&OFF_DEV_IFINDEX)).map_err(|_| Stat::KernelRead)?
    };
    if ifindex == LOOPBACK_IFINDEX {
        return Ok(());
    }
    let (Ok(head), Ok(nh), Ok(len)) = (
        read::<u64>(skb, global(&OFF_SKB_HEAD)),
        read::<u16>(skb, global(&OFF_SKB_NETWORK_HEADER)),
        read::<u32>(skb, global(&OFF_SKB_LEN)),
    ) else {
        return Err(Stat::KernelRead);
    };
    let t = parse::parse_ip(&KernelL3(head + nh as u64))?;
    let key = FlowKey {
        src: parse::addr_bytes(t.src),
        dst: parse::addr_bytes(t.dst),
        sport: t.sport,
        dport: t.dport,
        ifindex,
        proto: t.proto,
        family: t.family,
        point: point as u8,
        retired: 0,
    };
    if account::record(&key, len, t.tcp_flags) {
        // Which connection this is, whatever NAT did before or does after the filter table.
        nat::note_original(skb, &key);
    }
    Ok(())
}
