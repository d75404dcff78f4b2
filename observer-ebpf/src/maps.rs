//! Maps shared by all programs, and the helpers that update them.

use crate::reuse;
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use observer_common::{
    FLOW_EVENT_END, FLOW_EVENT_NEW, FLOW_EVENTS_BYTES, FLOWS_MAX_ENTRIES, FlowCounters, FlowEvent,
    FlowKey, MARK_SYN_ONLY, SOCKET_EVENTS_BYTES, SOCKS_MAX_ENTRIES, STATS_LEN, SockInfo, Stat,
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// Per-flow, per-point counters. Not LRU: userspace evicts finished flows, so a full map is an
/// explicit, counted condition ([`Stat::FlowMapFull`]) instead of silent eviction.
#[map]
pub static FLOWS: PerCpuHashMap<FlowKey, FlowCounters> =
    PerCpuHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);

/// What each socket asked for at connect()/sendmsg(), keyed by socket cookie. LRU because sockets
/// are never closed through us; an evicted entry only loses the pid/comm of an old socket.
#[map]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(SOCKS_MAX_ENTRIES, 0);

#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

#[map]
pub static SOCKET_EVENTS: RingBuf = RingBuf::with_byte_size(SOCKET_EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

const EEXIST: i32 = 17;

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn add(c: *mut FlowCounters, len: u64, now: u64, tcp_flags: u8, marks: u8) {
    // SAFETY: `c` points at this CPU's copy of a live map value.
    unsafe {
        (*c).packets += 1;
        (*c).bytes += len;
        if (*c).first_ns == 0 {
            // The entry was created on another CPU; this CPU's copy starts zeroed.
            (*c).first_ns = now;
        }
        (*c).last_ns = now;
        (*c).tcp_flags |= tcp_flags;
        (*c).marks |= marks;
    }
}

/// Account one packet to `key`; emit a ring-buffer event for a new key or a FIN/RST. Returns
/// whether this packet started the key (created it, or reopened it for a reused 4-tuple).
#[inline(always)]
pub fn record(key: &FlowKey, len: u32, tcp_flags: u8) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    let marks = if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        MARK_SYN_ONLY
    } else {
        0
    };
    let len = len as u64;
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        if tcp_flags & TCP_SYN != 0 && reuse::retire_if_ended(key, now) {
            // Every CPU's copy is zero now: this packet is the new connection's first.
            add(c, len, now, tcp_flags, marks);
            return true;
        }
        add(c, len, now, tcp_flags, marks);
    } else {
        let init = FlowCounters {
            packets: 1,
            bytes: len,
            first_ns: now,
            last_ns: now,
            tcp_flags,
            marks,
            _pad: [0; 6],
        };
        match FLOWS.insert(key, init, BPF_NOEXIST as u64) {
            Ok(()) => {
                emit_flow_event(key, FLOW_EVENT_NEW, tcp_flags, now);
                if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                    emit_flow_event(key, FLOW_EVENT_END, tcp_flags, now);
                }
                return true;
            }
            // Another CPU created it between our lookup and insert.
            Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(key) {
                Some(c) => add(c, len, now, tcp_flags, marks),
                None => count(Stat::FlowMapFull),
            },
            Err(_) => {
                count(Stat::FlowMapFull);
                return false;
            }
        }
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        emit_flow_event(key, FLOW_EVENT_END, tcp_flags, now);
    }
    false
}

#[inline(always)]
pub(crate) fn emit_flow_event(key: &FlowKey, kind: u8, tcp_flags: u8, now: u64) {
    let ev = FlowEvent {
        key: *key,
        kind,
        tcp_flags,
        _pad: [0; 2],
        ts_ns: now,
    };
    if FLOW_EVENTS.output::<FlowEvent>(&ev, 0).is_err() {
        count(Stat::FlowEventsLost);
    }
}
