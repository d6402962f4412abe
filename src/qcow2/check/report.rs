//! What the checker is asked (`CheckOptions`, `RepairMode`), what it finds while it walks
//! (`Findings`, `Progress`) and what it reports (`CheckReport`, `CheckError`).

use crate::qcow2::format::FormatError;
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
    pub fixes: Vec<EntryFix>,
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
    /// `note` of a message that is made only if it is kept: past the limit it is counted,
    /// neither made nor logged.
    pub fn note_with(&mut self, m: impl FnOnce() -> String) {
        if self.full() {
            self.dropped_messages += 1;
        } else {
            self.note(m());
        }
    }
    /// `corrupt` of a message made only if it is kept.
    pub fn corrupt_with(&mut self, m: impl FnOnce() -> String) {
        self.corruptions += 1;
        self.note_with(m);
    }
    /// True once no more messages are kept: from then on they are only counted.
    pub fn full(&self) -> bool {
        self.messages.len() >= MAX_MESSAGES
    }
    /// `n` corruptions reported while the list is full (what `n` calls of `corrupt` would
    /// count, without making their messages).
    pub fn corrupt_unlisted(&mut self, n: u64) {
        debug_assert!(n == 0 || self.full());
        self.corruptions += n;
        self.dropped_messages += n;
    }
    pub fn error(&mut self, m: String) {
        self.check_errors += 1;
        self.note(m);
    }
    pub(crate) fn take_messages(&mut self, out: &mut Vec<String>) {
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

/// An 8-byte table entry that repair (mode "all") rewrites before refcounts are fixed. Only
/// changes that drop a reference without changing what the guest reads are recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryFix {
    /// Byte offset of the entry in the file.
    pub at: u64,
    pub value: u64,
    /// The entry is in an L2 table (else in an L1 table).
    pub in_l2: bool,
    pub why: FixReason,
}

/// Why an entry is rewritten: kept as data and worded only when repair reports it (a hostile
/// table can have a fix per entry, and most checks repair nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FixReason {
    /// L1 entry `index` points past the end of the file, at `l2`.
    L1PastEnd { index: usize, l2: u64 },
    /// An unaligned preallocated zero cluster at `off`.
    UnalignedZero { off: u64 },
    /// An L2 entry points past the end of the file, at `off`.
    L2PastEnd { off: u64 },
}

impl std::fmt::Display for FixReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            FixReason::L1PastEnd { index, l2 } => {
                write!(
                    f,
                    "L1 entry {index} points past the end of the file ({l2:#x})"
                )
            }
            FixReason::UnalignedZero { off } => {
                write!(f, "unaligned preallocated zero cluster {off:#x}")
            }
            FixReason::L2PastEnd { off } => {
                write!(f, "L2 entry points past the end of the file ({off:#x})")
            }
        }
    }
}
