//! Persist before ack (docs/design.md, "Acknowledged writes outlive the process"): a write, a
//! write-zeroes, returns only once the table entries it depends on are in the image file. The
//! host keeps what a process wrote (its page cache, or the device under O_DIRECT), so a crash
//! of the daemon then loses no completed write; no sync is needed for that.
//!
//! One persister at a time (the writeback lock, taken before the metadata lock): it copies
//! every table piece newer in memory than in the file under the metadata lock, writes the
//! copies without it, and marks them done under it again. Writers waiting meanwhile are often
//! covered by its copy when they get the lock (a group commit): they return without writing.
//! Serializing the persisters means a piece of a table never goes backwards in the file (two
//! copies of one sector written in the opposite order of their copying would lose an entry).

use super::image::Qcow2;
use crate::qcow2::error::Result;
use std::sync::MutexGuard;

impl Qcow2 {
    /// Make sure the table change `need` (from `Meta::ack_need`; 0: none) is in the file.
    pub(crate) fn persist(&self, need: u64) -> Result<()> {
        if need == 0 {
            return Ok(());
        }
        if self.g.version < 3 {
            // No DIRTY bit to stand in for the refcounts: the strict order of a flush (shared
            // with concurrent ones).
            return self.flush_all();
        }
        let s = self.storage.as_ref();
        let _wb = self.wb_lock();
        let Some(batch) = self.lock().persist_begin(s, need)? else {
            return Ok(());
        };
        let r = batch.write(s);
        self.lock().persist_end(batch, r)
    }

    /// The writeback lock (see the module documentation). A panic while it is held leaves
    /// nothing half done that the next holder could not redo: the poison is ignored.
    pub(super) fn wb_lock(&self) -> MutexGuard<'_, ()> {
        self.wb.lock().unwrap_or_else(|e| e.into_inner())
    }
}
