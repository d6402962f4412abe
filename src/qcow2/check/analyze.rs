//! The checker's read-only pass.

use super::report::{CheckError, Findings, Progress};
use super::{compare, copied, image, refarray, walk};
use crate::storage::Storage;

/// One read-only pass: count references, compare with the stored refcounts, check COPIED.
pub(crate) fn analyze(
    st: &dyn Storage,
    img: &image::Image,
    progress: Option<&dyn Fn(u64, u64)>,
) -> Result<(Findings, refarray::RefArray), CheckError> {
    let l1_units: u64 =
        img.header.l1_size as u64 + img.snapshots.iter().map(|s| s.l1_size as u64).sum::<u64>();
    let mut p = Progress::new(progress, l1_units + img.nb_clusters + 1);
    let mut w = walk::Walker::new(st, img);
    w.run(true, &mut p)?;
    let refs = std::mem::take(&mut w.refs);
    let mut f = std::mem::take(&mut w.f);
    compare::compare(st, img, &refs, None, &mut f, &mut p)?;
    f.refcount_corruptions = f.corruptions;
    copied::check_copied(st, img, false, &mut f)?;
    Ok((f, refs))
}
