//! Counting references: what the refcount of every host cluster should be, computed from the
//! header, the active and snapshot L1/L2 tables, the snapshot table, the refcount table and
//! blocks, the crypto header and (when their autoclear bit is set) the bitmaps. Mirrors QEMU's
//! `calculate_refcounts` and its classification of what is corrupt.

use super::image::{read_table, Image, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use super::refarray::RefArray;
use super::report::{CheckError, EntryFix, Findings, Progress};
use crate::qcow2::format::entries::{
    compressed_fields, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::qcow2::format::refblock::max_refcount;
use crate::storage::Storage;

/// How an L2 entry is classified (QEMU's `qcow2_get_cluster_type` for standard L2 entries).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

pub(crate) fn classify(e: u64) -> Kind {
    if e & OFLAG_COMPRESSED != 0 {
        Kind::Compressed
    } else if e & OFLAG_ZERO != 0 {
        if e & L2E_OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if e & L2E_OFFSET_MASK == 0 {
        Kind::Unallocated
    } else {
        Kind::Normal
    }
}

/// Host byte offset and length of a compressed cluster's data.
pub(crate) fn compressed_extent(e: u64, cb: u32) -> (u64, u64) {
    let (shift, mask) = compressed_fields(cb);
    let off = e & ((1u64 << shift) - 1);
    let sectors = ((e >> shift) & mask) + 1;
    (off, sectors * 512 - (off & 511))
}

/// Reference counting over one image.
pub(crate) struct Walker<'a> {
    st: &'a dyn Storage,
    img: &'a Image,
    pub refs: RefArray,
    pub f: Findings,
    refmax: u64,
    l2buf: Vec<u8>,
    /// L2 tables whose entry fixes are recorded already: a table reached again (from another
    /// L1 entry or a snapshot) adds no second copy of them, so the list stays bounded by the
    /// file, whatever the L1 tables say.
    fixed_tables: std::collections::HashSet<u64>,
}

impl<'a> Walker<'a> {
    pub fn new(st: &'a dyn Storage, img: &'a Image) -> Self {
        Walker {
            st,
            img,
            refs: RefArray::new(img.nb_clusters),
            f: Findings::default(),
            refmax: max_refcount(img.header.refcount_order),
            l2buf: vec![0u8; img.cs as usize],
            fixed_tables: std::collections::HashSet::new(),
        }
    }

    /// Count one reference to every cluster of `[offset, offset + size)`. Returns false (and
    /// reports a corruption) when the region ends a cluster or more past the end of the file.
    fn inc(&mut self, offset: u64, size: u64) -> bool {
        if size == 0 {
            return true;
        }
        let (cs, cb) = (self.img.cs, self.img.cb);
        if offset as u128 + size as u128 >= self.img.file_len as u128 + cs as u128 {
            self.f.corrupt(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            return false;
        }
        let first = offset >> cb;
        let last = (offset + size - 1) >> cb;
        for k in first..=last {
            let r = self.refs.get(k);
            if r >= self.refmax {
                self.f
                    .corrupt(format!("ERROR: overflow cluster offset={:#x}", k << cb));
                continue;
            }
            self.refs.set(k, r + 1);
        }
        true
    }

    /// Count everything. With `refstruct` false the refcount table and blocks are left out
    /// (that is what a rebuild needs: the new structure replaces them).
    pub fn run(&mut self, refstruct: bool, p: &mut Progress<'_>) -> Result<(), CheckError> {
        let img = self.img;
        self.inc(0, img.cs);
        self.walk_l1(img.header.l1_table_offset, img.header.l1_size, true, p)?;
        for sn in &img.snapshots {
            if sn.l1_table_offset & (img.cs - 1) != 0 {
                self.f.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if sn.l1_size as u64 > super::image::MAX_L1_BYTES / 8 {
                self.f.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.walk_l1(sn.l1_table_offset, sn.l1_size, false, p)?;
        }
        self.inc(img.header.snapshots_offset, img.snapshots_size);
        if refstruct {
            self.inc(img.header.refcount_table_offset, img.reftable_entries * 8);
        }
        if let Some((off, len)) = img.crypto {
            self.inc(off, len);
        }
        self.walk_bitmaps()?;
        if refstruct {
            self.walk_refblocks();
        }
        Ok(())
    }

    fn walk_l1(
        &mut self,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        p: &mut Progress<'_>,
    ) -> Result<(), CheckError> {
        if l1_size == 0 {
            return Ok(());
        }
        let img = self.img;
        self.inc(l1_off, l1_size as u64 * 8);
        // The active table is in memory already (`Image::l1`); a snapshot's is read.
        let read;
        let l1: &[u64] = if active && l1_off == img.header.l1_table_offset {
            &img.l1
        } else {
            read = read_table(self.st, l1_off, l1_size as u64, img.file_len)?;
            &read
        };
        // Entries past the end of the file read as zero: nothing to walk.
        p.tick(l1_size as u64 - l1.len() as u64);
        for (i, &e) in l1.iter().enumerate() {
            p.tick(1);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.f.corrupt(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & L1E_OFFSET_MASK;
            let counted = self.inc(l2, img.cs);
            if !counted {
                // The L2 table lies past the end of the file: it reads as zeros, so the entry
                // means nothing and repair may drop it.
                self.f.fixes.push(EntryFix {
                    at: l1_off + 8 * i as u64,
                    value: 0,
                    in_l2: false,
                    why: format!("L1 entry {i} points past the end of the file ({l2:#x})"),
                });
            }
            if l2 & (img.cs - 1) != 0 {
                self.f.corrupt(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.walk_l2(l2, active)?;
        }
        Ok(())
    }

    fn walk_l2(&mut self, l2_off: u64, active: bool) -> Result<(), CheckError> {
        let img = self.img;
        let (cs, cb) = (img.cs, img.cb);
        let mut buf = std::mem::take(&mut self.l2buf);
        let r = self.st.read_at(&mut buf, l2_off);
        if let Err(e) = r {
            self.l2buf = buf;
            self.f
                .error("ERROR: I/O error in check_refcounts_l2".to_string());
            return Err(e.into());
        }
        let v3 = img.header.version >= 3;
        // Repair only rewrites entries of tables that are where a table may be, once each, and
        // only of tables that look like L2 tables (no entry with reserved bits set).
        let mut fixable = l2_off != 0 && l2_off & (cs - 1) == 0 && self.fixed_tables.insert(l2_off);
        let fixes_before = self.f.fixes.len();
        let mut next_contiguous = 0u64;
        for (i, c) in buf.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let e = u64::from_be_bytes(a);
            let at = l2_off + 8 * i as u64;
            let kind = classify(e);
            if kind != Kind::Compressed && e & L2E_RESERVED_MASK != 0 {
                self.f.corrupt(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                fixable = false;
            }
            match kind {
                Kind::Compressed => {
                    let (coff, csize) = compressed_extent(e, cb);
                    if e & OFLAG_COPIED != 0 {
                        self.f.corrupt(format!(
                            "ERROR: coffset={coff:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                    }
                    self.inc(coff, csize);
                    if active {
                        self.f.allocated += 1;
                        self.f.compressed += 1;
                        self.f.fragmented += 1;
                    }
                }
                Kind::Normal | Kind::ZeroAlloc => {
                    let off = e & L2E_OFFSET_MASK;
                    if off & (cs - 1) != 0 {
                        if kind == Kind::ZeroAlloc {
                            self.f.corrupt(format!(
                                "ERROR offset={off:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            ));
                            self.f.fixes.push(EntryFix {
                                at,
                                value: OFLAG_ZERO,
                                in_l2: true,
                                why: format!("unaligned preallocated zero cluster {off:#x}"),
                            });
                        } else {
                            self.f.corrupt(format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            ));
                        }
                    }
                    if active {
                        self.f.allocated += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.f.fragmented += 1;
                        }
                        next_contiguous = off.wrapping_add(cs);
                    }
                    // Past the end of the file the cluster reads as zeros: say so with the
                    // zero flag (v3) or by unallocating it (v2 without a backing file; with
                    // one, an unallocated cluster would read the backing file instead).
                    let zero_ok = v3 || img.header.backing_file.is_none();
                    if !self.inc(off, cs)
                        && zero_ok
                        && self.f.fixes.last().map(|f| f.at) != Some(at)
                    {
                        self.f.fixes.push(EntryFix {
                            at,
                            value: if v3 { OFLAG_ZERO } else { 0 },
                            in_l2: true,
                            why: format!("L2 entry points past the end of the file ({off:#x})"),
                        });
                    }
                }
                Kind::ZeroPlain | Kind::Unallocated => {}
            }
        }
        if !fixable {
            self.f.fixes.truncate(fixes_before);
        }
        self.l2buf = buf;
        Ok(())
    }

    fn walk_bitmaps(&mut self) -> Result<(), CheckError> {
        let Some(bm) = self.img.bitmaps else {
            return Ok(());
        };
        let img = self.img;
        self.inc(bm.offset, bm.size);
        let avail = img.file_len.saturating_sub(bm.offset).min(bm.size);
        let mut dir = vec![0u8; avail as usize];
        self.st.read_at(&mut dir, bm.offset)?;
        let mut pos = 0usize;
        for _ in 0..bm.nb_bitmaps {
            if pos + 24 > dir.len() {
                self.f
                    .corrupt("ERROR bitmap directory is truncated".to_string());
                return Ok(());
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&dir[pos..pos + 8]);
            let table_off = u64::from_be_bytes(a);
            let table_size =
                u32::from_be_bytes([dir[pos + 8], dir[pos + 9], dir[pos + 10], dir[pos + 11]])
                    as u64;
            let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra =
                u32::from_be_bytes([dir[pos + 20], dir[pos + 21], dir[pos + 22], dir[pos + 23]])
                    as usize;
            pos = (pos + 24 + extra + name_size + 7) & !7;
            self.inc(table_off, table_size * 8);
            if table_size * 8 > super::image::MAX_L1_BYTES {
                self.f
                    .corrupt(format!("ERROR bitmap table at {table_off:#x} is too large"));
                continue;
            }
            let table = read_table(self.st, table_off, table_size, img.file_len)?;
            for e in table {
                let off = e & 0x00ff_ffff_ffff_fe00;
                if e & 0xff00_0000_0000_01fe != 0
                    || (off != 0 && (e & 1 != 0 || off & (img.cs - 1) != 0))
                {
                    self.f
                        .corrupt(format!("ERROR bitmap table entry {e:#x} is invalid"));
                    continue;
                }
                if off != 0 {
                    self.inc(off, img.cs);
                }
            }
        }
        Ok(())
    }

    fn walk_refblocks(&mut self) {
        let img = self.img;
        for (i, &e) in img.reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> img.cb;
            if e & REFT_RESERVED_MASK != 0 {
                self.f.corrupt(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.f.rebuild = true;
                continue;
            }
            if off & (img.cs - 1) != 0 {
                self.f.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.f.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len() {
                self.f
                    .corrupt(format!("ERROR refcount block {i} is outside image"));
                self.f.refblock_outside = true;
                continue;
            }
            if off != 0 {
                self.inc(off, img.cs);
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.f
                        .corrupt(format!("ERROR refcount block {i} refcount={r}"));
                    self.f.rebuild = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_qemu() {
        assert_eq!(classify(0), Kind::Unallocated);
        assert_eq!(classify(OFLAG_COPIED), Kind::Unallocated);
        assert_eq!(classify(1), Kind::ZeroPlain);
        assert_eq!(classify(0x5_0000 | 1), Kind::ZeroAlloc);
        assert_eq!(classify(0x5_0000 | OFLAG_COPIED), Kind::Normal);
        // Reserved bits do not change the class; they are reported separately.
        assert_eq!(classify(0x5_0000 | 2), Kind::Normal);
        assert_eq!(classify(OFLAG_COMPRESSED | 0x5_0200), Kind::Compressed);
    }

    #[test]
    fn compressed_extent_like_qemu() {
        // 64 KiB clusters: offset in bits 0..53, sectors - 1 in bits 54..61.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_0200;
        assert_eq!(compressed_extent(e, 16), (0x1_0200, 4 * 512));
        let e = OFLAG_COMPRESSED | 0x1_0300;
        assert_eq!(compressed_extent(e, 16), (0x1_0300, 256));
    }
}
