//! Comparing computed refcounts with the stored ones (QEMU's `compare_refcounts`) and checking
//! that OFLAG_COPIED in the active tables says "refcount is exactly one" (`check_oflag_copied`).
//! Both can repair in place when asked.

use super::image::Image;
use super::image::REFT_OFFSET_MASK;
use super::ondisk::OnDisk;
use super::refarray::{merge_ranges, RefArray};
use super::report::{CheckError, Findings, Progress, RepairMode};
use super::walk::{classify, Kind};
use crate::qcow2::format::entries::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COPIED,
};
use crate::storage::Storage;

/// Compare every cluster covered by `refs` with its stored refcount. With `fix`, leaks (and with
/// `RepairMode::All` also too-low refcounts) are corrected in place; a stored refcount of 0 for
/// a referenced cluster cannot be fixed in place and asks for a rebuild instead.
pub(crate) fn compare(
    st: &dyn Storage,
    img: &Image,
    refs: &RefArray,
    fix: Option<RepairMode>,
    f: &mut Findings,
    p: &mut Progress<'_>,
) -> Result<(), CheckError> {
    let mut disk = OnDisk::new(st, img);
    f.highest_cluster = 0;
    // Only clusters that are referenced or have a refcount block can differ: walk those
    // ranges, not every cluster up to the end of a possibly huge sparse file.
    let mut ranges: Vec<(u64, u64)> = refs.ranges().collect();
    let bits = img.refblock_bits();
    for (ti, &e) in img.reftable.iter().enumerate() {
        if e & REFT_OFFSET_MASK != 0 && (ti as u64) < img.reftable_entries {
            let lo = (ti as u64) << bits;
            ranges.push((lo, lo.saturating_add(1u64 << bits).min(refs.len())));
        }
    }
    let mut covered = 0u64;
    for i in merge_ranges(ranges).into_iter().flat_map(|(a, b)| a..b) {
        p.tick(i.saturating_sub(covered) + 1);
        covered = i + 1;
        let r1 = match disk.get(i) {
            Ok(v) => v,
            Err(e) => {
                f.error(format!("Can't get refcount for cluster {i}: {e}"));
                continue;
            }
        };
        let r2 = refs.get(i);
        if r1 > 0 || r2 > 0 {
            f.highest_cluster = i;
        }
        if r1 == r2 {
            continue;
        }
        let fixable = if r1 == 0 {
            f.rebuild = true;
            false
        } else if r1 > r2 {
            fix.is_some()
        } else {
            fix == Some(RepairMode::All)
        };
        let what = if fixable {
            "Repairing"
        } else if r1 < r2 {
            "ERROR"
        } else {
            "Leaked"
        };
        f.note(format!("{what} cluster {i} refcount={r1} reference={r2}"));
        if fixable {
            match disk.set(i, r2) {
                Ok(()) => {
                    if r1 > r2 {
                        f.leaks_fixed += 1;
                    } else {
                        f.corruptions_fixed += 1;
                    }
                    continue;
                }
                Err(e) => f.note(format!("ERROR could not fix cluster {i}: {e}")),
            }
        }
        if r1 < r2 {
            f.corruptions += 1;
        } else {
            f.leaks += 1;
        }
    }
    p.tick(refs.len().saturating_sub(covered));
    if let Err(e) = disk.write_back() {
        f.error(format!("ERROR could not write refcount block: {e}"));
    }
    Ok(())
}

/// Check (and with `repair`, fix) OFLAG_COPIED on the active L1 and L2 entries against the
/// stored refcounts.
pub(crate) fn check_copied(
    st: &dyn Storage,
    img: &Image,
    repair: bool,
    f: &mut Findings,
) -> Result<(), CheckError> {
    let (cs, cb) = (img.cs, img.cb);
    let what = if repair { "Repairing" } else { "ERROR" };
    let mut disk = OnDisk::new(st, img);
    let mut l2 = vec![0u8; cs as usize];
    let guard = img.meta_guard(true);
    for (i, &l1e) in img.l1.iter().enumerate() {
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let Ok(rc) = disk.get(l2_off >> cb) else {
            continue;
        };
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            f.corruptions += 1;
            f.note(format!(
                "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
            ));
            if repair {
                let new = if rc == 1 {
                    l1e | OFLAG_COPIED
                } else {
                    l1e & !OFLAG_COPIED
                };
                let at = img.header.l1_table_offset + 8 * i as u64;
                if let Err(e) = st.write_at(&new.to_be_bytes(), at) {
                    f.error(format!("ERROR: Could not write L1 entry: {e}"));
                    return Ok(());
                }
                f.corruptions -= 1;
                f.corruptions_fixed += 1;
            }
        }
        if let Err(e) = st.read_at(&mut l2, l2_off) {
            f.error(format!("ERROR: Could not read L2 table: {e}"));
            return Ok(());
        }
        let mut dirty = 0u64;
        let mut not_a_table = false;
        for j in 0..(cs / 8) as usize {
            let mut a = [0u8; 8];
            a.copy_from_slice(&l2[8 * j..8 * j + 8]);
            let e = u64::from_be_bytes(a);
            not_a_table |= classify(e) != Kind::Compressed && e & L2E_RESERVED_MASK != 0;
            if !matches!(classify(e), Kind::Normal | Kind::ZeroAlloc) {
                continue;
            }
            let Ok(rc) = disk.get((e & L2E_OFFSET_MASK) >> cb) else {
                continue;
            };
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                f.corruptions += 1;
                f.note(format!(
                    "{what} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                ));
                if repair {
                    let new = if rc == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    l2[8 * j..8 * j + 8].copy_from_slice(&new.to_be_bytes());
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            // Only rewrite a table that is where a table may be: aligned, inside the file,
            // and not the header or other metadata (QEMU's overlap check does the same).
            // And only a table that looks like one: an entry with reserved bits set means this
            // is something else (guest data an L1 entry points at), which must not be written.
            if l2_off & (cs - 1) != 0
                || l2_off >= img.file_len
                || guard.hits(l2_off >> cb)
                || not_a_table
            {
                f.error(format!(
                    "ERROR: Could not write L2 table at {l2_off:#x}: not a valid table location"
                ));
                return Ok(());
            }
            if let Err(e) = st.write_at(&l2, l2_off) {
                f.error(format!("ERROR: Could not write L2 table: {e}"));
                return Ok(());
            }
            f.corruptions -= dirty;
            f.corruptions_fixed += dirty;
        }
    }
    Ok(())
}
