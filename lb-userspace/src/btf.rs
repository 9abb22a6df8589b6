//! The one thing xlb needs from the kernel's BTF: where a struct member sits. aya-obj
//! parses BTF but keeps its type walk private, so this reads the format directly
//! (include/uapi/linux/btf.h): a header, then a type section of variable-length
//! records, then the string section.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    let bytes = b
        .get(off..off + 4)
        .context("BTF truncated")?
        .try_into()
        .expect("four bytes");
    Ok(u32::from_le_bytes(bytes))
}

fn str_at(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or(&[]);
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    &s[..end]
}

/// Bytes that follow a type record's 12-byte header, by kind.
fn extra_len(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        1 => 4,              // INT
        2 | 7 | 8..=11 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT
        3 => 12,             // ARRAY
        4 | 5 => 12 * vlen,  // STRUCT, UNION
        6 => 8 * vlen,       // ENUM
        12 => 0,             // FUNC
        13 => 8 * vlen,      // FUNC_PROTO
        14 => 4,             // VAR
        15 => 12 * vlen,     // DATASEC
        16 => 0,             // FLOAT
        17 => 4,             // DECL_TAG
        18 => 0,             // TYPE_TAG
        19 => 12 * vlen,     // ENUM64
        k => bail!("unknown BTF kind {k}"),
    })
}

/// Byte offset of `member` in `struct name`, from little-endian BTF bytes.
pub fn member_offset_in(btf: &[u8], name: &str, member: &str) -> Result<u32> {
    ensure!(btf.len() >= 24, "BTF shorter than its header");
    let magic = u16::from_le_bytes([btf[0], btf[1]]);
    ensure!(
        magic == BTF_MAGIC,
        "not little-endian BTF (magic {magic:#x})"
    );
    let hdr_len = u32_at(btf, 4)? as usize;
    let type_off = u32_at(btf, 8)? as usize;
    let type_len = u32_at(btf, 12)? as usize;
    let str_off = u32_at(btf, 16)? as usize;
    let str_len = u32_at(btf, 20)? as usize;
    let types = btf
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .context("BTF type section out of bounds")?;
    let strings = btf
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .context("BTF string section out of bounds")?;
    let mut at = 0;
    while at + 12 <= types.len() {
        let name_off = u32_at(types, at)?;
        let info = u32_at(types, at + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let bitfield_offsets = info >> 31 == 1;
        if kind == KIND_STRUCT && str_at(strings, name_off) == name.as_bytes() {
            for i in 0..vlen {
                let m = at + 12 + 12 * i;
                if str_at(strings, u32_at(types, m)?) == member.as_bytes() {
                    let raw = u32_at(types, m + 8)?;
                    let bits = if bitfield_offsets {
                        raw & 0xff_ffff
                    } else {
                        raw
                    };
                    ensure!(bits % 8 == 0, "{name}.{member} is a bitfield");
                    return Ok(bits / 8);
                }
            }
            bail!("struct {name} has no member {member} at its top level");
        }
        at += 12 + extra_len(kind, vlen)?;
    }
    bail!("no struct {name} in the BTF")
}

/// Byte offset of `member` in the running kernel's `struct name`.
pub fn kernel_member_offset(name: &str, member: &str) -> Result<u32> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let btf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    member_offset_in(&btf, name, member)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_of_the_running_kernel() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no kernel BTF here");
            return;
        };
        // struct iphdr's layout is fixed by the wire format.
        assert_eq!(member_offset_in(&btf, "iphdr", "ttl").unwrap(), 8);
        assert_eq!(member_offset_in(&btf, "iphdr", "protocol").unwrap(), 9);
        let ifindex = member_offset_in(&btf, "net_device", "ifindex").unwrap();
        assert!(ifindex > 0 && ifindex.is_multiple_of(4), "{ifindex}");
        assert!(member_offset_in(&btf, "net_device", "no_such_member").is_err());
        assert!(member_offset_in(&btf, "no_such_struct_xlb", "x").is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(member_offset_in(&[], "a", "b").is_err());
        assert!(member_offset_in(&[0u8; 64], "a", "b").is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(member_offset_in(&hdr, "a", "b").is_err());
    }
}
