//! A 4-tuple reused by a new connection while the kernel still holds the old one's counters.
//!
//! Busy clients reuse a source port seconds after FIN or RST (conntrack kills the old entry and
//! makes a new one for the new SYN: kernel `net/netfilter/nf_conntrack_proto_tcp.c`, the
//! TIME_WAIT/CLOSE case of `nf_conntrack_tcp_packet`). Counting both into one key would make two
//! connections one record. So a SYN on a key whose counters already hold a FIN or RST (on any
//! CPU) sets the old counters aside under a retired twin of the key, for userspace to finish
//! as their own connection, and the key starts again from this packet.
//!
//! Only a SYN on an existing key (a reuse, or a retransmitted SYN) takes this path, so the loop
//! over CPUs (`bpf_map_lookup_percpu_elem`, Linux 5.19) stays off the per-packet fast path.

use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::bpf_map_lookup_percpu_elem};
use observer_common::{FlowCounters, FlowKey, RETIRED_SLOTS, Stat, TCP_FIN, TCP_RST};

use crate::{
    kmem::global,
    maps::{FLOWS, count},
    nat,
};

/// Upper bound of the CPU loops (the helper also returns NULL past the last possible CPU).
const MAX_CPUS: u32 = 1024;

/// Possible CPUs (`/sys/devices/system/cpu/possible`), patched in by the agent at load. A
/// read-only global is a constant to the verifier, which then walks the loops below that many
/// times rather than `MAX_CPUS` times (seconds of load time for four tc programs).
#[unsafe(no_mangle)]
static NR_CPUS: u32 = MAX_CPUS;

#[inline(always)]
fn nr_cpus() -> u32 {
    global(&NR_CPUS).min(MAX_CPUS)
}

#[inline(always)]
fn cpu_copy(key: &FlowKey, cpu: u32) -> *mut FlowCounters {
    let map = &FLOWS as *const _ as *mut c_void;
    // SAFETY: `FLOWS` is `repr(transparent)` over its map definition, which is what helpers take.
    unsafe { bpf_map_lookup_percpu_elem(map, (key as *const FlowKey).cast(), cpu) }.cast()
}

/// The counters of `key` summed over CPUs, as userspace sums them.
#[inline(always)]
fn sum(key: &FlowKey) -> FlowCounters {
    let mut s = FlowCounters::default();
    for cpu in 0..nr_cpus() {
        let p = cpu_copy(key, cpu);
        if p.is_null() {
            break;
        }
        // SAFETY: non-null pointer to a live per-CPU map value.
        s.merge(unsafe { &*p });
    }
    s
}

#[inline(always)]
fn zero(key: &FlowKey) {
    for cpu in 0..nr_cpus() {
        let p = cpu_copy(key, cpu);
        if p.is_null() {
            break;
        }
        // SAFETY: as in `sum`. Word by word: a whole-struct store became a memset call.
        unsafe {
            let w = p.cast::<u64>();
            for i in 0..core::mem::size_of::<FlowCounters>() / 8 {
                *w.add(i) = 0;
            }
        }
    }
}

/// Put `old` under the first free retired twin of `key` (userspace frees them as it finishes
/// their connections); with all taken, add it to the last one and say so.
#[inline(always)]
fn set_aside(key: &FlowKey, old: &FlowCounters) -> FlowKey {
    let mut twin = *key;
    for slot in 1..=RETIRED_SLOTS {
        twin.retired = slot;
        if FLOWS.insert(twin, *old, BPF_NOEXIST as u64).is_ok() {
            count(Stat::TupleReused);
            return twin;
        }
    }
    match FLOWS.get_ptr_mut(twin) {
        // SAFETY: pointer to this CPU's copy of a live map value.
        Some(c) => unsafe { (*c).merge(old) },
        None => count(Stat::FlowMapFull),
    }
    count(Stat::TupleReuseMerged);
    twin
}

/// Called for a SYN on an existing key. Returns true if the key's earlier connection had ended
/// and was set aside; `key`'s copies are then zero and the caller counts this packet as new.
#[inline(always)]
pub fn retire_if_ended(key: &FlowKey) -> bool {
    let old = sum(key);
    if old.tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return false;
    }
    zero(key);
    let twin = set_aside(key, &old);
    nat::set_aside(key, &twin);
    true
}
