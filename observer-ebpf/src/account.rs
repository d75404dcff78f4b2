//! Per-packet accounting: a packet's counters added to its flow key, and a reused 4-tuple set
//! apart (`reuse`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use observer_common::{FlowCounters, FlowKey, MARK_SYN_ONLY, Stat, TCP_ACK, TCP_SYN};

use crate::{
    maps::{FLOWS, count},
    reuse,
};

const EEXIST: i32 = 17;

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

/// Account one packet to `key`. Returns whether this packet started the key (created it, or
/// reopened it for a reused 4-tuple).
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
        // A reused 4-tuple: every CPU's copy is zero now, this packet is the new connection's
        // first.
        let reopened = tcp_flags & TCP_SYN != 0 && reuse::retire_if_ended(key);
        add(c, len, now, tcp_flags, marks);
        if reopened {
            return true;
        }
    } else {
        let init = FlowCounters {
            packets: 1,
            bytes: len,
            first_ns: now,
            last_ns: now,
            tcp_flags,
            marks,
            _pad: 0,
            _pad2: 0,
        };
        match FLOWS.insert(key, init, BPF_NOEXIST as u64) {
            Ok(()) => return true,
            // Another CPU created it between our lookup and insert.
            Err(e) if e == -EEXIST => match FLOWS.get_ptr_mut(key) {
                Some(c) => add(c, len, now, tcp_flags, marks),
                None => count(Stat::FlowMapFull),
            },
            Err(_) => count(Stat::FlowMapFull),
        }
    }
    false
}
