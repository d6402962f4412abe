//! Image information in the shape of `qemu-img info --output json` (the qcow2 fields).

use crate::qcow2::check::image::Image;
use crate::qcow2::check::CheckError;
use crate::qcow2::format::header::{
    COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use crate::storage::Storage;
use serde::Serialize;

/// Why `info` failed.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Image(#[from] CheckError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// qcow2-specific data (`format-specific.data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    pub compression_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// `format-specific`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Qcow2Specific,
}

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    pub vm_clock_nsec: u64,
    pub name: String,
    pub date_sec: u64,
    pub date_nsec: u64,
    pub vm_clock_sec: u64,
    pub id: String,
    pub vm_state_size: u64,
}

/// What `info` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    pub virtual_size: u64,
    pub filename: String,
    pub cluster_size: u64,
    pub format: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    pub format_specific: FormatSpecific,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    pub dirty_flag: bool,
    /// Deduplication as recorded in the image (our header extension), when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupRecorded>,
}

/// The dedup setting and the counters of all sessions so far, from the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DedupRecorded {
    pub mode: String,
    pub clusters_deduplicated: u64,
    pub clusters_written_unique: u64,
    pub zero_clusters_detected: u64,
    pub bytes_saved: u64,
    pub partial_cluster_reads: u64,
    pub refcount_cap_hits: u64,
    pub stale_hints_rejected: u64,
}

fn dedup_recorded(h: &crate::qcow2::format::Header) -> Option<DedupRecorded> {
    use crate::qcow2::format::dedup::{DedupExtension, DedupMode, EXT_DEDUP};
    let e = DedupExtension::decode(h.extension(EXT_DEDUP)?).ok()?;
    let c = e.counters;
    Some(DedupRecorded {
        mode: match e.mode {
            DedupMode::Off => "off",
            DedupMode::Inline => "inline",
            DedupMode::Background => "background",
        }
        .to_string(),
        clusters_deduplicated: c.deduplicated,
        clusters_written_unique: c.written_unique,
        zero_clusters_detected: c.zero_detected,
        bytes_saved: c.bytes_saved,
        partial_cluster_reads: c.partial_reads,
        refcount_cap_hits: c.cap_hits,
        stale_hints_rejected: c.stale_rejected,
    })
}

fn be(b: &[u8], o: usize, n: usize) -> u64 {
    b[o..o + n].iter().fold(0u64, |a, &x| (a << 8) | x as u64)
}

/// Read the fields of each snapshot entry that `decode_table` does not keep. `buf` has already
/// decoded as `count` entries, so the walk stays inside it.
fn snapshot_details(buf: &[u8], count: usize) -> Vec<(u64, u64, Option<u64>)> {
    let mut out = Vec::with_capacity(count);
    let mut off = 0usize;
    for _ in 0..count {
        if off + 40 > buf.len() {
            break;
        }
        let id_len = be(buf, off + 12, 2) as usize;
        let name_len = be(buf, off + 14, 2) as usize;
        let date_nsec = be(buf, off + 20, 4);
        let vm_clock = be(buf, off + 24, 8);
        let extra = be(buf, off + 36, 4) as usize;
        let icount = if extra >= 24 && off + 40 + 24 <= buf.len() {
            Some(be(buf, off + 40 + 16, 8)).filter(|&v| v != u64::MAX)
        } else {
            None
        };
        out.push((date_nsec, vm_clock, icount));
        off = (off + 40 + extra + id_len + name_len + 7) & !7;
    }
    out
}

/// Describe the image on `st`. `filename` and `actual_size` are the caller's to fill in.
pub fn image_info(st: &dyn Storage) -> Result<ImageInfo, InfoError> {
    let img = Image::load(st)?;
    let h = &img.header;
    let v3 = h.version >= 3;
    let data = Qcow2Specific {
        compat: if v3 { "1.1" } else { "0.10" }.to_string(),
        compression_type: if h.compression_type == COMPRESSION_ZSTD {
            "zstd"
        } else {
            "zlib"
        }
        .to_string(),
        lazy_refcounts: v3.then_some(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
        refcount_bits: 1 << h.refcount_order,
        corrupt: v3.then_some(h.incompatible_features & INCOMPAT_CORRUPT != 0),
        extended_l2: v3.then_some(h.incompatible_features & INCOMPAT_EXTL2 != 0),
    };
    let mut snapshots = Vec::new();
    if !img.snapshots.is_empty() {
        let mut buf = vec![0u8; img.snapshots_size as usize];
        st.read_at(&mut buf, h.snapshots_offset)?;
        let details = snapshot_details(&buf, img.snapshots.len());
        for (i, s) in img.snapshots.iter().enumerate() {
            let (date_nsec, vm_clock, icount) = details.get(i).copied().unwrap_or((0, 0, None));
            snapshots.push(SnapshotInfo {
                icount,
                vm_clock_nsec: vm_clock % 1_000_000_000,
                name: s.name.clone(),
                date_sec: s.date_sec as u64,
                date_nsec,
                vm_clock_sec: vm_clock / 1_000_000_000,
                id: s.id.clone(),
                vm_state_size: s.vm_state_size,
            });
        }
    }
    Ok(ImageInfo {
        snapshots,
        virtual_size: h.size,
        filename: String::new(),
        cluster_size: img.cs,
        format: "qcow2".to_string(),
        actual_size: None,
        format_specific: FormatSpecific {
            kind: "qcow2".to_string(),
            data,
        },
        backing_filename: h.backing_file.clone(),
        backing_filename_format: h.backing_format(),
        dirty_flag: h.incompatible_features & INCOMPAT_DIRTY != 0,
        dedup: dedup_recorded(h),
    })
}
