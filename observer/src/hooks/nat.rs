//! Where the tc programs find a packet's conntrack entry: `sk_buff._nfct` and, in `nf_conn`, the
//! ORIGINAL direction's tuple (`tuplehash[IP_CT_DIR_ORIGINAL].tuple`, the first element) and its
//! zone (`nf_conn.zone.id`, kernel `include/net/netfilter/nf_conntrack_zones.h`), taken
//! from the running kernel's BTF and set as globals before loading. Without them the programs
//! read nothing, and records say their pre/post-DNAT join was inferred.

use aya::EbpfLoader;

use super::btf::{Btf, BtfError, Globals};

pub struct NatOffsets {
    globals: Globals,
}

impl NatOffsets {
    pub fn from_kernel() -> Result<NatOffsets, BtfError> {
        Self::from_btf(&Btf::from_sys_fs()?)
    }

    fn from_btf(btf: &Btf) -> Result<NatOffsets, BtfError> {
        let orig = btf.offset_of("nf_conn", &["tuplehash"])?
            + btf.offset_of("nf_conntrack_tuple_hash", &["tuple"])?;
        let at = |path: &[&str]| btf.offset_of("nf_conntrack_tuple", path).map(|o| orig + o);
        // `nf_conn.zone` exists with CONFIG_NF_CONNTRACK_ZONES; without it every entry is in
        // zone 0, which is what the programs report when the offset is left at 0.
        let zone = btf.offset_of("nf_conn", &["zone", "id"]).unwrap_or(0);
        Ok(NatOffsets {
            globals: Globals(vec![
                ("OFF_CT_ZONE", zone),
                ("OFF_SKB_NFCT", btf.offset_of("sk_buff", &["_nfct"])?),
                ("OFF_CT_SRC_IP", at(&["src", "u3"])?),
                ("OFF_CT_SRC_PORT", at(&["src", "u", "all"])?),
                ("OFF_CT_DST_IP", at(&["dst", "u3"])?),
                ("OFF_CT_DST_PORT", at(&["dst", "u", "all"])?),
            ]),
        })
    }

    pub fn apply<'a>(&'a self, loader: &mut EbpfLoader<'a>) {
        self.globals.apply(loader);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's layout: the original tuple's destination follows its source, and
    /// each port sits after its address (kernel `include/net/netfilter/nf_conntrack_tuple.h`).
    #[test]
    fn offsets_come_from_this_kernels_btf() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux here: nothing to check");
            return;
        };
        let n = NatOffsets::from_btf(&btf).expect("conntrack types in BTF");
        let get = |k: &str| n.globals.get(k).unwrap();
        assert!(get("OFF_SKB_NFCT") > 0);
        assert_eq!(
            get("OFF_CT_SRC_PORT"),
            get("OFF_CT_SRC_IP") + 16,
            "after a 16-byte nf_inet_addr"
        );
        assert_eq!(get("OFF_CT_DST_PORT"), get("OFF_CT_DST_IP") + 16);
        assert!(get("OFF_CT_DST_IP") > get("OFF_CT_SRC_PORT"));
    }
}
