//! Reading kernel memory at offsets the agent takes from the running kernel's BTF and patches in
//! as globals at load time (Rust BPF objects carry no CO-RE relocations).

use aya_ebpf::{cty::c_long, helpers::bpf_probe_read_kernel};

use crate::parse::Packet;

// `sk_buff` and `net_device` fields read by more than one program.
#[unsafe(no_mangle)]
pub static OFF_SKB_HEAD: u32 = 0;
#[unsafe(no_mangle)]
pub static OFF_SKB_NETWORK_HEADER: u32 = 0;
#[unsafe(no_mangle)]
pub static OFF_DEV_IFINDEX: u32 = 0;

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

/// A packet in kernel memory from its IP header on, for the header parser.
pub struct KernelL3(pub u64);

impl Packet for KernelL3 {
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, c_long> {
        read(self.0, offset as u32).map_err(|e| e as c_long)
    }
}
