//! Data cluster allocation and the file length that covers it. A child of `meta` so that it
//! works on the core's own fields.

use super::{Meta, GROW_STEP};

/// Unsynced new clusters tracked one by one at most (16 bytes each); past it, all links sync
/// until the next flush.
const MAX_UNSYNCED: usize = 1 << 16;
use crate::qcow2::error::Result;
use crate::storage::Storage;

impl Meta {
    /// Take `n` contiguous data clusters. Returns the first host offset, and whether they read
    /// as zeros on disk without being written, durably: past the old end of the file, or freed
    /// clusters whose punched holes were synced (`Refcounts::holes`).
    ///
    /// The file is grown to cover every allocation at once: the length only ever grows, to at
    /// least the end of everything allocated, so it never cuts off a write in flight, and no
    /// table ever points past the end of the file.
    pub(crate) fn alloc_data(&mut self, s: &dyn Storage, n: u64) -> Result<(u64, bool)> {
        let cs = self.g.cluster_size();
        // Past every cluster ever allocated (L2 tables and refcount blocks included) and past the
        // file as it was at open, nothing was written.
        let zero_from = self.zero_from.max(self.rc.allocations * cs);
        let c = self.rc.alloc(s, n)?;
        // Freed clusters whose holes are durable read as zeros just the same.
        let holes = self.rc.last_alloc_holes;
        self.stats.clusters_allocated += n;
        let host = c * cs;
        self.cover_allocation(s, zero_from, host + n * cs)?;
        let ahead = self.rc.last_alloc_ahead;
        Ok((host, holes || (host >= zero_from && !ahead)))
    }

    /// After an allocation ending at `alloc_end` (`zero_from`: where never-written space began
    /// before it): nothing below the end of everything allocated reads as zeros any more, and
    /// the file covers it. The file grows in steps: a size change on every allocation would
    /// make every sync commit it.
    pub(super) fn cover_allocation(
        &mut self,
        s: &dyn Storage,
        zero_from: u64,
        alloc_end: u64,
    ) -> Result<()> {
        let cs = self.g.cluster_size();
        let end = (self.rc.allocations * cs).max(alloc_end);
        // Only the contiguous watermark: a run allocated ahead (`Refcounts::ahead`) leaves the
        // gap before it reading as zeros.
        self.zero_from = zero_from.max(self.rc.allocations * cs);
        if end > self.file_len {
            let target = end
                .max(self.file_len.saturating_add(GROW_STEP))
                .div_ceil(cs)
                * cs;
            self.grow_file(s, target)?;
        }
        Ok(())
    }

    /// Make the file at least `target` bytes long, never shorter than it is: a new refcount
    /// block may lie past `file_len` (written where the range it covers begins). Unlike
    /// `extend_file`, what lies past the allocations still reads as zeros (a refcount block
    /// created ahead is not in a range data is allocated from).
    pub(crate) fn grow_file(&mut self, s: &dyn Storage, target: u64) -> Result<()> {
        let cur = s.len()?;
        if target > cur {
            s.set_len(target)?;
        }
        self.file_len = target.max(cur);
        Ok(())
    }

    /// Grow the file to at least `end` bytes for something the engine writes there itself (the
    /// dedup index area): nothing there reads as zeros any more.
    pub(crate) fn extend_file(&mut self, s: &dyn Storage, end: u64) -> Result<()> {
        if end > self.file_len {
            self.grow_file(s, end)?;
        }
        self.zero_from = self.zero_from.max(end);
        Ok(())
    }

    /// Host cluster `hc` (from `alloc_data`, reading as zeros) was linked with its data
    /// written but not synced first. Another entry that comes to point at it (a dedup link)
    /// must then sync first (`link_needs_sync`): its guest cluster had other content, which
    /// a lost data write would turn into zeros.
    pub(crate) fn note_unsynced(&mut self, hc: u64) {
        if self.unsynced.len() >= MAX_UNSYNCED {
            self.unsynced.clear();
            self.unsynced_all = Some(self.flushes_started);
        }
        self.unsynced.insert(hc, self.flushes_started);
    }

    /// True when a link to host cluster `hc` needs its data synced before the entry.
    pub(crate) fn link_needs_sync(&self, hc: u64) -> bool {
        let pending = |at: u64| at >= self.flushes_durable;
        self.unsynced.get(&hc).is_some_and(|&at| pending(at))
            || self.unsynced_all.is_some_and(pending)
    }

    /// A flush counted `started` when it began, and its last sync succeeded: the data of
    /// every cluster noted before is durable.
    pub(super) fn flush_durable(&mut self, started: u64) {
        self.flushes_durable = self.flushes_durable.max(started);
        let durable = self.flushes_durable;
        self.unsynced.retain(|_, at| *at >= durable);
        if self.unsynced_all.is_some_and(|at| at < durable) {
            self.unsynced_all = None;
        }
    }

    /// Give back clusters taken by `alloc_data` that were never linked. Only ever called while
    /// handling another error, which is the one to report: a failure here is logged, and the
    /// cluster only leaks (refcount 1, no reference), which a check repairs.
    pub(crate) fn unalloc_data(&mut self, s: &dyn Storage, host: u64, n: u64) {
        let cs = self.g.cluster_size();
        for c in 0..n {
            if let Err(e) = self.rc.add(s, host / cs + c, -1) {
                log::error!("could not give back cluster at {:#x}: {e}", host + c * cs);
            }
        }
    }
}
