//! The primitives every codec here shares: its error, big-endian fields, u64 tables.

/// A structure on disk that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    BadVersion(u32),
    #[error("image header is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("invalid header: {0}")]
    BadHeader(String),
    #[error("invalid header extension: {0}")]
    BadExtension(String),
    #[error("invalid snapshot table: {0}")]
    BadSnapshot(String),
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Decode a table of big-endian u64 entries (L1, L2, refcount table).
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| be64(c, 0)).collect()
}

/// Encode a table of u64 entries big-endian.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        v.extend_from_slice(&e.to_be_bytes());
    }
    v
}
