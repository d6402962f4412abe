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
use crate::qcow2::format::header::OFF_INCOMPATIBLE;
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
        self.dirty_ahead(Some(need))?;
        let Some(batch) = self.lock().persist_begin(s, need)? else {
            return Ok(());
        };
        let r = batch.write(s);
        self.lock().persist_end(batch, r)
    }

    /// With the writeback lock held, before a flush's copies (`need`: None) or a persister's
    /// (Some): set DIRTY (written and synced) without the metadata lock if that step would
    /// set it under the lock, so the once-per-window sync stops no other queue
    /// (docs/design.md, "What may block where").
    pub(super) fn dirty_ahead(&self, need: Option<u64>) -> Result<()> {
        let s = self.storage.as_ref();
        let Some(ahead) = self.lock().dirty_ahead(need) else {
            return Ok(());
        };
        let r = s
            .write_at(&ahead.0.to_be_bytes(), OFF_INCOMPATIBLE)
            .and_then(|()| s.flush());
        self.lock().dirty_ahead_done(s, ahead, r)
    }

    /// The writeback lock (see the module documentation). A panic while it is held leaves
    /// nothing half done that the next holder could not redo: the poison is ignored.
    pub(super) fn wb_lock(&self) -> MutexGuard<'_, ()> {
        self.wb.lock().unwrap_or_else(|e| e.into_inner())
    }
}
