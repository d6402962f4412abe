//! Pure big-endian codecs for the persistent dedup index: the `DDUP` header extension, the index
//! clusters, and the seal. No file handles; see docs/dedup.md for the reasoning.
//!
//! The index is direct-mapped by cluster number (the engine uses guest clusters): index cluster
//! `k` holds the SHA-256 of clusters `k * records_per_cluster ..` in order, so a record's position
//! is its cluster number and the engine can update one record in place when that cluster's
//! content changes, without knowing anything else. An all-zero record means "no hash" (the all-zero cluster is never indexed: it
//! becomes a zero cluster).

use sha2::{Digest, Sha256};

/// Header extension type of the dedup extension: ASCII "DDUP".
pub const EXT_DEDUP: u32 = 0x4444_5550;
/// Autoclear feature bit meaning "the dedup index matches the image". QEMU clears unknown autoclear
/// bits whenever it opens the image writable directly.
pub const AUTOCLEAR_DEDUP: u64 = 1 << 63;
/// Version of the extension and index cluster format.
pub const DEDUP_VERSION: u32 = 1;
/// Length of the extension data.
pub const EXT_LEN: usize = 128;
/// Magic at the start of every index cluster: ASCII "DDIX".
pub const INDEX_MAGIC: u32 = 0x4444_4958;
/// Bytes before the records in an index cluster.
pub const INDEX_HEADER_LEN: usize = 32;
/// Bytes per record.
pub const RECORD_LEN: usize = 32;
/// The record of a cluster written in background mode and not yet deduplicated: all ones. (A
/// SHA-256 of all ones is a 2^-256 event; such a cluster would only be left unshared.)
pub const PENDING: [u8; 32] = [0xff; 32];

/// Errors of the dedup codecs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistError {
    #[error("dedup extension truncated ({0} bytes)")]
    Truncated(usize),
    #[error("dedup format version {0} is not supported")]
    BadVersion(u32),
    #[error("dedup checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("invalid dedup data: {0}")]
    Invalid(String),
}

/// Dedup mode recorded in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupMode {
    Off,
    Inline,
    Background,
}

impl DedupMode {
    /// The mode's value in the extension's flags (also the engine's atomic mode).
    pub fn bits(self) -> u32 {
        match self {
            DedupMode::Off => 0,
            DedupMode::Inline => 1,
            DedupMode::Background => 2,
        }
    }
    /// The mode of flag bits `b`.
    pub fn from_bits(b: u32) -> Result<Self, PersistError> {
        match b {
            0 => Ok(DedupMode::Off),
            1 => Ok(DedupMode::Inline),
            2 => Ok(DedupMode::Background),
            x => Err(PersistError::Invalid(format!("unknown dedup mode {x}"))),
        }
    }
}

const FLAG_MODE_MASK: u32 = 0x3;
const FLAG_PAUSED: u32 = 1 << 2;
const FLAGS_KNOWN: u32 = FLAG_MODE_MASK | FLAG_PAUSED;

/// Counters persisted at clean close (for `info` on a closed image).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DedupCounters {
    pub deduplicated: u64,
    pub written_unique: u64,
    pub zero_detected: u64,
    pub bytes_saved: u64,
    pub partial_reads: u64,
    pub cap_hits: u64,
    pub stale_rejected: u64,
}

impl DedupCounters {
    fn as_array(&self) -> [u64; 7] {
        [
            self.deduplicated,
            self.written_unique,
            self.zero_detected,
            self.bytes_saved,
            self.partial_reads,
            self.cap_hits,
            self.stale_rejected,
        ]
    }
    fn from_array(a: [u64; 7]) -> Self {
        DedupCounters {
            deduplicated: a[0],
            written_unique: a[1],
            zero_detected: a[2],
            bytes_saved: a[3],
            partial_reads: a[4],
            cap_hits: a[5],
            stale_rejected: a[6],
        }
    }
}

