//! The kernel object, built by `build.rs` from `observer-ebpf` and embedded here once.

use aya::{Ebpf, EbpfError, EbpfLoader};

use super::{drop::DropConfig, filter::FilterOffsets, nat::NatOffsets, pin::PinDir};

pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));

/// Create the maps, with the flow map sized by the operator (reused from `pin` if pinned there
/// before) and the kernel offsets of the drop tracepoint, the conntrack entry and the netfilter
/// programs patched in;
/// programs are loaded by the hooks that attach them.
pub fn load(
    max_flows: u32,
    drops: Option<&DropConfig>,
    nat: Option<&NatOffsets>,
    filter: Option<&FilterOffsets>,
    pin: Option<&PinDir>,
) -> Result<Ebpf, EbpfError> {
    let nr_cpus = nr_cpus();
    let mut loader = loader(&nr_cpus, max_flows);
    if let Some(p) = pin {
        p.drop_incompatible_flows(max_flows);
        loader.map_pin_path("FLOWS", p.flows());
        p.drop_incompatible_ct_orig(max_flows);
        loader.map_pin_path("CT_ORIG", p.ct_orig());
    }
    if let Some(d) = drops {
        d.apply(&mut loader);
    }
    if let Some(n) = nat {
        n.apply(&mut loader);
    }
    if let Some(f) = filter {
        f.apply(&mut loader);
    }
    loader.load(OBJECT)
}

/// As the agent loads it, without pins, drop tracepoint or netfilter offsets, and with the
/// reference programs' map sized like the flow map: for `observer test-run`.
pub fn load_detached(max_flows: u32, nat: Option<&NatOffsets>) -> Result<Ebpf, EbpfError> {
    let nr_cpus = nr_cpus();
    let mut loader = loader(&nr_cpus, max_flows);
    loader.map_max_entries("REF_FLOWS", max_flows);
    if let Some(n) = nat {
        n.apply(&mut loader);
    }
    loader.load(OBJECT)
}

fn nr_cpus() -> Option<u32> {
    aya::util::nr_cpus().ok().map(|n| n as u32)
}

fn loader(nr_cpus: &Option<u32>, max_flows: u32) -> EbpfLoader<'_> {
    let mut loader = EbpfLoader::new();
    // The kernel's CPU loops (a reused 4-tuple's per-CPU counters) are verified for this many
    // CPUs only; left unset they are verified for their upper bound, which takes seconds.
    if let Some(n) = nr_cpus {
        loader.override_global("NR_CPUS", n, true);
    }
    loader.map_max_entries("FLOWS", max_flows);
    loader.map_max_entries("CT_ORIG", observer_common::ct_orig_entries(max_flows));
    loader
}
