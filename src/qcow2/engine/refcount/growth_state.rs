//! The state of a refcount-table growth without the metadata lock (`table_growth.rs`), and
//! its steps' I/O: plain data, no access to the refcount structures.

use crate::qcow2::format::header;
use crate::storage::Storage;
use std::sync::{Arc, Mutex};

/// Who may switch the header to a new refcount table: taken around the header write and sync
/// of a growth without the lock, and by a growth under the lock that settles it.
#[derive(Default)]
pub(crate) struct HeaderSlot {
    /// The growth allowed to write the header (`Growth::id`).
    pub(super) allowed: Option<u64>,
    /// The growth whose header write and sync succeeded.
    pub(super) written: Option<u64>,
}

/// A growth of the refcount table in progress (`table_to_grow`).
pub(crate) struct Growth {
    pub(super) id: u64,
    /// First new block (the first the old table lacks, or its last entry when that is empty).
    pub(super) b: u64,
    /// New blocks: `b..b + k`.
    pub(super) k: u64,
    /// First cluster of the new blocks, then the table.
    pub(super) at: u64,
    /// The new table: where, how many clusters and entries.
    pub(super) table_off: u64,
    pub(super) t_clusters: u64,
    pub(super) entries: u64,
    /// The new blocks' contents.
    pub(super) blocks: Vec<Vec<u8>>,
    /// The old table's entries as the new table on disk has them.
    pub(super) written: Vec<u64>,
    /// Step 4 is next: entries written into the old table go into the new one too.
    pub(super) header_pending: bool,
    /// A step runs without the lock.
    pub(super) busy: bool,
    /// A growth under the lock replaced this one; its steps are only waited for.
    pub(super) cancelled: bool,
}

/// What a step does without the lock.
pub(super) enum Work {
    /// Write these (offset, bytes), then sync.
    Writes(Vec<(u64, Vec<u8>)>),
    /// Write the header's refcount-table fields and sync, if the slot allows.
    Header([u8; 12]),
}

/// One step of a growth without the lock (`Refcounts::table_to_grow`).
pub(crate) struct TableStep {
    pub(super) id: u64,
    pub(super) work: Work,
    pub(super) slot: Arc<Mutex<HeaderSlot>>,
    /// The end of the file the step needs (0: within what an earlier step grew it to).
    pub(super) end: u64,
}

impl TableStep {
    /// The file must be at least this long first (0: nothing to grow).
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Whether this is the header switch.
    #[cfg(test)]
    pub(crate) fn is_header(&self) -> bool {
        matches!(self.work, Work::Header(_))
    }

    /// Run the step (no lock held). A header switch of a growth cancelled meanwhile writes
    /// nothing (`table_step_done` then ends the growth).
    pub(crate) fn run(&self, s: &dyn Storage) -> std::io::Result<()> {
        match &self.work {
            Work::Writes(w) => {
                for (off, data) in w {
                    s.write_at(data, *off)?;
                }
                s.flush()
            }
            Work::Header(hdr) => {
                let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                if slot.allowed == Some(self.id) {
                    s.write_at(hdr, header::OFF_REFCOUNT_TABLE)?;
                    s.flush()?;
                    slot.written = Some(self.id);
                }
                Ok(())
            }
        }
    }
}
