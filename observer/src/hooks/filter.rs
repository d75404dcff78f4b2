//! The netfilter programs around the filter table (observer-ebpf/src/filter.rs): offsets from
//! the running kernel's BTF, and a loader of our own, because aya 0.14 has none for
//! BPF_PROG_TYPE_NETFILTER. The object is parsed again with aya-obj, its map references are
//! pointed at the maps aya already created (so the programs share FLOWS, CT_ORIG and the rings
//! with the tc programs), and the instructions are loaded with `BPF_PROG_LOAD` and linked with
//! `BPF_LINK_CREATE` (kernel `net/netfilter/nf_bpf_link.c`). Links are fds this process holds:
//! the kernel unlinks them when the agent exits, also on a crash.

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use aya::{EbpfLoader, maps::Map};

use super::btf::{Btf, BtfError, Globals};

/// Kernel `include/uapi/linux/netfilter.h` (`NFPROTO_*`, `NF_INET_*`).
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// `NF_IP_PRI_FILTER` is 0 (kernel `include/uapi/linux/netfilter_ipv4.h`, and the same in
/// `netfilter_ipv6.h`); nftables' `filter` priority is 0 too.
const BEFORE_FILTER: i32 = -1;
const AFTER_FILTER: i32 = 1;

/// Each program with its hook and priority.
const PROGRAMS: [(&str, u32, i32); 6] = [
    ("nf_forward", NF_INET_FORWARD, BEFORE_FILTER),
    ("nf_input", NF_INET_LOCAL_IN, BEFORE_FILTER),
    ("nf_output", NF_INET_LOCAL_OUT, BEFORE_FILTER),
    ("nf_forward_passed", NF_INET_FORWARD, AFTER_FILTER),
    ("nf_input_passed", NF_INET_LOCAL_IN, AFTER_FILTER),
    ("nf_output_passed", NF_INET_LOCAL_OUT, AFTER_FILTER),
];

// include/uapi/linux/bpf.h
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_NETFILTER: u32 = 32;
const BPF_NETFILTER: u32 = 45;

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("parsing the kernel object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating the netfilter programs: {0}")]
    Relocate(String),
    #[error("map {0} is not loaded")]
    MissingMap(String),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("loading {name}: {source}{log}")]
    Load {
        name: &'static str,
        source: std::io::Error,
        /// The verifier's last words, if it spoke.
        log: String,
    },
    #[error("linking {name} at {family} hook {hook} priority {priority}: {source}")]
    Link {
        name: &'static str,
        family: &'static str,
        hook: u32,
        priority: i32,
        source: std::io::Error,
    },
}

/// Offsets of the fields the programs read, from the running kernel's BTF.
pub struct FilterOffsets {
    globals: Globals,
}

impl FilterOffsets {
    pub fn from_kernel() -> Result<FilterOffsets, BtfError> {
        Self::from_btf(&Btf::from_sys_fs()?)
    }

    fn from_btf(btf: &Btf) -> Result<FilterOffsets, BtfError> {
        for (st, field) in [
            ("sk_buff", "head"),
            ("nf_hook_state", "in"),
            ("nf_hook_state", "out"),
        ] {
            if !btf.is_pointer(st, field) {
                return Err(BtfError::Missing(format!("pointer {st}.{field}")));
            }
        }
        Ok(FilterOffsets {
            globals: Globals(vec![
                ("OFF_SKB_HEAD", btf.offset_of("sk_buff", &["head"])?),
                (
                    "OFF_SKB_NETWORK_HEADER",
                    btf.offset_of("sk_buff", &["network_header"])?,
                ),
                ("OFF_SKB_LEN", btf.offset_of("sk_buff", &["len"])?),
                (
                    "OFF_DEV_IFINDEX",
                    btf.offset_of("net_device", &["ifindex"])?,
                ),
                ("OFF_STATE_IN", btf.offset_of("nf_hook_state", &["in"])?),
                ("OFF_STATE_OUT", btf.offset_of("nf_hook_state", &["out"])?),
            ]),
        })
    }

    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        self.globals.apply(loader);
    }
}

/// The loaded programs and, once linked, their links; dropping it unlinks them.
pub struct FilterHooks {
    programs: Vec<(&'static str, u32, i32, OwnedFd)>,
    links: Vec<OwnedFd>,
}

impl FilterHooks {
    pub fn describe() -> &'static str {
        "netfilter FORWARD, LOCAL_IN and LOCAL_OUT (IPv4 and IPv6), at priority -1 and +1 around the filter table"
    }

    /// Link every program at its hook for IPv4 and IPv6, in this network namespace (the kernel
    /// links to the caller's: `nf_bpf_link_attach`).
    pub fn link(&mut self) -> Result<(), FilterError> {
        for (name, hook, priority, fd) in &self.programs {
            for (pf, family) in [(NFPROTO_IPV4, "ipv4"), (NFPROTO_IPV6, "ipv6")] {
                let l = link(fd.as_raw_fd(), pf, *hook, *priority).map_err(|source| {
                    FilterError::Link {
                        name,
                        family,
                        hook: *hook,
                        priority: *priority,
                        source,
                    }
                })?;
                self.links.push(l);
            }
        }
        Ok(())
    }
}

