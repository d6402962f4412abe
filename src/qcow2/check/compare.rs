//! Comparing computed refcounts with the stored ones (QEMU's `compare_refcounts`), repairing
//! them in place when asked.

use super::image::Image;
use super::image::REFT_OFFSET_MASK;
use super::ondisk::OnDisk;
use super::refarray::{merge_ranges, RefArray};
use super::report::{CheckError, Findings, Progress, RepairMode};
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
        f.note_with(|| format!("{what} cluster {i} refcount={r1} reference={r2}"));
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