/// The `DDUP` header extension.
///
/// Layout (big-endian, 128 bytes): 0 version u32, 4 flags u32 (bits 0-1 mode, bit 2 paused),
/// 8 cluster_bits u32, 12 share_cap u32, 16 index_offset u64 (0: no index), 24 index_clusters u64,
/// 32 generation u64, 40 seal u64, 48..104 seven u64 counters, 104 rebuild_from u64 (guest
/// cluster + 1; 0: none), 112..124 reserved (zero), 124 crc32c of bytes 0..124.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupExtension {
    pub mode: DedupMode,
    pub paused: bool,
    pub cluster_bits: u32,
    /// Largest refcount a dedup link may produce.
    pub share_cap: u32,
    /// Host offset of the first index cluster (contiguous area), 0 when there is none.
    pub index_offset: u64,
    pub index_clusters: u64,
    /// Bumped each time the index is written anew; stored in every index cluster.
    pub generation: u64,
    /// See [`seal`].
    pub seal: u64,
    pub counters: DedupCounters,
    /// A rebuild of the index stopped by a clean close: the records of guest clusters from
    /// here on may be missing (not wrong), and the next open hashes them again in the
    /// background. (Written where version 1 had an eighth, unused counter: an older binary
    /// keeps it and loads the index as complete, which only loses dedup opportunities.)
    pub rebuild_from: Option<u64>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

fn check_crc(stored: u32, bytes: &[u8]) -> Result<(), PersistError> {
    let computed = crc32c::crc32c(bytes);
    if stored != computed {
        return Err(PersistError::BadChecksum { stored, computed });
    }
    Ok(())
}

impl DedupExtension {
    /// A fresh extension: `mode`, no index area, counters at zero.
    pub fn new(mode: DedupMode, cluster_bits: u32, share_cap: u32) -> Self {
        DedupExtension {
            mode,
            paused: false,
            cluster_bits,
            share_cap,
            index_offset: 0,
            index_clusters: 0,
            generation: 0,
            seal: 0,
            counters: DedupCounters::default(),
            rebuild_from: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; EXT_LEN];
        let mut flags = self.mode.bits();
        if self.paused {
            flags |= FLAG_PAUSED;
        }
        b[0..4].copy_from_slice(&DEDUP_VERSION.to_be_bytes());
        b[4..8].copy_from_slice(&flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[12..16].copy_from_slice(&self.share_cap.to_be_bytes());
        b[16..24].copy_from_slice(&self.index_offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.index_clusters.to_be_bytes());
        b[32..40].copy_from_slice(&self.generation.to_be_bytes());
        b[40..48].copy_from_slice(&self.seal.to_be_bytes());
        for (i, c) in self.counters.as_array().iter().enumerate() {
            b[48 + i * 8..56 + i * 8].copy_from_slice(&c.to_be_bytes());
        }
        let from = self.rebuild_from.map_or(0, |g| g.saturating_add(1));
        b[104..112].copy_from_slice(&from.to_be_bytes());
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes the extension data. Longer data than [`EXT_LEN`] (padding) is ignored.
    pub fn decode(b: &[u8]) -> Result<Self, PersistError> {
        if b.len() < EXT_LEN {
            return Err(PersistError::Truncated(b.len()));
        }
        let version = be32(b, 0);
        if version != DEDUP_VERSION {
            return Err(PersistError::BadVersion(version));
        }
        check_crc(be32(b, 124), &b[..124])?;
        let flags = be32(b, 4);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(PersistError::Invalid(format!("unknown flags {flags:#x}")));
        }
        let cluster_bits = be32(b, 8);
        if !(9..=21).contains(&cluster_bits) {
            return Err(PersistError::Invalid(format!(
                "cluster_bits {cluster_bits}"
            )));
        }
        let index_offset = be64(b, 16);
        let index_clusters = be64(b, 24);
        if index_offset & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(PersistError::Invalid(format!(
                "index offset {index_offset:#x} not cluster aligned"
            )));
        }
        if (index_offset == 0) != (index_clusters == 0) {
            return Err(PersistError::Invalid(
                "index offset and cluster count disagree".into(),
            ));
        }
        let mut counters = [0u64; 7];
        for (i, c) in counters.iter_mut().enumerate() {
            *c = be64(b, 48 + i * 8);
        }
        Ok(DedupExtension {
            mode: DedupMode::from_bits(flags & FLAG_MODE_MASK)?,
            paused: flags & FLAG_PAUSED != 0,
            cluster_bits,
            share_cap: be32(b, 12),
            index_offset,
            index_clusters,
            generation: be64(b, 32),
            seal: be64(b, 40),
            counters: DedupCounters::from_array(counters),
            rebuild_from: be64(b, 104).checked_sub(1),
        })
    }
}

