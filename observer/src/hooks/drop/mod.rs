//! The drop tracepoint: offsets from the running kernel's BTF, set as globals at load time.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

use aya::{EbpfLoader, programs::BtfTracePoint};

use super::HookError;

mod kallsyms;

use super::btf::{Btf, BtfError, Globals};
pub use kallsyms::Kallsyms;

/// What the kernel program needs to know, read once at start.
pub struct DropConfig {
    globals: Globals,
    /// `enum skb_drop_reason` value -> name without the `SKB_DROP_REASON_` prefix.
    pub reasons: HashMap<i64, String>,
}

impl DropConfig {
    pub fn from_kernel() -> Result<DropConfig, BtfError> {
        let btf = Btf::from_sys_fs()?;
        let reasons = btf.enum_values("skb_drop_reason", "SKB_DROP_REASON_")?;
        let not_specified = reasons
            .iter()
            .find(|(_, n)| n.as_str() == "NOT_SPECIFIED")
            .map(|(v, _)| *v as u32)
            .ok_or_else(|| BtfError::Missing("SKB_DROP_REASON_NOT_SPECIFIED".into()))?;
        let netns_ino = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino() as u32)
            .map_err(|source| BtfError::Read {
                path: "/proc/self/ns/net".into(),
                source,
            })?;
        // The program dereferences these; a layout where they are not pointers is not one we know.
        for field in ["head", "dev", "sk"] {
            if !btf.is_pointer("sk_buff", field) {
                return Err(BtfError::Missing(format!("pointer sk_buff.{field}")));
            }
        }
        let globals = Globals(vec![
            ("OFF_SKB_HEAD", btf.offset_of("sk_buff", &["head"])?),
            (
                "OFF_SKB_NETWORK_HEADER",
                btf.offset_of("sk_buff", &["network_header"])?,
            ),
            (
                "OFF_SKB_TRANSPORT_HEADER",
                btf.offset_of("sk_buff", &["transport_header"])?,
            ),
            ("OFF_SKB_DEV", btf.offset_of("sk_buff", &["dev"])?),
            (
                "OFF_DEV_NET",
                btf.offset_of("net_device", &["nd_net", "net"])?,
            ),
            (
                "OFF_DEV_IFINDEX",
                btf.offset_of("net_device", &["ifindex"])?,
            ),
            ("OFF_NET_INUM", btf.offset_of("net", &["ns", "inum"])?),
            ("OFF_SKB_SK", btf.offset_of("sk_buff", &["sk"])?),
            (
                "OFF_SK_NET",
                btf.offset_of("sock", &["__sk_common", "skc_net", "net"])?,
            ),
            ("NETNS_INO", netns_ino),
            ("REASON_MIN", not_specified),
        ]);
        Ok(DropConfig { globals, reasons })
    }

    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        self.globals.apply(loader);
    }
}

pub const PROGRAM: &str = "trace_kfree_skb";

pub fn attach(ebpf: &mut aya::Ebpf) -> Result<(), HookError> {
    let err = |source| HookError::Attach {
        hook: PROGRAM,
        target: "tp_btf/kfree_skb".into(),
        source,
    };
    let btf = aya::Btf::from_sys_fs().map_err(|e| err(aya::programs::ProgramError::Btf(e)))?;
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or(HookError::Program {
            name: PROGRAM,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| HookError::Program {
            name: PROGRAM,
            source,
        })?;
    prog.load("kfree_skb", &btf)
        .map_err(|source| HookError::Program {
            name: PROGRAM,
            source,
        })?;
    prog.attach().map_err(err)?;
    Ok(())
}
