//! The internal snapshot table.

use super::codec::{be16, be32, be64, FormatError};

/// One snapshot table entry (the fields the engine and checker use, plus its raw bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub vm_state_size: u64,
    /// Virtual disk size recorded by the snapshot (v3 extra data), if present.
    pub disk_size: Option<u64>,
}

/// Decode `count` entries from the snapshot table bytes. Returns the entries and the table's
/// length in bytes.
pub fn decode_table(buf: &[u8], count: u32) -> Result<(Vec<Snapshot>, usize), FormatError> {
    let mut off = 0usize;
    let mut out = Vec::with_capacity(count.min(65536) as usize);
    let short = || FormatError::BadSnapshot("snapshot table is truncated".into());
    for _ in 0..count {
        if off + 40 > buf.len() {
            return Err(short());
        }
        let l1_table_offset = be64(buf, off);
        let l1_size = be32(buf, off + 8);
        let id_len = be16(buf, off + 12) as usize;
        let name_len = be16(buf, off + 14) as usize;
        let date_sec = be32(buf, off + 16);
        let vm_state32 = be32(buf, off + 32) as u64;
        let extra_len = be32(buf, off + 36) as usize;
        let mut p = off + 40;
        if extra_len > 1024 || p + extra_len + id_len + name_len > buf.len() {
            return Err(short());
        }
        let extra = &buf[p..p + extra_len];
        let vm_state_size = if extra_len >= 8 {
            be64(extra, 0)
        } else {
            vm_state32
        };
        let disk_size = (extra_len >= 16).then(|| be64(extra, 8));
        p += extra_len;
        let id = String::from_utf8_lossy(&buf[p..p + id_len]).into_owned();
        p += id_len;
        let name = String::from_utf8_lossy(&buf[p..p + name_len]).into_owned();
        p += name_len;
        off = (p + 7) & !7;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            vm_state_size,
            disk_size,
        });
    }
    Ok((out, off.min(buf.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_qemu_layout() {
        let mut b = vec![0u8; 40];
        b[0..8].copy_from_slice(&0x5_0000u64.to_be_bytes());
        b[8..12].copy_from_slice(&16u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[14..16].copy_from_slice(&4u16.to_be_bytes());
        b[36..40].copy_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(1u64 << 30).to_be_bytes());
        b.extend_from_slice(b"1snap");
        b.resize((b.len() + 7) & !7, 0);
        let (s, len) = decode_table(&b, 1).unwrap();
        assert_eq!(len, b.len());
        assert_eq!(s[0].l1_table_offset, 0x5_0000);
        assert_eq!(s[0].l1_size, 16);
        assert_eq!(s[0].id, "1");
        assert_eq!(s[0].name, "snap");
        assert_eq!(s[0].disk_size, Some(1 << 30));
        assert!(decode_table(&b[..30], 1).is_err());
    }
}
