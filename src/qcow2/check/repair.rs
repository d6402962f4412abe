//! Repair: entry fixes, refcount fixes in place or a full rebuild, COPIED fixes, clean bits.
//! Every step is ordered so that a crash in the middle leaves an image that is no worse than
//! before: at most leaked clusters, never a reference whose refcount is too low.

use super::analyze::analyze;
use super::compare::compare;
use super::copied::check_copied;
use super::image::{Image, MAX_REFTABLE_BYTES};
use super::refarray::RefArray;
use super::report::{CheckError, CheckOptions, Findings, Progress, RepairMode};
use super::walk::Walker;
use crate::qcow2::format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_INCOMPATIBLE};
use crate::qcow2::format::{encode_table, refblock};
use crate::storage::Storage;

/// What a repair did, and the image as the final verification pass saw it.
pub(crate) struct Outcome {
    pub img: Image,
    pub log: Findings,
    pub last: Findings,
    pub rebuilt: bool,
}

pub(crate) fn run(
    st: &dyn Storage,
    mut img: Image,
    first: &Findings,
    mut refs: RefArray,
    mode: RepairMode,
    opts: &CheckOptions<'_>,
) -> Result<Outcome, CheckError> {
    let mut log = Findings::default();
    let mut rebuilt = false;
    let mut rebuild = first.rebuild;
    let mut refblock_outside = first.refblock_outside;
    let mut needs_refcount_fix = first.leaks > 0 || first.refcount_corruptions > 0;
    let mut clean_before_copied = first.check_errors == 0 && first.refcount_corruptions == 0;

    // 1. Entries that reference nothing readable become zero clusters. This only drops
    //    references, so it goes first: a crash after it leaves leaks at worst.
    if mode == RepairMode::All && !first.fixes.is_empty() {
        let (l1_guard, l2_guard) = (img.meta_guard(false), img.meta_guard(true));
        for fx in &first.fixes {
            let cluster = fx.at >> img.cb;
            let table_ok = if fx.in_l2 {
                // The walk only records entries of aligned tables; this one must not be the
                // header or any other metadata either. (Tables with an entry that has reserved
                // bits set, such as guest data an L1 entry points at, record no fixes.)
                !l2_guard.hits(cluster)
            } else {
                !l1_guard.hits(cluster)
            };
            if !table_ok || fx.at >= img.file_len {
                log.note(format!(
                    "Not repairing {}: the table overlaps other metadata",
                    fx.why
                ));
                continue;
            }
            log.note(format!("Repairing {}", fx.why));
            st.write_at(&fx.value.to_be_bytes(), fx.at)?;
        }
        st.flush()?;
        img = Image::load(st)?;
        let (f, r) = analyze(st, &img, opts.progress)?;
        refs = r;
        rebuild = f.rebuild;
        refblock_outside = f.refblock_outside;
        needs_refcount_fix = f.leaks > 0 || f.refcount_corruptions > 0;
        clean_before_copied = f.check_errors == 0 && f.refcount_corruptions == 0;
    }
    drop(refs);

    // 2. Refcounts.
    if rebuild || (mode == RepairMode::All && refblock_outside) {
        if mode != RepairMode::All {
            log.error("ERROR need to rebuild refcount structures".to_string());
            let last = analyze(st, &img, None)?.0;
            return Ok(Outcome {
                img,
                log,
                last,
                rebuilt,
            });
        }
        log.note("Rebuilding refcount structure".to_string());
        let mut w = Walker::new(st, &img);
        let mut p = Progress::new(opts.progress, img.nb_clusters + 1);
        w.run(false, &mut p)?;
        let mut refs = std::mem::take(&mut w.refs);
        drop(w);
        rebuild_refcounts(st, &img, &mut refs, &mut p)?;
        rebuilt = true;
        img = Image::load(st)?;
        clean_before_copied = true;
    } else if needs_refcount_fix {
        // In place: only refcount blocks change, each entry to the computed count.
        let (_, refs) = analyze(st, &img, None)?;
        let mut p = Progress::new(opts.progress, refs.len());
        let mut f = Findings::default();
        compare(st, &img, &refs, Some(mode), &mut f, &mut p)?;
        st.flush()?;
        clean_before_copied &= f.check_errors == 0 && f.corruptions == 0 && f.leaks == 0;
        log.check_errors += f.check_errors;
        log.messages.append(&mut f.messages);
    }

    // 3. OFLAG_COPIED, now that the refcounts it must agree with are on disk. With "leaks"
    //    only when the refcounts are known to be right (as QEMU does).
    if mode == RepairMode::All || clean_before_copied {
        let mut f = Findings::default();
        check_copied(st, &img, true, &mut f)?;
        st.flush()?;
        // The active L1 table may have changed.
        img = Image::load(st)?;
        log.check_errors += f.check_errors;
        log.messages.append(&mut f.messages);
    }

    // 4. Verify.
    let last = analyze(st, &img, None)?.0;

    // 5. Clean bits, last.
    if opts.mark_clean
        && img.header.version >= 3
        && last.check_errors == 0
        && last.corruptions == 0
        && log.check_errors == 0
    {
        let mut b = [0u8; 8];
        st.read_at(&mut b, OFF_INCOMPATIBLE)?;
        let old = u64::from_be_bytes(b);
        let new = old & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if new != old {
            st.write_at(&new.to_be_bytes(), OFF_INCOMPATIBLE)?;
            st.flush()?;
            log.note("Cleared the dirty/corrupt bits in the header".to_string());
        }
    }
    Ok(Outcome {
        img,
        log,
        last,
        rebuilt,
    })
}

