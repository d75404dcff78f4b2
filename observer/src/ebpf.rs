//! The kernel object, built by `build.rs` from `observer-ebpf` and embedded here once.

use aya::{Ebpf, EbpfError, EbpfLoader};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));

/// Load (but do not attach) the programs and create the maps, with the flow map sized by the
/// operator.
pub fn load(max_flows: u32) -> Result<Ebpf, EbpfError> {
    EbpfLoader::new()
        .map_max_entries("FLOWS", max_flows)
        .load(OBJECT)
}
