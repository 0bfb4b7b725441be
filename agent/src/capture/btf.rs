//! Field offsets of the few kernel structs the probes read (fd -> file ->
//! inode/socket -> sock), from the running kernel's BTF.
//!
//! Hand-written because the reader needs only struct members by name: aya-obj
//! keeps its parsed members crate-private, and the crates that expose them
//! are LGPL. The format is small and stable (Documentation/bpf/btf.rst).
use std::collections::HashMap;

use meshless_common::KernelOffsets;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why offsets could not be computed (the probes then fall back to
/// userspace confirmation of sockets).
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {VMLINUX_BTF}: {0}")]
    Read(#[from] std::io::Error),
    #[error("{VMLINUX_BTF} is not BTF (bad magic or header)")]
    Header,
    #[error("BTF type section is cut short at type {0}")]
    Truncated(usize),
    #[error("BTF kind {kind} of type {id} is unknown")]
    Kind { kind: u32, id: usize },
    #[error("kernel struct {0} is not in BTF")]
    NoStruct(String),
    #[error("field {field} of struct {strukt} is not in BTF")]
    NoField { strukt: String, field: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    /// For modifiers and typedefs: the referenced type.
    ty: u32,
    members: Vec<Member>,
}

/// The parsed type section: enough to find struct members by name.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::parse(&std::fs::read(VMLINUX_BTF)?)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Header);
        }
        let field = |i: usize| u32_at(data, 4 + 4 * i).ok_or(BtfError::Header).map(|v| v as usize);
        let (hdr_len, type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let types_raw = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Header)?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Header)?
            .to_vec();
        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut off = 0;
        while off < types_raw.len() {
            let id = types.len();
            let rd = |o: usize| u32_at(types_raw, off + o).ok_or(BtfError::Truncated(id));
            let (name, info, size_or_type) = (rd(0)?, rd(4)?, rd(8)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            off += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Kind { kind, id }),
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for m in 0..vlen {
                    let at = off + 12 * m;
                    let get = |o: usize| u32_at(types_raw, at + o).ok_or(BtfError::Truncated(id));
                    let raw = get(8)?;
                    members.push(Member {
                        name: get(0)?,
                        ty: get(4)?,
                        bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                    });
                }
            }
            off += extra;
            types.push(Type {
                name,
                kind,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && !t.members.is_empty() {
                let name = btf.string(t.name).to_owned();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and modifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.ty
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of `field` in the struct/union `id`, looking through
    /// anonymous struct/union members (sock_common's address unions).
    fn member_bits(&self, id: u32, field: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(self.resolve(id) as usize)?;
        for m in &t.members {
            if m.name != 0 && self.string(m.name) == field {
                return Some(m.bit_offset);
            }
        }
        if depth == 0 {
            return None;
        }
        t.members
            .iter()
            .filter(|m| m.name == 0)
            .find_map(|m| Some(m.bit_offset + self.member_bits(m.ty, field, depth - 1)?))
    }

    /// Byte offset of `strukt.field`.
    pub fn offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let bits = self.member_bits(id, field, 4).ok_or_else(|| BtfError::NoField {
            strukt: strukt.to_owned(),
            field: field.to_owned(),
        })?;
        Ok(bits / 8)
    }

    /// The offsets the probes need.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        // struct sock starts with its sock_common.
        let common = self.offset("sock", "__sk_common")?;
        let sk = |f: &str| Ok::<u32, BtfError>(common + self.offset("sock_common", f)?);
        Ok(KernelOffsets {
            valid: 1,
            task_files: self.offset("task_struct", "files")?,
            files_fdt: self.offset("files_struct", "fdt")?,
            fdt_max_fds: self.offset("fdtable", "max_fds")?,
            fdt_fd: self.offset("fdtable", "fd")?,
            file_inode: self.offset("file", "f_inode")?,
            file_private_data: self.offset("file", "private_data")?,
            inode_mode: self.offset("inode", "i_mode")?,
            inode_ino: self.offset("inode", "i_ino")?,
            socket_sk: self.offset("socket", "sk")?,
            sk_family: sk("skc_family")?,
            sk_daddr: sk("skc_daddr")?,
            sk_rcv_saddr: sk("skc_rcv_saddr")?,
            sk_dport: sk("skc_dport")?,
            sk_num: sk("skc_num")?,
            sk_v6_daddr: sk("skc_v6_daddr")?,
            sk_v6_rcv_saddr: sk("skc_v6_rcv_saddr")?,
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_socket_field_offsets_in_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return; // no BTF on this machine: nothing to check against
        };
        let o = btf.kernel_offsets().expect("every field is in vmlinux BTF");
        // sock_common starts with the address pair; skc_dport follows it.
        assert_eq!(o.sk_daddr, 0);
        assert_eq!(o.sk_rcv_saddr, 4);
        assert_eq!(o.sk_dport, 12);
        assert_eq!(o.sk_num, 14);
        assert!(o.task_files > 0 && o.file_inode > 0);
    }

    #[test]
    fn rejects_data_that_is_not_btf() {
        assert!(matches!(Btf::parse(b"not btf at all"), Err(BtfError::Header)));
    }
}
