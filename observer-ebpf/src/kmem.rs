//! Reading kernel memory at offsets the agent takes from the running kernel's BTF and patches in
//! as globals at load time (Rust BPF objects carry no CO-RE relocations).

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// A global the loader patched; 0 when it did not.
#[inline(always)]
pub fn global(v: &'static u32) -> u32 {
    // SAFETY: read of a constant the loader patched; volatile so it is not folded to 0.
    unsafe { core::ptr::read_volatile(v) }
}

/// The `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}