/// What the seal covers: the fields QEMU changes when it allocates, frees, snapshots or resizes,
/// plus the file length and our generation. Taken at clean close, after the index is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealInput {
    pub generation: u64,
    pub file_len: u64,
    pub size: u64,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub snapshots_offset: u64,
    pub nb_snapshots: u32,
}

impl SealInput {
    /// The seal input of an image with header `h` and file length `file_len`.
    pub fn of(h: &crate::qcow2::format::Header, file_len: u64, generation: u64) -> Self {
        SealInput {
            generation,
            file_len,
            size: h.size,
            l1_table_offset: h.l1_table_offset,
            l1_size: h.l1_size,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            snapshots_offset: h.snapshots_offset,
            nb_snapshots: h.nb_snapshots,
        }
    }
}

/// The seal: the first 8 bytes of SHA-256 over the [`SealInput`] fields, big-endian.
pub fn seal(s: &SealInput) -> u64 {
    let mut h = Sha256::new();
    h.update(b"DDUP-seal-v1");
    for v in [
        s.generation,
        s.file_len,
        s.size,
        s.l1_table_offset,
        u64::from(s.l1_size),
        s.refcount_table_offset,
        u64::from(s.refcount_table_clusters),
        s.snapshots_offset,
        u64::from(s.nb_snapshots),
    ] {
        h.update(v.to_be_bytes());
    }
    let d = h.finalize();
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    u64::from_be_bytes(a)
}

/// Whether to load the persistent index or rebuild it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Load it: QEMU has not opened the image writable since we sealed it.
    Load,
    /// Rebuild: the reason says why.
    Rebuild(&'static str),
}

/// Decides whether the persistent index may be loaded, from the autoclear bits of the header, the
/// extension, and the seal the engine computes from the image as it is now. This never decides
/// correctness (every hint is verified before a link), only whether the index is worth using.
pub fn trust(autoclear: u64, ext: &DedupExtension, now: &SealInput) -> Trust {
    if ext.index_offset == 0 {
        Trust::Rebuild("no index")
    } else if autoclear & AUTOCLEAR_DEDUP == 0 {
        Trust::Rebuild("autoclear bit clear (opened writable elsewhere, or not closed cleanly)")
    } else if now.generation != ext.generation || seal(now) != ext.seal {
        Trust::Rebuild("seal mismatch (image changed since the index was written)")
    } else {
        Trust::Load
    }
}

/// Cluster sizes qcow2 allows (512 B to 2 MiB). Values outside are clamped so that no arithmetic
/// here can overflow or divide by zero; the engine has validated the header long before.
fn cluster_size(cluster_bits: u32) -> usize {
    1usize << cluster_bits.clamp(9, 21)
}

/// Records per index cluster for a cluster size.
pub fn records_per_cluster(cluster_bits: u32) -> u64 {
    ((cluster_size(cluster_bits) - INDEX_HEADER_LEN) / RECORD_LEN) as u64
}

/// Index clusters needed to cover `clusters` clusters.
pub fn index_clusters_for(cluster_bits: u32, clusters: u64) -> u64 {
    clusters.div_ceil(records_per_cluster(cluster_bits))
}

/// One index cluster.
///
/// Layout (big-endian): 0 magic "DDIX", 4 crc32c of bytes 8..end, 8 generation u64, 16 first
/// cluster u64, 24 number of non-zero records u32, 28 reserved u32, 32.. records of 32 bytes (the
/// SHA-256 of cluster `first + i`, or zeros).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexCluster {
    pub generation: u64,
    pub first: u64,
    pub records: Vec<[u8; 32]>,
}

impl IndexCluster {
    /// An empty index cluster number `k`.
    pub fn empty(cluster_bits: u32, generation: u64, k: u64) -> Self {
        let rpc = records_per_cluster(cluster_bits);
        IndexCluster {
            generation,
            first: k * rpc,
            records: vec![[0u8; 32]; rpc as usize],
        }
    }

    /// The hash recorded for record `i`, if any.
    pub fn get(&self, i: usize) -> Option<&[u8; 32]> {
        self.records.get(i).filter(|r| **r != [0u8; 32])
    }

