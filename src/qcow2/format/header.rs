//! The qcow2 header (cluster 0): fixed fields, header extensions, backing file name.

use super::codec::{be32, be64, FormatError};

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// Header length we write: v3 with the compression type byte, padded to 8.
pub const OUR_HEADER_LEN: u32 = 112;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of fields the engine rewrites in place: the virtual size (u64); `l1_size` (u32)
/// followed by `l1_table_offset` (u64), one 12-byte field; the refcount table's 12-byte field;
/// the incompatible feature bits.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_INCOMPATIBLE: u64 = 72;

/// Compression types.
pub const COMPRESSION_ZLIB: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

/// One header extension, kept verbatim when unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderExtension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The decoded header. Field names follow the qcow2 specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Extensions in file order, without the end marker.
    pub extensions: Vec<HeaderExtension>,
    /// Backing file name, when there is one.
    pub backing_file: Option<String>,
}

impl Header {
    /// Bytes needed to read the fixed part and learn the cluster size.
    pub const PROBE_LEN: usize = 104;

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The cluster size from the first bytes of an image, validated.
    pub fn probe_cluster_bits(buf: &[u8]) -> Result<u32, FormatError> {
        if buf.len() < 24 {
            return Err(FormatError::Truncated(buf.len()));
        }
        if be32(buf, 0) != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let cb = be32(buf, 20);
        if !(9..=21).contains(&cb) {
            return Err(FormatError::BadHeader(format!(
                "cluster_bits {cb} out of range 9..=21"
            )));
        }
        Ok(cb)
    }

