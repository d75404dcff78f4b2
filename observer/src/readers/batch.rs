//! Whole-map reads and multi-key deletes in a few syscalls: `BPF_MAP_LOOKUP_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (include/uapi/linux/bpf.h, `struct { ... } batch` of `union bpf_attr`;
//! hash maps implement them since Linux 5.6, kernel/bpf/hashtab.c `BATCH_OPS`). aya 0.14 has no
//! API for them. One `BPF_MAP_LOOKUP_ELEM` per key cost the agent a syscall, a hash lookup and
//! two allocations per key per poll: at a few thousand new connections a second that was the
//! largest part of its CPU time.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Elements asked for per lookup call; a hash bucket larger than this doubles it.
const CHUNK: usize = 4096;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// bpf(2) with `attr`, a member of `union bpf_attr` (the kernel zero-fills the rest).
pub(super) fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: every caller passes an attr whose pointers are valid for what `cmd` reads and
    // writes through them (`count` elements for a batch, one key and value for an element).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reused buffers for [`lookup_all`].
pub struct LookupBuf<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
}

impl<K: aya::Pod, V: aya::Pod> LookupBuf<K, V> {
    pub fn new() -> Self {
        LookupBuf {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Every entry of the hash map `fd`, `per_key` values each (the number of possible CPUs
    /// for a per-CPU map, whose values the kernel lays out CPU after CPU; 1 otherwise). An
    /// entry added or deleted during the walk may be missed or seen: the next walk settles it.
    pub fn lookup_all(&mut self, fd: BorrowedFd<'_>, per_key: usize) -> io::Result<(&[K], &[V])> {
        // Value slots are 8-byte aligned per CPU in the kernel's layout.
        assert!(std::mem::size_of::<V>().is_multiple_of(8) || per_key == 1);
        let mut n = 0;
        let mut chunk = CHUNK;
        let (mut token_in, mut token_out) = (0u64, 0u64);
        let mut first = true;
        loop {
            self.grow(n + chunk, per_key);
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &mut token_in as *mut u64 as u64
                },
                out_batch: &mut token_out as *mut u64 as u64,
                keys: self.keys[n..].as_mut_ptr() as u64,
                values: self.values[n * per_key..].as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let res = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            n += attr.count as usize;
            match res {
                Ok(()) => {}
                // The end of the map (with what this call found counted above).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                // One bucket holds more than `chunk` entries.
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && attr.count == 0 => {
                    chunk *= 2;
                    continue;
                }
                Err(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
        Ok((&self.keys[..n], &self.values[..n * per_key]))
    }

    fn grow(&mut self, keys: usize, per_key: usize) {
        if self.keys.len() < keys {
            // SAFETY: `aya::Pod` types are plain data for which all-zero bytes are valid.
            self.keys.resize(keys, unsafe { std::mem::zeroed() });
            self.values
                .resize(keys * per_key, unsafe { std::mem::zeroed() });
        }
    }
}

/// Delete `keys` from the hash map `fd`; keys already gone are skipped. Returns how many were
/// deleted.
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, mut keys: &[K]) -> io::Result<usize> {
    let mut deleted = 0;
    while !keys.is_empty() {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let res = sys_bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        // The kernel stops at the first key it cannot delete; `count` says how far it got.
        let done = (attr.count as usize).min(keys.len());
        deleted += done;
        match res {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                keys = keys.get(done + 1..).unwrap_or_default()
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
