//! Yardsticks, never attached by the agent: `observer test-run cost` runs the tc programs next to
//! them with `BPF_PROG_TEST_RUN`. `ref_floor` returns at once (what a run costs with no program
//! body); `ref_counter` is the least a flow counter can do: parse Ethernet, IPv4 or IPv6 and the
//! TCP/UDP ports with direct packet access, read the clock once, and add to one per-CPU hash entry
//! keyed by the 5-tuple.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, macros::classifier, macros::map,
    maps::PerCpuHashMap, programs::TcContext,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefKey {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    _pad: u8,
    _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct RefCounters {
    packets: u64,
    bytes: u64,
    last_ns: u64,
}

/// One entry here; `observer test-run` sizes it like the flow map (`map_max_entries`), so the
/// agent's own load of this object costs nothing for it.
#[map]
static REF_FLOWS: PerCpuHashMap<RefKey, RefCounters> = PerCpuHashMap::with_max_entries(1, 0);

#[classifier]
pub fn ref_floor(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ref_counter(ctx: TcContext) -> i32 {
    let _ = count(&ctx);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
fn count(ctx: &TcContext) -> Option<()> {
    // Every field written once, the key built in one go: a zeroed key first costs a memset call.
    // SAFETY: every pointer below was bounds-checked against data_end by `at`.
    let (src, dst, proto, l4) = unsafe {
        match u16::from_be(*at::<u16>(ctx, 12)?) {
            0x0800 => {
                let ip = at::<[u32; 5]>(ctx, 14)?;
                let ihl = ((*ip)[0] & 0x0f) as usize;
                let proto = ((*ip)[2] >> 8) as u8;
                (
                    [(*ip)[3], 0, 0, 0],
                    [(*ip)[4], 0, 0, 0],
                    proto,
                    14 + ihl * 4,
                )
            }
            0x86DD => {
                let ip = at::<[u32; 10]>(ctx, 14)?;
                let proto = ((*ip)[1] >> 16) as u8;
                (
                    [(*ip)[2], (*ip)[3], (*ip)[4], (*ip)[5]],
                    [(*ip)[6], (*ip)[7], (*ip)[8], (*ip)[9]],
                    proto,
                    54,
                )
            }
            _ => return None,
        }
    };
    let (sport, dport) = if proto == 6 || proto == 17 {
        // SAFETY: bounds-checked by `at`.
        let ports = unsafe { *at::<[u16; 2]>(ctx, l4)? };
        (u16::from_be(ports[0]), u16::from_be(ports[1]))
    } else {
        (0, 0)
    };
    let key = RefKey {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad: 0,
        _pad2: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let len = ctx.len() as u64;
    match REF_FLOWS.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of a live entry.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
            (*c).last_ns = now;
        },
        None => {
            let init = RefCounters {
                packets: 1,
                bytes: len,
                last_ns: now,
            };
            let _ = REF_FLOWS.insert(key, init, 0);
        }
    }
    Some(())
}