    /// Sets (Some) or clears (None) record `i`. Out of range is ignored and reported as false.
    pub fn set(&mut self, i: usize, hash: Option<&[u8; 32]>) -> bool {
        match self.records.get_mut(i) {
            Some(r) => {
                *r = hash.copied().unwrap_or([0u8; 32]);
                true
            }
            None => false,
        }
    }

    /// Encodes into a buffer of exactly one cluster.
    pub fn encode(&self, cluster_bits: u32) -> Vec<u8> {
        let size = cluster_size(cluster_bits);
        let mut b = vec![0u8; size];
        b[0..4].copy_from_slice(&INDEX_MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&self.generation.to_be_bytes());
        b[16..24].copy_from_slice(&self.first.to_be_bytes());
        let used = self.records.iter().filter(|r| **r != [0u8; 32]).count() as u32;
        b[24..28].copy_from_slice(&used.to_be_bytes());
        for (i, r) in self
            .records
            .iter()
            .take(records_per_cluster(cluster_bits) as usize)
            .enumerate()
        {
            let o = INDEX_HEADER_LEN + i * RECORD_LEN;
            b[o..o + RECORD_LEN].copy_from_slice(r);
        }
        let crc = crc32c::crc32c(&b[8..]);
        b[4..8].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes index cluster number `k`, checking magic, checksum, generation and position.
    pub fn decode(
        b: &[u8],
        cluster_bits: u32,
        generation: u64,
        k: u64,
    ) -> Result<Self, PersistError> {
        let size = cluster_size(cluster_bits);
        if b.len() < size {
            return Err(PersistError::Truncated(b.len()));
        }
        let b = &b[..size];
        if be32(b, 0) != INDEX_MAGIC {
            return Err(PersistError::Invalid("index cluster magic".into()));
        }
        check_crc(be32(b, 4), &b[8..])?;
        let g = be64(b, 8);
        if g != generation {
            return Err(PersistError::Invalid(format!(
                "index cluster generation {g}, expected {generation}"
            )));
        }
        let rpc = records_per_cluster(cluster_bits);
        let first = be64(b, 16);
        if Some(first) != k.checked_mul(rpc) {
            return Err(PersistError::Invalid(format!(
                "index cluster {k} covers cluster {first}"
            )));
        }
        let records: Vec<[u8; 32]> = b[INDEX_HEADER_LEN..]
            .chunks_exact(RECORD_LEN)
            .take(rpc as usize)
            .map(|c| {
                let mut r = [0u8; 32];
                r.copy_from_slice(c);
                r
            })
            .collect();
        let used = records.iter().filter(|r| **r != [0u8; 32]).count() as u32;
        if used != be32(b, 24) {
            return Err(PersistError::Invalid("index cluster record count".into()));
        }
        Ok(IndexCluster {
            generation,
            first,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct 32-byte hash for `n` (the codecs do not care what it hashes).
    fn h(n: u64) -> [u8; 32] {
        let mut x = [0x5au8; 32];
        x[..8].copy_from_slice(&n.to_le_bytes());
        x
    }

    fn ext() -> DedupExtension {
        DedupExtension {
            mode: DedupMode::Inline,
            paused: true,
            cluster_bits: 16,
            share_cap: 32767,
            index_offset: 0x50000,
            index_clusters: 3,
            generation: 42,
            seal: 0xdead_beef_0123_4567,
            counters: DedupCounters {
                deduplicated: 1,
                written_unique: 2,
                zero_detected: 3,
                bytes_saved: 4,
                partial_reads: 5,
                cap_hits: 6,
                stale_rejected: 7,
            },
            rebuild_from: Some(0),
        }
    }

    #[test]
    fn extension_round_trip_and_errors() {
        let e = ext();
        let b = e.encode();
        assert_eq!(b.len(), EXT_LEN);
        assert_eq!(DedupExtension::decode(&b), Ok(e.clone()));
        // Padding after the data is fine.
        let mut p = b.clone();
        p.extend_from_slice(&[0; 8]);
        assert_eq!(DedupExtension::decode(&p), Ok(e.clone()));
        for m in [DedupMode::Off, DedupMode::Background] {
            let e2 = DedupExtension {
                mode: m,
                paused: false,
                ..e.clone()
            };
            assert_eq!(DedupExtension::decode(&e2.encode()), Ok(e2));
        }
        assert_eq!(
            DedupExtension::decode(&b[..100]),
            Err(PersistError::Truncated(100))
        );
        let mut c = b.clone();
        c[60] ^= 1;
        assert!(matches!(
            DedupExtension::decode(&c),
            Err(PersistError::BadChecksum { .. })
        ));
        let mut v = b.clone();
        v[3] = 2;
        assert_eq!(DedupExtension::decode(&v), Err(PersistError::BadVersion(2)));
        let unaligned = DedupExtension {
            index_offset: 0x50200,
            ..e.clone()
        };
        assert!(matches!(
            DedupExtension::decode(&unaligned.encode()),
            Err(PersistError::Invalid(_))
        ));
        let bad_mode = DedupExtension { ..e.clone() }.encode();
        let mut bm = bad_mode.clone();
        bm[7] = 3; // mode 3
        let crc = crc32c::crc32c(&bm[..124]);
        bm[124..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            DedupExtension::decode(&bm),
            Err(PersistError::Invalid(_))
        ));
    }
    #[test]
    fn seal_and_trust() {
        let s = SealInput {
            generation: 42,
            file_len: 1 << 30,
            size: 1 << 34,
            l1_table_offset: 0x30000,
            l1_size: 32,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            snapshots_offset: 0,
            nb_snapshots: 0,
        };
        let e = DedupExtension {
            seal: seal(&s),
            ..ext()
        };
        assert_eq!(trust(AUTOCLEAR_DEDUP, &e, &s), Trust::Load);
        assert!(matches!(trust(0, &e, &s), Trust::Rebuild(_)));
        for changed in [
            SealInput {
                file_len: s.file_len + 65536,
                ..s
            },
            SealInput {
                nb_snapshots: 1,
                ..s
            },
            SealInput {
                l1_table_offset: 0x40000,
                ..s
            },
            SealInput {
                refcount_table_clusters: 2,
                ..s
            },
            SealInput { size: 1, ..s },
            SealInput {
                generation: 43,
                ..s
            },
        ] {
            assert!(matches!(
                trust(AUTOCLEAR_DEDUP, &e, &changed),
                Trust::Rebuild(_)
            ));
        }
        let none = DedupExtension {
            index_offset: 0,
            index_clusters: 0,
            ..e
        };
        assert!(matches!(
            trust(AUTOCLEAR_DEDUP, &none, &s),
            Trust::Rebuild(_)
        ));
    }
    #[test]
    fn index_cluster_round_trip_and_errors() {
        for bits in [9u32, 12, 16, 21] {
            let rpc = records_per_cluster(bits);
            let mut ic = IndexCluster::empty(bits, 5, 2);
            assert_eq!(ic.first, 2 * rpc);
            assert!(ic.set(0, Some(&h(1))));
            assert!(ic.set(rpc as usize - 1, Some(&h(2))));
            assert!(!ic.set(rpc as usize, Some(&h(3))));
            let b = ic.encode(bits);
            assert_eq!(b.len(), 1 << bits);
            let d = IndexCluster::decode(&b, bits, 5, 2).unwrap();
            assert_eq!(d, ic);
            assert_eq!(d.get(0), Some(&h(1)));
            assert_eq!(d.get(1), None);
            // Corrupt a record byte: checksum.
            let mut c = b.clone();
            c[INDEX_HEADER_LEN + 5] ^= 0x80;
            assert!(matches!(
                IndexCluster::decode(&c, bits, 5, 2),
                Err(PersistError::BadChecksum { .. })
            ));
            // Truncated.
            assert!(matches!(
                IndexCluster::decode(&b[..b.len() - 1], bits, 5, 2),
                Err(PersistError::Truncated(_))
            ));
            // Wrong generation, wrong position, bad magic.
            assert!(IndexCluster::decode(&b, bits, 6, 2).is_err());
            assert!(IndexCluster::decode(&b, bits, 5, 3).is_err());
            let mut m = b.clone();
            m[0] = 0;
            assert!(IndexCluster::decode(&m, bits, 5, 2).is_err());
            // Guest data that happens to sit where the index was: rejected.
            assert!(IndexCluster::decode(&vec![0u8; 1 << bits], bits, 5, 2).is_err());
        }
        assert_eq!(index_clusters_for(16, 2047), 1);
        assert_eq!(index_clusters_for(16, 2048), 2);
    }
}
