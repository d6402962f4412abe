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

mod compare;
pub(crate) mod image;
mod ondisk;
mod refarray;
mod repair;
mod walk;

use crate::qcow2::format::FormatError;
use crate::storage::Storage;
use serde::Serialize;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (refcount higher than the references).
    Leaks,
    /// Leaks and corruptions, rebuilding refcounts when needed.
    All,
}

/// Options for [`check`].
#[derive(Default, Clone, Copy)]
pub struct CheckOptions<'a> {
    /// None: only check.
    pub repair: Option<RepairMode>,
    /// After a repair that leaves no corruption, clear the DIRTY and CORRUPT incompatible bits
    /// (as `qemu-img check -r` does).
    pub mark_clean: bool,
    /// Called now and then with (units done, units total) of the current pass.
    pub progress: Option<&'a dyn Fn(u64, u64)>,
}

/// Why an image could not be checked at all (qemu-img: "Check failed", exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("invalid image: {0}")]
    Invalid(String),
    #[error("image uses a feature the checker does not support: {0}")]
    Unsupported(String),
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The result of a check, with the counters of `qemu-img check --output json` (zero counters
/// are left out of the JSON, as qemu-img does; `check-errors` is always there).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// Human-readable findings, in qemu-img's words ("ERROR cluster 5 refcount=0 reference=1").
    #[serde(skip)]
    pub messages: Vec<String>,
    /// The refcount structure was rebuilt.
    #[serde(skip)]
    pub rebuilt: bool,
}

impl CheckReport {
    /// qemu-img's exit code: 1 check failed, 2 corruptions, 3 leaks only, 0 clean.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
    /// No corruption, no leak, no error.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// At most this many messages are kept; the rest are counted.
const MAX_MESSAGES: usize = 10_000;

/// Counters and messages of one pass.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
    pub highest_cluster: u64,
    /// Corruptions found before the COPIED check.
    pub refcount_corruptions: u64,
    /// The stored refcounts cannot be fixed in place.
    pub rebuild: bool,
    /// A refcount table entry points past the end of the file.
    pub refblock_outside: bool,
    pub fixes: Vec<walk::EntryFix>,
    pub messages: Vec<String>,
    pub dropped_messages: u64,
}

impl Findings {
    pub fn note(&mut self, m: String) {
        log::debug!("check: {m}");
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(m);
        } else {
            self.dropped_messages += 1;
        }
    }
    pub fn corrupt(&mut self, m: String) {
        self.corruptions += 1;
        self.note(m);
    }
    pub fn error(&mut self, m: String) {
        self.check_errors += 1;
        self.note(m);
    }
    fn take_messages(&mut self, out: &mut Vec<String>) {
        out.append(&mut self.messages);
        if self.dropped_messages > 0 {
            out.push(format!("... and {} more messages", self.dropped_messages));
            self.dropped_messages = 0;
        }
    }
}

/// Progress reporting for one pass.
pub(crate) struct Progress<'a> {
    f: Option<&'a dyn Fn(u64, u64)>,
    done: u64,
    total: u64,
    last: u64,
}

impl<'a> Progress<'a> {
    pub fn new(f: Option<&'a dyn Fn(u64, u64)>, total: u64) -> Self {
        Progress {
            f,
            done: 0,
            total: total.max(1),
            last: 0,
        }
    }
    pub fn tick(&mut self, n: u64) {
        self.done = (self.done + n).min(self.total);
        if let Some(f) = self.f {
            let step = (self.total / 200).max(1);
            if self.done - self.last >= step || self.done == self.total {
                self.last = self.done;
                f(self.done, self.total);
            }
        }
    }
}

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
    compare::check_copied(st, img, false, &mut f)?;
    Ok((f, refs))
}

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
