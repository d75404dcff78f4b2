//! Maps shared by all programs and the STATS counter; per-packet accounting is `account`.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use observer_common::{
    FLOWS_MAX_ENTRIES, FlowCounters, FlowKey, SOCKET_EVENTS_BYTES, SOCKS_MAX_ENTRIES, STATS_LEN,
    SockInfo, Stat,
};

/// Per-flow, per-point counters. Not LRU: userspace evicts finished flows, so a full map is an
/// explicit, counted condition ([`Stat::FlowMapFull`]) instead of silent eviction. No event
/// announces a new key: userspace reads the whole map every poll, in a few batch calls.
#[map]
pub static FLOWS: PerCpuHashMap<FlowKey, FlowCounters> =
    PerCpuHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

/// What each socket asked for at connect()/sendmsg(), keyed by socket cookie. LRU because sockets
/// are never closed through us; an evicted entry only loses the pid/comm of an old socket.
#[map]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

#[map]
pub static SOCKET_EVENTS: RingBuf = RingBuf::with_byte_size(SOCKET_EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}
