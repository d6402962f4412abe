//! What one L2 table contributes to the reference count, read and classified once.
//!
//! QEMU's check (and ours) counts an L2 table's references once for every L1 entry that points
//! at it, active or snapshot: a table reached N times adds N to each of its clusters. A hostile
//! L1 table can point hundreds of thousands of entries at one table, so reading and classifying
//! the table again each time costs L1 entries x table entries. An [`L2Memo`] is the table
//! boiled down to what a visit does: the corruptions that do not depend on the counts so far
//! (reserved bits, alignment, regions past the end of the file) and the clusters it increments,
//! in entry order, so that a visit can be replayed exactly (same messages, same order) or, when
//! no count can reach the refcount maximum, applied later in bulk.

use super::classify::{classify, compressed_extent, Kind};
use super::image::Image;
use crate::qcow2::format::entries::{L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COPIED};

/// One entry's effect, in entry order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ev {
    /// An entry with reserved bits set (the whole entry).
    Reserved(u64),
    /// A compressed entry with OFLAG_COPIED (the data offset).
    CompressedCopied(u64),
    /// A data or preallocated zero cluster that is not cluster aligned.
    Unaligned {
        off: u64,
        zero_alloc: bool,
        idx: u32,
    },
    /// One reference to `[off, off + size)`. `data`: a data or preallocated zero cluster (not
    /// compressed). `exceeds`: the region ends a cluster or more past the end of the file, so
    /// the increment is a corruption instead.
    Inc {
        off: u64,
        size: u64,
        idx: u32,
        data: bool,
        exceeds: bool,
    },
}

/// An L2 table as the reference count sees it.
#[derive(Debug, Default)]
pub(crate) struct L2Memo {
    /// Only entries that do something (an all-zero table has none).
    pub events: Vec<Ev>,
    /// The clusters its in-file increments hit, each with how many times.
    pub clusters: Vec<(u64, u64)>,
    /// The largest of those times (0 when it increments nothing).
    pub max_n: u64,
    /// Corruptions reported whatever the counts are.
    pub statics: u64,
    /// Counters of an active table.
    pub allocated: u64,
    pub compressed: u64,
    pub fragmented: u64,
    /// An entry has reserved bits set: this is not an L2 table, repair must not touch it.
    pub not_a_table: bool,
}

/// Does the region `[offset, offset + size)` end a cluster or more past the end of the file?
pub(crate) fn exceeds(img: &Image, offset: u64, size: u64) -> bool {
    size != 0 && offset as u128 + size as u128 >= img.file_len as u128 + img.cs as u128
}

/// The message of a region past the end of the file.
pub(crate) fn exceed_msg(offset: u64, size: u64) -> String {
    format!(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or \
         more: offset {offset:#x} size {size:#x}"
    )
}

impl Ev {
    /// Does this event report a corruption whatever the counts are?
    pub fn is_static(&self) -> bool {
        !matches!(self, Ev::Inc { exceeds: false, .. })
    }

    /// The corruption this event reports whatever the counts are, if any.
    pub fn static_msg(&self) -> Option<String> {
        Some(match *self {
            Ev::Reserved(e) => format!("ERROR found l2 entry with reserved bits set: {e:x}"),
            Ev::CompressedCopied(coff) => format!(
                "ERROR: coffset={coff:#x}: copied flag must never be set for compressed clusters"
            ),
            Ev::Unaligned {
                off,
                zero_alloc: true,
                ..
            } => format!(
                "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry \
                 corrupted."
            ),
            Ev::Unaligned { off, .. } => format!(
                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
            ),
            Ev::Inc {
                off,
                size,
                exceeds: true,
                ..
            } => exceed_msg(off, size),
            Ev::Inc { .. } => return None,
        })
    }
}

impl L2Memo {
    /// Boil down the table `buf` (one cluster, read at `l2_off`) of image `img`.
    pub fn build(buf: &[u8], img: &Image) -> L2Memo {
        let (cs, cb) = (img.cs, img.cb);
        let mut m = L2Memo::default();
        let mut hits: Vec<u64> = Vec::new();
        let mut next_contiguous = 0u64;
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_be_bytes(a);
            let idx = i as u32;
            let kind = classify(e);
            if kind != Kind::Compressed && e & L2E_RESERVED_MASK != 0 {
                m.events.push(Ev::Reserved(e));
                m.not_a_table = true;
            }
            let (off, size, data) = match kind {
                Kind::Compressed => {
                    let (coff, csize) = compressed_extent(e, cb);
                    if e & OFLAG_COPIED != 0 {
                        m.events.push(Ev::CompressedCopied(coff));
                    }
                    m.compressed += 1;
                    m.fragmented += 1;
                    (coff, csize, false)
                }
                Kind::Normal | Kind::ZeroAlloc => {
                    let off = e & L2E_OFFSET_MASK;
                    if off & (cs - 1) != 0 {
                        let zero_alloc = kind == Kind::ZeroAlloc;
                        m.events.push(Ev::Unaligned {
                            off,
                            zero_alloc,
                            idx,
                        });
                    }
                    if next_contiguous != 0 && off != next_contiguous {
                        m.fragmented += 1;
                    }
                    next_contiguous = off.wrapping_add(cs);
                    (off, cs, true)
                }
                Kind::ZeroPlain | Kind::Unallocated => continue,
            };
            m.allocated += 1;
            let ex = exceeds(img, off, size);
            m.events.push(Ev::Inc {
                off,
                size,
                idx,
                data,
                exceeds: ex,
            });
            if !ex && size != 0 {
                hits.extend((off >> cb)..=((off + size - 1) >> cb));
            }
        }
        m.statics = m.events.iter().filter(|e| e.is_static()).count() as u64;
        hits.sort_unstable();
        for c in hits {
            match m.clusters.last_mut() {
                Some((last, n)) if *last == c => *n += 1,
                _ => m.clusters.push((c, 1)),
            }
        }
        m.max_n = m.clusters.iter().map(|&(_, n)| n).max().unwrap_or(0);
        m
    }

    /// Entries held (what the memo's memory is budgeted in).
    pub fn cost(&self) -> usize {
        self.events.len() + self.clusters.len() + 1
    }
}