/// Load the six programs from `object` against the maps of `ebpf` (loaded from the same bytes,
/// with the offsets applied).
pub fn load(object: &[u8], ebpf: &aya::Ebpf) -> Result<FilterHooks, FilterError> {
    let mut obj = aya_obj::Object::parse(object)?;
    let mut fds = Vec::new();
    for name in obj.maps.keys() {
        let map = ebpf
            .map(name)
            .ok_or_else(|| FilterError::MissingMap(name.clone()))?;
        fds.push((name.clone(), map_fd(map)));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let maps = obj.maps.clone();
    obj.relocate_maps(
        fds.iter().map(|(n, fd)| (n.as_str(), *fd, &maps[n])),
        &text_sections,
    )
    .map_err(|e| FilterError::Relocate(e.to_string()))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| FilterError::Relocate(e.to_string()))?;
    let mut programs = Vec::new();
    for (name, hook, priority) in PROGRAMS {
        let prog = obj
            .programs
            .get(name)
            .ok_or(FilterError::MissingProgram(name))?;
        let insns = &obj.functions[&prog.function_key()].instructions;
        programs.push((
            name,
            hook,
            priority,
            load_program(name, insns, &obj.license)?,
        ));
    }
    Ok(FilterHooks {
        programs,
        links: Vec::new(),
    })
}

fn map_fd(map: &Map) -> RawFd {
    use Map::*;
    let data = match map {
        Array(d)
        | ArrayOfMaps(d)
        | BloomFilter(d)
        | CgroupArray(d)
        | CgroupStorage(d)
        | CgrpStorage(d)
        | CpuMap(d)
        | DevMap(d)
        | DevMapHash(d)
        | HashMap(d)
        | HashOfMaps(d)
        | InodeStorage(d)
        | LpmTrie(d)
        | LruHashMap(d)
        | PerCpuArray(d)
        | PerCpuCgroupStorage(d)
        | PerCpuHashMap(d)
        | PerCpuLruHashMap(d)
        | PerfEventArray(d)
        | ProgramArray(d)
        | Queue(d)
        | ReusePortSockArray(d)
        | RingBuf(d)
        | SockHash(d)
        | SockMap(d)
        | SkStorage(d)
        | Stack(d)
        | StackTraceMap(d)
        | Unsupported(d)
        | XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

fn bpf(cmd: libc::c_long, attr: &[u64]) -> std::io::Result<OwnedFd> {
    // SAFETY: bpf(2) with an attr of the size we pass, zero beyond what we set.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_LOAD`; on failure again with the verifier's log, to say why.
fn load_program(
    name: &'static str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, FilterError> {
    let attempt = |log: &mut [u8]| {
        // prog_type, insn_cnt | insns | license | log_level, log_size | log_buf |
        // kern_version, prog_flags | prog_name[16] | prog_ifindex, expected_attach_type
        let mut attr = [0u64; 16];
        attr[0] = BPF_PROG_TYPE_NETFILTER as u64 | (insns.len() as u64) << 32;
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        if !log.is_empty() {
            attr[3] = 1 | (log.len() as u64) << 32;
            attr[4] = log.as_mut_ptr() as u64;
        }
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        attr[6] = u64::from_ne_bytes(prog_name[..8].try_into().expect("8 bytes"));
        attr[7] = u64::from_ne_bytes(prog_name[8..].try_into().expect("8 bytes"));
        attr[8] = (BPF_NETFILTER as u64) << 32;
        bpf(BPF_PROG_LOAD, &attr)
    };
    attempt(&mut []).or_else(|source| {
        let mut log = vec![0u8; 4 << 20];
        match attempt(&mut log) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let text = String::from_utf8_lossy(&log);
                let text = text.trim_end_matches('\0').trim_end();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                let log = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                Err(FilterError::Load {
                    name,
                    source,
                    log: if log.is_empty() {
                        String::new()
                    } else {
                        format!("\nverifier:\n{log}")
                    },
                })
            }
        }
    })
}

/// `BPF_LINK_CREATE` with `link_create.netfilter = {pf, hooknum, priority, flags: 0}`.
fn link(prog: RawFd, pf: u32, hook: u32, priority: i32) -> std::io::Result<OwnedFd> {
    // prog_fd, target_fd | attach_type, flags | pf, hooknum | priority, flags
    let mut attr = [0u64; 8];
    attr[0] = prog as u32 as u64;
    attr[1] = BPF_NETFILTER as u64;
    attr[2] = pf as u64 | (hook as u64) << 32;
    attr[3] = priority as u32 as u64;
    bpf(BPF_LINK_CREATE, &attr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields the programs read exist in this kernel, where `struct nf_hook_state` starts with
    /// `hook` and `pf` (kernel `include/linux/netfilter.h`) and the devices follow.
    #[test]
    fn offsets_come_from_this_kernels_btf() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no kernel BTF here; skipped");
            return;
        };
        let o = FilterOffsets::from_btf(&btf).expect("netfilter types in BTF");
        let get = |n: &str| o.globals.get(n).unwrap();
        assert!(get("OFF_STATE_IN") >= 2);
        assert_eq!(get("OFF_STATE_OUT"), get("OFF_STATE_IN") + 8);
    }
}
