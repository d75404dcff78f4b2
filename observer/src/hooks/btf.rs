//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to find struct member offsets and
//! enum values at load time. Rust BPF objects carry no CO-RE relocations, so programs that read
//! kernel structs get the offsets of the running kernel as globals (rustc emits no BTF field
//! relocations: rust-lang/rust#158412; the format: Documentation/bpf/btf.rst).
//!
//! Not aya-obj's BTF parser, though it reads the same file: in aya-obj 0.3 (src/btf/btf.rs,
//! src/btf/types.rs) members and their offsets, enum values and the string table are
//! crate-private (`type_by_id`, `string_at`, `Struct::members`, `Enum::variants`); its public
//! API finds a type's id by name and re-encodes BTF for loading, which answers neither question.

use std::{collections::HashMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no {0}")]
    Missing(String),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset.
    offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    /// Referenced type for typedef/ptr/modifiers.
    ty: u32,
    members: Vec<Member>,
    enumerators: Vec<(u32, i64)>,
}

pub struct Btf {
    strings: Vec<u8>,
    /// Index 0 is "void".
    types: Vec<Type>,
    by_name: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed(
                "bad magic (only little-endian BTF is read)",
            ));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: vec![],
            enumerators: vec![],
        }];
        let mut off = 0;
        while off < types_data.len() {
            let name = u32_at(types_data, off)?;
            let info = u32_at(types_data, off + 4)?;
            let size_or_type = u32_at(types_data, off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                name,
                kind,
                ty: size_or_type,
                members: vec![],
                enumerators: vec![],
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => off += 4,
                KIND_ARRAY => off += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let raw = u32_at(types_data, m + 8)?;
                        t.members.push(Member {
                            name: u32_at(types_data, m)?,
                            ty: u32_at(types_data, m + 4)?,
                            offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    off += vlen * 12;
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let m = off + i * 8;
                        t.enumerators.push((
                            u32_at(types_data, m)?,
                            u32_at(types_data, m + 4)? as i32 as i64,
                        ));
                    }
                    off += vlen * 8;
                }
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let m = off + i * 12;
                        let lo = u32_at(types_data, m + 4)? as u64;
                        let hi = u32_at(types_data, m + 8)? as u64;
                        t.enumerators
                            .push((u32_at(types_data, m)?, (hi << 32 | lo) as i64));
                    }
                    off += vlen * 12;
                }
                KIND_FUNC_PROTO => off += vlen * 8,
                KIND_DATASEC => off += vlen * 12,
                _ => {}
            }
            types.push(t);
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.name != 0 {
                let n = btf.str(t.name).to_owned();
                btf.by_name.entry(n).or_default().push(id as u32);
            }
        }
        Ok(btf)
    }

    fn str(&self, off: u32) -> &str {
        let s = &self.strings[(off as usize).min(self.strings.len())..];
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn find(&self, name: &str, kinds: &[u32]) -> Option<u32> {
        self.by_name
            .get(name)?
            .iter()
            .copied()
            .find(|&id| kinds.contains(&self.types[id as usize].kind))
    }

    /// Follow typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            let t = &self.types[id as usize];
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `path` (e.g. `["ns", "inum"]`) inside struct `name`, looking through
    /// anonymous unions and structs as C does.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("{name}.{}", path.join(".")));
        let mut id = self
            .find(name, &[KIND_STRUCT, KIND_UNION])
            .ok_or_else(missing)?;
        let mut total_bits = 0;
        for field in path {
            let (bits, ty) = self.member(id, field).ok_or_else(missing)?;
            total_bits += bits;
            id = self.resolve(ty);
        }
        if total_bits % 8 != 0 {
            return Err(missing());
        }
        Ok(total_bits / 8)
    }

    /// (bit offset, type) of `field` in struct/union `id`, searching anonymous members.
    fn member(&self, id: u32, field: &str) -> Option<(u32, u32)> {
        let t = &self.types[id as usize];
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        for m in &t.members {
            if self.str(m.name) == field {
                return Some((m.offset, m.ty));
            }
            if m.name == 0
                && let Some((o, ty)) = self.member(self.resolve(m.ty), field)
            {
                return Some((m.offset + o, ty));
            }
        }
        None
    }

    /// Whether member `path` of struct `name` is a pointer (sanity check for offsets we chase).
    pub fn is_pointer(&self, name: &str, field: &str) -> bool {
        self.find(name, &[KIND_STRUCT])
            .and_then(|id| self.member(id, field))
            .is_some_and(|(_, ty)| self.types[self.resolve(ty) as usize].kind == KIND_PTR)
    }

    /// Values of an enum, by name without `prefix`.
    pub fn enum_values(&self, name: &str, prefix: &str) -> Result<HashMap<i64, String>, BtfError> {
        let id = self
            .find(name, &[KIND_ENUM, KIND_ENUM64])
            .ok_or_else(|| BtfError::Missing(format!("enum {name}")))?;
        Ok(self.types[id as usize]
            .enumerators
            .iter()
            .map(|(n, v)| {
                let s = self.str(*n);
                (*v, s.strip_prefix(prefix).unwrap_or(s).to_owned())
            })
            .collect())
    }
}

/// Values the kernel programs read as globals (offsets from this BTF, mostly), patched into the
/// object before it is loaded.
pub struct Globals(pub Vec<(&'static str, u32)>);

impl Globals {
    pub fn apply<'a>(&'a self, loader: &mut aya::EbpfLoader<'a>) {
        for (name, value) in &self.0 {
            loader.override_global(name, value, true);
        }
    }

    /// The value of one (tests).
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the running kernel's BTF: offsets must be plausible and consistent.
    #[test]
    fn running_kernel_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("/sys/kernel/btf/vmlinux is needed by the drop tracepoint and by this test");
        };
        let head = btf.offset_of("sk_buff", &["head"]).unwrap();
        let nh = btf.offset_of("sk_buff", &["network_header"]).unwrap();
        let th = btf.offset_of("sk_buff", &["transport_header"]).unwrap();
        assert!(head > 0 && nh > 0 && th > 0 && head % 8 == 0);
        assert!(btf.is_pointer("sk_buff", "head"));
        assert!(btf.is_pointer("sk_buff", "dev"));
        assert!(btf.offset_of("net", &["ns", "inum"]).is_ok());
        assert!(btf.offset_of("net_device", &["nd_net", "net"]).is_ok());
        assert!(btf.offset_of("sk_buff", &["nope"]).is_err());
        let reasons = btf
            .enum_values("skb_drop_reason", "SKB_DROP_REASON_")
            .unwrap();
        assert!(reasons.values().any(|r| r == "NETFILTER_DROP"));
        assert!(reasons.values().any(|r| r == "NOT_SPECIFIED"));
    }
}
