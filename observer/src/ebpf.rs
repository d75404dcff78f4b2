//! The kernel object, built by `build.rs` from `observer-ebpf` and embedded here once.

use aya::{Ebpf, EbpfError, EbpfLoader};

use crate::hooks::drop::DropConfig;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-ebpf"));

/// Create the maps, with the flow map sized by the operator and the drop tracepoint's kernel
/// offsets patched in; programs are loaded by the hooks that attach them.
pub fn load(max_flows: u32, drops: Option<&DropConfig>) -> Result<Ebpf, EbpfError> {
    let mut loader = EbpfLoader::new();
    loader.map_max_entries("FLOWS", max_flows);
    if let Some(d) = drops {
        d.apply(&mut loader);
    }
    loader.load(OBJECT)
}
