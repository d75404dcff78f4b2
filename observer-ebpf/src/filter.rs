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

use aya_ebpf::{macros::map, maps::PerCpuArray};
use observer_common::{FlowKey, Point, Stat};

use crate::{
    account,
    kmem::{KernelL3, OFF_DEV_IFINDEX, OFF_SKB_HEAD, OFF_SKB_NETWORK_HEADER, global},
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

/// A field of a kernel struct the verifier knows the type of (the context's `state` and `skb`,
/// and pointers read from them): a plain load, which the verifier checks against the kernel's
/// BTF at this constant offset and turns into a guarded load, instead of a helper call.
#[inline(always)]
fn field<T: Copy>(base: u64, off: &'static u32) -> T {
    // SAFETY: see above; a load through a NULL or bad pointer reads zero instead of faulting.
    unsafe { core::ptr::read_volatile((base + global(off) as u64) as *const T) }
}

/// The packet the "before" program of this CPU saw last, for the "passed" program that runs
/// next on the same packet (the filter table runs synchronously between the two, and rewrites no
/// header): it takes the key from here instead of parsing the packet again.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Seen {
    skb: u64,
    key: FlowKey,
    len: u32,
    tcp_flags: u8,
    _pad: [u8; 3],
}

#[map]
static FILTER_SEEN: PerCpuArray<Seen> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn observe(ctx: *mut BpfNfCtx, point: Point, dev_off: &'static u32) -> Result<(), Stat> {
    // SAFETY: the kernel passes a valid context; both fields are pointers it owns.
    let (state, skb) = unsafe { ((*ctx).state, (*ctx).skb) };
    let seen = FILTER_SEEN.get_ptr_mut(0).ok_or(Stat::KernelRead)?;
    let before = point.filter_passed().is_some();
    // SAFETY (all three): this CPU's slot of a live map value; a netfilter hook runs to its end
    // on one CPU, so nothing else touches the slot meanwhile.
    let mut s = unsafe { *seen };
    // Taken, or about to be replaced: a later packet at the same address is another packet.
    unsafe { (*seen).skb = 0 };
    if before || s.skb != skb {
        let Some(fresh) = parse(state, skb, dev_off)? else {
            return Ok(());
        };
        s = fresh;
        if before {
            unsafe { *seen = s };
        }
    }
    let key = FlowKey {
        point: point as u8,
        ..s.key
    };
    // Which connection this is, whatever NAT did before or does after the filter table; the
    // "passed" key is the same packet, and the agent takes its twin's.
    if account::record(&key, s.len, s.tcp_flags) && before {
        nat::note_original(skb, &key);
    }
    Ok(())
}

/// The packet's key (its point left to the caller), length and TCP flags; `None` for loopback.
#[inline(always)]
fn parse(state: u64, skb: u64, dev_off: &'static u32) -> Result<Option<Seen>, Stat> {
    let dev: u64 = field(state, dev_off);
    let ifindex: u32 = if dev == 0 {
        0
    } else {
        field(dev, &OFF_DEV_IFINDEX)
    };
    if ifindex == LOOPBACK_IFINDEX {
        return Ok(None);
    }
    let head: u64 = field(skb, &OFF_SKB_HEAD);
    let nh: u16 = field(skb, &OFF_SKB_NETWORK_HEADER);
    let t = parse::parse_ip(&KernelL3(head + nh as u64))?;
    Ok(Some(Seen {
        skb,
        key: t.key(0, ifindex),
        len: field(skb, &OFF_SKB_LEN),
        tcp_flags: t.tcp_flags,
        _pad: [0; 3],
    }))
}
