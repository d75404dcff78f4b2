//! Kernel programs of observer.
//!
//! One module per hook; `parse` reads headers, `maps` holds every map and the in-kernel
//! aggregation. Every program only observes: tc programs return `TC_ACT_UNSPEC` (continue to the
//! next program, the kernel's default action) and cgroup programs always allow.
#![no_std]
#![no_main]

mod account;
mod cgroup;
mod filter;
mod kmem;
mod maps;
mod nat;
mod parse;
mod reference;
mod reuse;
mod tc;
mod trace;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never executed.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