    /// Decode cluster 0 (`buf` must hold the whole first cluster, or the file if shorter).
    pub fn decode(buf: &[u8]) -> Result<Header, FormatError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(FormatError::Truncated(buf.len()));
        }
        if be32(buf, 0) != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::BadVersion(version));
        }
        let cluster_bits = Self::probe_cluster_bits(buf)?;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: COMPRESSION_ZLIB,
            extensions: Vec::new(),
            backing_file: None,
        };
        let cluster_size = 1usize << cluster_bits;
        let limit = buf.len().min(cluster_size);
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(FormatError::Truncated(buf.len()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(FormatError::BadHeader(format!(
                    "header_length {} must be >= 104 and a multiple of 8",
                    h.header_length
                )));
            }
            if h.header_length as usize > limit {
                return Err(FormatError::BadHeader(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            if h.header_length > V3_HEADER_LEN {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(FormatError::BadHeader(format!(
                "refcount_order {} > 6",
                h.refcount_order
            )));
        }
        // Header extensions follow the header, up to the end of cluster 0.
        let mut off = h.header_length as usize;
        let mut seen = Vec::new();
        loop {
            if off + 8 > limit {
                // QEMU tolerates a missing end marker at the end of the cluster.
                break;
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > limit - off {
                return Err(FormatError::BadExtension(format!(
                    "extension {kind:#x} of {len} bytes runs past the first cluster"
                )));
            }
            if seen.contains(&kind) {
                return Err(FormatError::BadExtension(format!(
                    "extension {kind:#x} appears twice"
                )));
            }
            seen.push(kind);
            h.extensions.push(HeaderExtension {
                kind,
                data: buf[off..off + len].to_vec(),
            });
            off += (len + 7) & !7;
        }
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let len = h.backing_file_size as usize;
            if h.backing_file_size > 1023
                || h.backing_file_offset > limit as u64
                || start + len > limit
            {
                return Err(FormatError::BadHeader(
                    "backing file name is outside the first cluster or longer than 1023 bytes"
                        .into(),
                ));
            }
            let name = std::str::from_utf8(&buf[start..start + len])
                .map_err(|_| FormatError::BadHeader("backing file name is not UTF-8".into()))?;
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    /// Byte offset in cluster 0 of extension `kind`'s data, if present (`buf` as for `decode`).
    pub fn extension_offset(buf: &[u8], kind: u32) -> Option<usize> {
        let h = Header::decode(buf).ok()?;
        let limit = buf.len().min(h.cluster_size() as usize);
        let mut off = h.header_length as usize;
        while off + 8 <= limit {
            let (k, len) = (be32(buf, off), be32(buf, off + 4) as usize);
            if k == EXT_END {
                return None;
            }
            if k == kind {
                return Some(off + 8);
            }
            off += 8 + ((len + 7) & !7);
        }
        None
    }

    /// The data of extension `kind`, if present.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replace (or add, or with None remove) extension `kind`.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        self.extensions.retain(|e| e.kind != kind);
        if let Some(data) = data {
            self.extensions.push(HeaderExtension { kind, data });
        }
    }

    /// The backing format named by the backing-format extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT).map(|d| {
            String::from_utf8_lossy(d)
                .trim_end_matches('\0')
                .to_string()
        })
    }

    /// Encode into a buffer of exactly one cluster. The backing file name is placed after the
    /// extensions; `backing_file_offset`/`backing_file_size` are computed here.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let hl = if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            self.header_length.max(V3_HEADER_LEN) as usize
        };
        let mut off = hl;
        let mut ext = Vec::new();
        for e in &self.extensions {
            ext.extend_from_slice(&e.kind.to_be_bytes());
            ext.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            ext.extend_from_slice(&e.data);
            ext.resize((ext.len() + 7) & !7, 0);
        }
        ext.extend_from_slice(&[0u8; 8]); // end marker
        let name = self.backing_file.as_deref().unwrap_or("").as_bytes();
        if name.len() > 1023 {
            return Err(FormatError::BadHeader(
                "backing file name longer than 1023".into(),
            ));
        }
        if hl + ext.len() + name.len() > cs {
            return Err(FormatError::BadHeader(
                "header, extensions and backing name do not fit in the first cluster".into(),
            ));
        }
        b[off..off + ext.len()].copy_from_slice(&ext);
        off += ext.len();
        let (bfo, bfs) = if name.is_empty() {
            (0u64, 0u32)
        } else {
            b[off..off + name.len()].copy_from_slice(name);
            (off as u64, name.len() as u32)
        };
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&bfo.to_be_bytes());
        b[16..20].copy_from_slice(&bfs.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&(hl as u32).to_be_bytes());
            if hl > 104 {
                b[104] = self.compression_type;
            }
        }
        Ok(b)
    }

    /// The feature name table QEMU writes, so `qemu-img info` names every bit.
    pub fn feature_name_table() -> Vec<u8> {
        let names: [(u8, u8, &str); 8] = [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ];
        let mut v = Vec::with_capacity(names.len() * 48);
        for (t, bit, name) in names {
            let mut e = [0u8; 48];
            e[0] = t;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            v.extend_from_slice(&e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 8 << 30,
            crypt_method: 0,
            l1_size: 16,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: COMPAT_LAZY_REFCOUNTS,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: OUR_HEADER_LEN,
            compression_type: 0,
            extensions: vec![
                HeaderExtension {
                    kind: EXT_BACKING_FORMAT,
                    data: b"raw".to_vec(),
                },
                HeaderExtension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3, 4, 5],
                },
            ],
            backing_file: Some("base.img".into()),
        }
    }

    #[test]
    fn roundtrip() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(b.len(), 65536);
        let mut d = Header::decode(&b).unwrap();
        assert_eq!(d.backing_file.as_deref(), Some("base.img"));
        assert_eq!(d.backing_format().as_deref(), Some("raw"));
        assert_eq!(d.extension(0x1234_5678), Some(&[1u8, 2, 3, 4, 5][..]));
        d.backing_file_offset = 0;
        d.backing_file_size = 0;
        assert_eq!(d, h);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Header::decode(&[0u8; 10]), Err(FormatError::Truncated(10)));
        let mut b = sample().encode().unwrap();
        b[0] = 0;
        assert_eq!(Header::decode(&b), Err(FormatError::BadMagic));
        let mut b = sample().encode().unwrap();
        b[7] = 4;
        assert_eq!(Header::decode(&b), Err(FormatError::BadVersion(4)));
        let mut b = sample().encode().unwrap();
        b[23] = 30;
        assert!(Header::decode(&b).is_err());
        // Extension running past the cluster.
        let mut b = sample().encode().unwrap();
        b[116..120].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(FormatError::BadExtension(_))
        ));
    }

    #[test]
    fn v2_header() {
        let mut h = sample();
        h.version = 2;
        h.extensions.clear();
        h.compatible_features = 0;
        let b = h.encode().unwrap();
        let d = Header::decode(&b).unwrap();
        assert_eq!(d.version, 2);
        assert_eq!(d.refcount_order, 4);
        assert_eq!(d.header_length, V2_HEADER_LEN);
    }
}
