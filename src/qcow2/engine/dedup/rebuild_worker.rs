//! The rebuild's batches on the dedup worker's thread (`Qcow2::dedup_rebuild_step`): the lock
//! taken per step, the reads outside it (see `rebuild` for the steps and their rule).

use super::rebuild::{
    batch_done, finish_if_done, insert, max_items, next_window, plan, read_items, Next,
    INSERT_CHUNK,
};
use super::rebuild_state::Rebuild;
use crate::qcow2::engine::image::Qcow2;
use crate::qcow2::engine::state::State;
use crate::qcow2::error::Result;
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// True while the index is being rebuilt from the data and may go on (not paused, dedup
    /// not off, the image open).
    pub(crate) fn rebuild_wanted(&self, m: &State) -> bool {
        !self.closed.load(Ordering::SeqCst)
            && !self.dedup_paused()
            && self.dedup_mode() != crate::qcow2::format::dedup::DedupMode::Off
            && m.dedup
                .as_ref()
                .and_then(|d| d.rebuild.as_ref())
                .is_some_and(Rebuild::runnable)
    }

    /// `rebuild_wanted`, and no batch is under way (one at a time).
    pub(crate) fn rebuild_may_run(&self, m: &State) -> bool {
        self.rebuild_wanted(m)
            && m.dedup
                .as_ref()
                .and_then(|d| d.rebuild.as_ref())
                .is_some_and(|rb| !rb.busy)
    }

    /// True while the index is still being rebuilt from the data (paused or not).
    pub fn dedup_rebuilding(&self) -> bool {
        self.lock()
            .dedup
            .as_ref()
            .and_then(|d| d.rebuild.as_ref())
            .is_some_and(Rebuild::runnable)
    }

    /// One batch of the index rebuild (the worker thread runs them; tests may too). Returns
    /// false when there was nothing it may do now.
    pub fn dedup_rebuild_step(&self) -> Result<bool> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let cb = self.g.cluster_bits;
        let mut m = self.lock();
        if !self.rebuild_may_run(&m) {
            return Ok(false);
        }
        let (first, end) = match next_window(&mut m) {
            Next::Done => {
                if let Some(d) = m.dedup.as_mut() {
                    finish_if_done(d);
                }
                return Ok(false);
            }
            Next::Skipped => return Ok(true),
            Next::Window(first, end) => (first, end),
        };
        set_busy(&mut m, true);
        // The window's L2 tables are read without the lock.
        let loaded = self.load_tables(m, first << cb, (end - first) << cb);
        let mut m = match loaded {
            Ok(m) => m,
            Err(e) => {
                self.abandon_batch(&mut self.lock());
                return Err(e);
            }
        };
        if self.closed.load(Ordering::SeqCst) {
            self.abandon_batch(&mut m);
            return Ok(false);
        }
        let (items, end) = match plan(&mut m, s, first, end, max_items(cs)) {
            Ok(p) => p,
            Err(e) => {
                self.abandon_batch(&mut m);
                return Err(e);
            }
        };
        drop(m);
        let found = read_items(s, cs, &items);
        for (its, fs) in items.chunks(INSERT_CHUNK).zip(found.chunks(INSERT_CHUNK)) {
            let mut m = self.lock();
            if self.closed.load(Ordering::SeqCst) {
                // Stopped promptly: what this batch put in so far stays (it is right), the
                // resume point is still the batch's start.
                self.abandon_batch(&mut m);
                return Ok(false);
            }
            if let Err(e) = insert(&mut m, s, its, fs) {
                self.abandon_batch(&mut m);
                return Err(e);
            }
        }
        let mut m = self.lock();
        let first_pending = m.dedup.as_ref().is_some_and(|d| d.pending.len() > 0);
        batch_done(&mut m, end);
        drop(m);
        if first_pending {
            self.wake_worker();
        }
        Ok(true)
    }

    /// A batch that cannot go on: unwatched, not busy; the range stays to do.
    fn abandon_batch(&self, m: &mut State) {
        if let Some(r) = m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
            r.unwatch();
        }
        set_busy(m, false);
    }

    /// Give up the rebuild for this session after an error (the close keeps the resume point,
    /// so the next open tries again). Missing hints only lose dedup opportunities.
    pub(crate) fn stop_rebuild(&self) {
        let mut m = self.lock();
        self.abandon_batch(&mut m);
        if let Some(rb) = m.dedup.as_mut().and_then(|d| d.rebuild.as_mut()) {
            rb.failed = true;
        }
    }
}

fn set_busy(m: &mut State, busy: bool) {
    if let Some(rb) = m.dedup.as_mut().and_then(|d| d.rebuild.as_mut()) {
        rb.busy = busy;
    }
}