/// Where a fresh refcount structure goes: one refcount block for each index in `blocks` (in
/// order, from cluster `start`), then a table of `table_clusters` clusters. `blocks` holds the
/// blocks with a referenced cluster before `start` and those that cover the new structure
/// itself; ranges with nothing referenced get no block (a zero table entry: refcount 0), so a
/// small image in a huge sparse file gets a structure the size of what it uses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub start: u64,
    pub blocks: Vec<u64>,
    pub table_clusters: u64,
}

impl Layout {
    /// First cluster past the new structure.
    pub fn end(&self) -> u64 {
        self.start + self.blocks.len() as u64 + self.table_clusters
    }
}

/// `used`: sorted, distinct indices of the blocks needed for clusters before `start`.
pub(crate) fn layout(start: u64, used: &[u64], cluster_bits: u32, refblock_bits: u32) -> Layout {
    let cs = 1u64 << cluster_bits;
    let (mut n_blocks, mut table_clusters) = (used.len() as u64, 0u64);
    loop {
        let end = start + n_blocks + table_clusters;
        // Blocks covering [start, end), beyond those already used.
        let (lo, hi) = (
            start >> refblock_bits,
            (end.max(start + 1) - 1) >> refblock_bits,
        );
        let own = (lo..=hi).filter(|b| used.binary_search(b).is_err()).count() as u64;
        let b = used.len() as u64 + own;
        let t = ((hi + 1) * 8).div_ceil(cs);
        if b == n_blocks && t == table_clusters {
            let mut blocks: Vec<u64> = used.to_vec();
            blocks.extend((lo..=hi).filter(|b| used.binary_search(b).is_err()));
            blocks.sort_unstable();
            return Layout {
                start,
                blocks,
                table_clusters,
            };
        }
        n_blocks = b;
        table_clusters = t;
    }
}

/// Write a new refcount structure for `refs` (computed without the old structure) at the end of
/// the file, flush, then switch the header's refcount table fields and flush again. Until the
/// switch the old structure stays in force; after it the old one is simply free space.
fn rebuild_refcounts(
    st: &dyn Storage,
    img: &Image,
    refs: &mut RefArray,
    p: &mut Progress<'_>,
) -> Result<(), CheckError> {
    let (cs, cb) = (img.cs, img.cb);
    let order = img.header.refcount_order;
    let rb_bits = img.refblock_bits();
    let max = refblock::max_refcount(order);
    let start = refs.len().max(img.file_len.div_ceil(cs));
    // Blocks with a referenced cluster (the ranges are sorted, so are their block indices).
    let mut used: Vec<u64> = Vec::new();
    for (a, b) in refs.ranges() {
        for i in a..b {
            if refs.get(i) != 0 {
                let bi = i >> rb_bits;
                if used.last() != Some(&bi) {
                    used.push(bi);
                }
            }
        }
    }
    let l = layout(start, &used, cb, rb_bits);
    if l.table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(CheckError::Invalid(
            "a rebuilt refcount table would exceed 8 MiB".to_string(),
        ));
    }
    for c in start..l.end() {
        refs.set(c, 1);
    }
    let mut table = vec![0u64; (l.table_clusters * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    let epb = 1u64 << rb_bits;
    for (j, &bi) in l.blocks.iter().enumerate() {
        block.fill(0);
        let first = bi << rb_bits;
        for k in 0..epb.min(refs.len().saturating_sub(first)) {
            let v = refs.get(first + k).min(max);
            if v != 0 {
                refblock::set(&mut block, k as usize, order, v);
            }
        }
        let off = (start + j as u64) << cb;
        st.write_at(&block, off)?;
        if let Some(t) = table.get_mut(bi as usize) {
            *t = off;
        }
        p.tick(epb);
    }
    let table_off = (start + l.blocks.len() as u64) << cb;
    st.write_at(&encode_table(&table), table_off)?;
    st.flush()?;
    let mut field = [0u8; 12];
    field[..8].copy_from_slice(&table_off.to_be_bytes());
    field[8..].copy_from_slice(&(l.table_clusters as u32).to_be_bytes());
    st.write_at(&field, crate::qcow2::format::header::OFF_REFCOUNT_TABLE)?;
    st.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_itself() {
        for (start, cb, rbb) in [
            (0u64, 16u32, 15u32),
            (5, 9, 8),
            (255, 9, 8),
            (1 << 20, 12, 13),
        ] {
            let used: Vec<u64> = (0..start.div_ceil(1 << rbb)).collect();
            let l = layout(start, &used, cb, rbb);
            let end = l.end();
            // Every cluster before the end has its block, and the table covers every block.
            for c in 0..end {
                assert!(l.blocks.binary_search(&(c >> rbb)).is_ok(), "{l:?} {c}");
            }
            let top = *l.blocks.last().unwrap();
            assert!(l.table_clusters << (cb - 3) > top, "{l:?}");
            // Minimal: no block beyond the last cluster's.
            assert_eq!(top, (end - 1) >> rbb, "{l:?}");
        }
        // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
        let l = layout(255, &[0], 9, 8);
        assert_eq!(
            l,
            Layout {
                start: 255,
                blocks: vec![0, 1],
                table_clusters: 1
            }
        );
    }

    #[test]
    fn layout_is_sparse() {
        // A small image (blocks 0) in a file of 2^32 clusters: one data block, the blocks of the
        // new structure itself, and a table as long as the last block index needs.
        let start = 1u64 << 32;
        let l = layout(start, &[0], 16, 15);
        assert_eq!(l.blocks, vec![0, start >> 15]);
        assert_eq!(l.table_clusters, ((start >> 15) + 1) * 8 / 65536 + 1);
    }
}
