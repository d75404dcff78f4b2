//! The packet's conntrack entry, read at egress points (after netfilter, where NAT has been
//! decided) once per new flow key: `skb->_nfct` points at the `nf_conn` (low 3 bits:
//! `ip_conntrack_info`), whose `tuplehash[IP_CT_DIR_ORIGINAL].tuple` is what the client sent.
//! Offsets come from the running kernel's BTF, set as globals by the agent at load time (Rust BPF
//! objects carry no CO-RE relocations); left at 0, nothing is read and records say the join was
//! inferred.

use aya_ebpf::{macros::map, maps::HashMap};
use observer_common::{CT_ORIG_MAX_ENTRIES, CT_UNTRACKED, CtOrig, FlowKey, Stat};

use crate::{
    kmem::{global, read},
    maps::count,
};

#[map]
pub static CT_ORIG: HashMap<FlowKey, CtOrig> = HashMap::with_max_entries(CT_ORIG_MAX_ENTRIES, 0);

#[unsafe(no_mangle)]
static OFF_SKB_NFCT: u32 = 0;
/// Offsets in `struct nf_conn` of the original tuple's fields.
#[unsafe(no_mangle)]
static OFF_CT_SRC_IP: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CT_SRC_PORT: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CT_DST_IP: u32 = 0;
#[unsafe(no_mangle)]
static OFF_CT_DST_PORT: u32 = 0;
/// `nf_conn.zone.id`; 0 without conntrack zones in the kernel (every entry is in zone 0).
#[unsafe(no_mangle)]
static OFF_CT_ZONE: u32 = 0;

/// Remember the conntrack original tuple of the packet (the kernel's `sk_buff` at `skb`) that
/// created `key`.
#[inline(always)]
pub fn note_original(skb: u64, key: &FlowKey) {
    let off = global(&OFF_SKB_NFCT);
    if off == 0 {
        return;
    }
    let Ok(nfct) = read::<u64>(skb, off) else {
        return;
    };
    let ctinfo = (nfct & 7) as u8;
    let ct = nfct & !7;
    let orig = if ct == 0 || ctinfo == CT_UNTRACKED {
        CtOrig {
            ctinfo: CT_UNTRACKED,
            ..Default::default()
        }
    } else {
        let (Ok(src), Ok(sport_be), Ok(dst), Ok(dport_be)) = (
            read::<[u8; 16]>(ct, global(&OFF_CT_SRC_IP)),
            read::<u16>(ct, global(&OFF_CT_SRC_PORT)),
            read::<[u8; 16]>(ct, global(&OFF_CT_DST_IP)),
            read::<u16>(ct, global(&OFF_CT_DST_PORT)),
        ) else {
            return;
        };
        let off_zone = global(&OFF_CT_ZONE);
        let zone = if off_zone == 0 {
            0
        } else {
            read::<u16>(ct, off_zone).unwrap_or(0)
        };
        CtOrig {
            src,
            dst,
            sport_be,
            dport_be,
            ctinfo,
            _pad: 0,
            zone,
        }
    };
    if CT_ORIG.insert(key, orig, 0).is_err() {
        count(Stat::CtOrigFull);
    }
}

/// The conntrack tuple noted for `key` goes with its retired connection to `twin`; the caller
/// notes the new connection's own.
#[inline(always)]
pub fn set_aside(key: &FlowKey, twin: &FlowKey) {
    if let Some(orig) = CT_ORIG.get_ptr(key) {
        // SAFETY: pointer to a live map value, copied out at once.
        let orig = unsafe { *orig };
        let _ = CT_ORIG.insert(twin, orig, 0);
    }
}
