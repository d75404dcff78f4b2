//! The kernel object, built by `build.rs` from `observer-ebpf` and embedded here once.

use aya::{Ebpf, EbpfError, EbpfLoader};

use super::{drop::DropConfig, nat::NatOffsets, pin::PinDir};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));

/// Create the maps, with the flow map sized by the operator (reused from `pin` if pinned there
/// before) and the kernel offsets of the drop tracepoint and of the conntrack entry patched in;
/// programs are loaded by the hooks that attach them.
pub fn load(
    max_flows: u32,
    drops: Option<&DropConfig>,
    nat: Option<&NatOffsets>,
    pin: Option<&PinDir>,
) -> Result<Ebpf, EbpfError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("FLOWS", max_flows);
    if let Some(p) = pin {
        p.drop_incompatible_flows(max_flows);
        loader.map_pin_path("FLOWS", p.flows());
        p.drop_incompatible_ct_orig();
        loader.map_pin_path("CT_ORIG", p.ct_orig());
    }
    if let Some(d) = drops {
        d.apply(&mut loader);
    }
    if let Some(n) = nat {
        n.apply(&mut loader);
    }
    loader.load(OBJECT)
}
