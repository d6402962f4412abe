//! Repair: entry fixes, refcount fixes in place or a full rebuild, COPIED fixes, clean bits.
//! Every step is ordered so that a crash in the middle leaves an image that is no worse than
//! before: at most leaked clusters, never a reference whose refcount is too low.

use super::compare::{check_copied, compare};
use super::image::{Image, MAX_REFTABLE_BYTES};
use super::refarray::RefArray;
use super::walk::Walker;
use super::{analyze, CheckError, CheckOptions, Findings, Progress, RepairMode};
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

/// Where a fresh refcount structure goes: `blocks` refcount blocks from cluster `start`, then a
/// table of `table_clusters` clusters, all past `start`, covering every cluster up to their own
/// end.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub start: u64,
    pub blocks: u64,
    pub table_clusters: u64,
}

pub(crate) fn layout(start: u64, cluster_bits: u32, refblock_bits: u32) -> Layout {
    let cs = 1u64 << cluster_bits;
    let (mut blocks, mut table_clusters) = (0u64, 0u64);
    loop {
        let end = start + blocks + table_clusters;
        let b = end.div_ceil(1u64 << refblock_bits).max(1);
        let t = (b * 8).div_ceil(cs);
        if b == blocks && t == table_clusters {
            return Layout {
                start,
                blocks,
                table_clusters,
            };
        }
        blocks = b;
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
    let epb = 1u64 << rb_bits;
    let max = refblock::max_refcount(order);
    let start = refs.len().max(img.file_len.div_ceil(cs));
    let l = layout(start, cb, rb_bits);
    if l.table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(CheckError::Invalid(
            "a rebuilt refcount table would exceed 8 MiB".to_string(),
        ));
    }
    for c in start..start + l.blocks + l.table_clusters {
        refs.set(c, 1);
    }
    let mut table = vec![0u64; (l.table_clusters * cs / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for b in 0..l.blocks {
        block.fill(0);
        let first = b * epb;
        for k in 0..epb.min(refs.len().saturating_sub(first)) {
            let v = refs.get(first + k).min(max);
            if v != 0 {
                refblock::set(&mut block, k as usize, order, v);
            }
        }
        let off = (start + b) << cb;
        st.write_at(&block, off)?;
        table[b as usize] = off;
        p.tick(epb);
    }
    let table_off = (start + l.blocks) << cb;
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
            let l = layout(start, cb, rbb);
            let end = start + l.blocks + l.table_clusters;
            assert!(l.blocks << rbb >= end, "{l:?}");
            assert!(l.table_clusters << (cb - 3) >= l.blocks, "{l:?}");
            // Minimal: one block fewer would not do.
            assert!((l.blocks - 1) << rbb < end, "{l:?}");
        }
        // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
        let l = layout(255, 9, 8);
        assert_eq!(
            l,
            Layout {
                start: 255,
                blocks: 2,
                table_clusters: 1
            }
        );
    }
}
