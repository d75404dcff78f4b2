//! One finished key removed at one instant: `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
//! (include/uapi/linux/bpf.h; hash maps since Linux 5.14, kernel/bpf/hashtab.c
//! `htab_map_lookup_and_delete_elem`) copies out what the key holds and deletes it under the
//! bucket's lock. A read followed by a delete cannot tell whether the kernel restarted the key
//! in between (a client reusing its port: observer-ebpf/src/reuse.rs); this can, and the caller
//! puts back what belongs to the next connection.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use super::batch::sys_bpf;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `union bpf_attr`'s element member (`map_fd`, `key`, `value`, `flags`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Delete `key` from the hash map `fd` and copy what it held into `values` (one per possible
/// CPU for a per-CPU map, laid out CPU after CPU; one otherwise). `Ok(false)` if it was gone.
pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
    values: &mut [V],
) -> io::Result<bool> {
    // The kernel's per-CPU slots are 8-byte aligned.
    assert!(std::mem::size_of::<V>().is_multiple_of(8) || values.len() == 1);
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: values.as_mut_ptr() as u64,
        ..Default::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The kernel has no lookup-and-delete for this map type (before Linux 5.14 for hash maps).
pub fn unsupported(e: &io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own, include/linux/errno.h: not in libc.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(524) | Some(libc::EOPNOTSUPP)
    )
}
