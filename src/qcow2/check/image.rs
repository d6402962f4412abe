//! Loading what the checker needs from an image: header, active L1, refcount table, snapshot
//! table. Every read is bounded by the file size and by QEMU's own limits, so a hostile header
//! can neither make us allocate gigabytes nor panic.

use super::report::CheckError;
use crate::qcow2::format::header::{
    AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_CRYPTO, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2, INCOMPAT_KNOWN,
};
use crate::qcow2::format::{decode_table, snapshot, Header, Snapshot};
use crate::storage::Storage;

/// QEMU's limit on an L1 table (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limits on the snapshot table.
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOTS_BYTES: u64 = 64 << 20;
/// QEMU's limits on the bitmap directory.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIR_BYTES: u64 = 64 << 20;

/// Reserved bits of a refcount table entry; the rest is the block offset.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
pub const REFT_OFFSET_MASK: u64 = !REFT_RESERVED_MASK;

/// Where the bitmap directory is (only when the autoclear bitmaps bit is set).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BitmapDir {
    pub nb_bitmaps: u32,
    pub size: u64,
    pub offset: u64,
}

/// The image as the checker sees it.
pub(crate) struct Image {
    pub header: Header,
    pub cb: u32,
    pub cs: u64,
    pub file_len: u64,
    /// Host clusters up to the file end (rounded up).
    pub nb_clusters: u64,
    /// Active L1 entries that lie inside the file; the rest of `header.l1_size` reads as zero.
    pub l1: Vec<u64>,
    /// Refcount table entries inside the file; the table has `reftable_entries` in all.
    pub reftable: Vec<u64>,
    pub reftable_entries: u64,
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table.
    pub snapshots_size: u64,
    pub bitmaps: Option<BitmapDir>,
    /// Offset and length of the LUKS header, for encrypted images.
    pub crypto: Option<(u64, u64)>,
}

fn invalid(msg: impl Into<String>) -> CheckError {
    CheckError::Invalid(msg.into())
}

/// Read `entries` big-endian u64s at `offset`, but only the part inside the file (the rest
/// reads as zero anyway, and need not be allocated).
pub(crate) fn read_table(
    st: &dyn Storage,
    offset: u64,
    entries: u64,
    file_len: u64,
) -> Result<Vec<u64>, CheckError> {
    let in_file = file_len.saturating_sub(offset).div_ceil(8).min(entries);
    // Read in pieces: a 32 MiB L1 table is not held twice (as bytes and as entries).
    const PIECE: u64 = 1 << 17; // entries (1 MiB)
    let mut out = Vec::with_capacity(in_file as usize);
    let mut buf = vec![0u8; (PIECE.min(in_file) * 8) as usize];
    let mut done = 0u64;
    while done < in_file {
        let n = PIECE.min(in_file - done);
        let b = &mut buf[..(n * 8) as usize];
        st.read_at(b, offset + done * 8)?;
        out.extend(decode_table(b));
        done += n;
    }
    Ok(out)
}

fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Image {
    /// Read and validate the header and the tables it points at. Errors are the ones QEMU gives
    /// when it refuses to open an image for checking.
    pub fn load(st: &dyn Storage) -> Result<Image, CheckError> {
        let file_len = st.len()?;
        let mut probe = vec![0u8; file_len.min(4096) as usize];
        st.read_at(&mut probe, 0)?;
        let cb = Header::probe_cluster_bits(&probe)?;
        let cs = 1u64 << cb;
        let mut first = vec![0u8; file_len.min(cs) as usize];
        st.read_at(&mut first, 0)?;
        let h = Header::decode(&first)?;

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(CheckError::Unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(CheckError::Unsupported("external data file".into()));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(CheckError::Unsupported("extended L2 entries".into()));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 && h.compression_type > 1 {
            return Err(CheckError::Unsupported(format!(
                "compression type {}",
                h.compression_type
            )));
        }

        // Active L1 table.
        if h.l1_size as u64 > MAX_L1_BYTES / 8 {
            return Err(invalid(format!(
                "Active L1 table too large ({} entries)",
                h.l1_size
            )));
        }
        if h.l1_table_offset & (cs - 1) != 0 {
            return Err(invalid(format!(
                "Active L1 table offset invalid ({:#x})",
                h.l1_table_offset
            )));
        }
        let l2_entries = cs / 8;
        let needed_l1 = h.size.div_ceil(cs).div_ceil(l2_entries);
        if (h.l1_size as u64) < needed_l1 {
            return Err(invalid(format!(
                "L1 table is too small ({} entries for a {}-byte disk)",
                h.l1_size, h.size
            )));
        }

        // Refcount table.
        if h.refcount_table_clusters as u64 > MAX_REFTABLE_BYTES >> cb {
            return Err(invalid(format!(
                "Reference count table too large ({} clusters)",
                h.refcount_table_clusters
            )));
        }
        if h.refcount_table_offset & (cs - 1) != 0 {
            return Err(invalid(format!(
                "Reference count table offset invalid ({:#x})",
                h.refcount_table_offset
            )));
        }
        let reftable_entries = (h.refcount_table_clusters as u64) << (cb - 3);

        // Snapshot table.
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(format!("Too many snapshots ({})", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 && h.snapshots_offset & (cs - 1) != 0 {
            return Err(invalid(format!(
                "Snapshot table offset invalid ({:#x})",
                h.snapshots_offset
            )));
        }

        let nb_clusters = file_len.div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            return Err(invalid(format!(
                "image file has {nb_clusters} clusters, more than can be checked"
            )));
        }

        let l1 = read_table(st, h.l1_table_offset, h.l1_size as u64, file_len)?;
        let reftable = read_table(st, h.refcount_table_offset, reftable_entries, file_len)?;

        let (snapshots, snapshots_size) = if h.nb_snapshots == 0 {
            (Vec::new(), 0)
        } else {
            let avail = file_len
                .saturating_sub(h.snapshots_offset)
                .min(MAX_SNAPSHOTS_BYTES);
            let mut buf = vec![0u8; avail as usize];
            st.read_at(&mut buf, h.snapshots_offset)?;
            let (s, len) = snapshot::decode_table(&buf, h.nb_snapshots)?;
            (s, len as u64)
        };

        let bitmaps = if h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            match h.extension(EXT_BITMAPS) {
                Some(d) if d.len() >= 24 => {
                    let nb_bitmaps = be32(d, 0);
                    let size = be64(d, 8);
                    let offset = be64(d, 16);
                    if nb_bitmaps > MAX_BITMAPS || size > MAX_BITMAP_DIR_BYTES {
                        return Err(invalid("bitmap directory too large"));
                    }
                    (nb_bitmaps > 0).then_some(BitmapDir {
                        nb_bitmaps,
                        size,
                        offset,
                    })
                }
                Some(_) => return Err(invalid("bitmaps extension is too short")),
                None => None,
            }
        } else {
            None
        };

        let crypto = match h.extension(EXT_CRYPTO) {
            Some(d) if d.len() >= 16 => Some((be64(d, 0), be64(d, 8))),
            _ => None,
        };

        Ok(Image {
            header: h,
            cb,
            cs,
            file_len,
            nb_clusters,
            l1,
            reftable,
            reftable_entries,
            snapshots,
            snapshots_size,
            bitmaps,
            crypto,
        })
    }

    /// log2 of the number of entries in one refcount block.
    pub fn refblock_bits(&self) -> u32 {
        self.cb + 3 - self.header.refcount_order
    }
}

/// Clusters that hold metadata other than L2 tables, so that repair never rewrites an "L2
/// table" that is really something else (a corrupt L1 entry can point anywhere).
pub(crate) struct MetaGuard {
    ranges: Vec<(u64, u64)>,
    refblocks: std::collections::HashSet<u64>,
}

impl MetaGuard {
    /// True when `cluster` holds the header, the refcount table or a block, the snapshot table
    /// or (if asked for) an L1 table.
    pub fn hits(&self, cluster: u64) -> bool {
        self.refblocks.contains(&cluster)
            || self.ranges.iter().any(|&(s, e)| (s..e).contains(&cluster))
    }

    /// True when `cluster` is a refcount block.
    pub fn is_refblock(&self, cluster: u64) -> bool {
        self.refblocks.contains(&cluster)
    }
}

impl Image {
    pub fn meta_guard(&self, with_l1: bool) -> MetaGuard {
        let cb = self.cb;
        let range = |off: u64, len: u64| (off >> cb, off.saturating_add(len).div_ceil(self.cs));
        let mut ranges = vec![
            (0, 1),
            range(self.header.refcount_table_offset, self.reftable_entries * 8),
            range(self.header.snapshots_offset, self.snapshots_size),
        ];
        if with_l1 {
            ranges.push(range(
                self.header.l1_table_offset,
                self.header.l1_size as u64 * 8,
            ));
            for s in &self.snapshots {
                ranges.push(range(s.l1_table_offset, s.l1_size as u64 * 8));
            }
        }
        let refblocks = self
            .reftable
            .iter()
            .map(|e| (e & REFT_OFFSET_MASK) >> cb)
            .filter(|&c| c != 0)
            .collect();
        MetaGuard { ranges, refblocks }
    }
}
