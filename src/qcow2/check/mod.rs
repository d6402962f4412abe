//! Our own qcow2 consistency checker and repairer, independent of the engine: it works on a
//! [`Storage`] with the pure codecs, and agrees with `qemu-img check` on what is a leak and what
//! is a corruption (it mirrors QEMU's `qcow2_check_refcounts`).
//!
//! * [`check`] without repair only reads.
//! * `RepairMode::Leaks` lowers refcounts that are too high (leaked clusters).
//! * `RepairMode::All` also rewrites entries that point at nothing (past the end of the file,
//!   unaligned preallocated zero clusters) as zero clusters, raises refcounts that are too low,
//!   rebuilds the whole refcount structure from the L1/L2 tables when needed (a new table and
//!   blocks at the end of the file, switched in with one 12-byte header write), and fixes
//!   OFLAG_COPIED in the active tables.
//!
//! The engine calls it on an image it has open exclusively (nothing else may write meanwhile),
//! e.g. to repair a dirty lazy-refcounts image on a read-write open:
//!
//! ```text
//! let opts = CheckOptions { repair: Some(RepairMode::All), mark_clean: true, progress: None };
//! let report = check(storage.as_ref(), &opts)?;   // storage: Arc<dyn Storage>
//! if !report.is_clean() { /* refuse to open read-write; report.messages say why */ }
//! ```
//!
//! Write order during repair keeps a crash from making things worse: table entries that drop a
//! reference are written (and flushed) before refcounts are lowered; a rebuilt refcount structure
//! is written and flushed before the header points at it; COPIED is fixed only after the
//! refcounts it describes are durable; the DIRTY/CORRUPT bits are cleared last.

mod analyze;
mod classify;
mod compare;
mod copied;
pub(crate) mod image;
mod l2memo;
mod ondisk;
mod refarray;
mod repair;
mod report;
mod walk;

pub use report::{CheckError, CheckOptions, CheckReport, RepairMode};

use crate::storage::Storage;
use analyze::analyze;
use report::Findings;

fn fill_report(r: &mut CheckReport, img: &image::Image, f: &Findings) {
    r.corruptions = f.corruptions;
    r.leaks = f.leaks;
    r.check_errors += f.check_errors;
    r.allocated_clusters = f.allocated;
    r.fragmented_clusters = f.fragmented;
    r.compressed_clusters = f.compressed;
    r.total_clusters = img.header.size.div_ceil(img.cs);
    r.image_end_offset = (f.highest_cluster + 1) * img.cs;
}

/// Check an image and, with `opts.repair`, repair it. The returned report describes the image
/// as it is afterwards, plus how much was fixed.
pub fn check(storage: &dyn Storage, opts: &CheckOptions<'_>) -> Result<CheckReport, CheckError> {
    let img = image::Image::load(storage)?;
    let (mut first, refs) = analyze(storage, &img, opts.progress)?;
    let mut report = CheckReport::default();
    first.take_messages(&mut report.messages);
    let Some(mode) = opts.repair else {
        fill_report(&mut report, &img, &first);
        return Ok(report);
    };
    let out = repair::run(storage, img, &first, refs, mode, opts)?;
    let mut log = out.log;
    log.take_messages(&mut report.messages);
    let mut last = out.last;
    last.take_messages(&mut report.messages);
    report.check_errors = log.check_errors;
    fill_report(&mut report, &out.img, &last);
    report.corruptions_fixed = first.corruptions.saturating_sub(last.corruptions);
    report.leaks_fixed = first.leaks.saturating_sub(last.leaks);
    report.rebuilt = out.rebuilt;
    Ok(report)
}

#[cfg(test)]
mod tests;
