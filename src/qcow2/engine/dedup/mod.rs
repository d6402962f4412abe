//! Inline deduplication in the write path.
//!
//! Each whole cluster a guest writes is hashed (SHA-256). The index maps hashes to guest
//! clusters that held that content when it was indexed; it is only a hint. A hint is used only
//! with a proof that the candidate holds the data, while nothing can change it: either a verified
//! record (the candidate's full hash, computed this session and kept current under the lock; see
//! `records`), or a byte compare:
//!
//! 1. under the lock: the candidate host cluster is pinned (its frees wait), COPIED is cleared on
//!    the candidate's entry (so no new write goes to it in place), and if it had COPIED we wait
//!    until every data I/O planned before that moment has finished;
//! 2. outside the lock: the candidate is read and compared;
//! 3. under the lock: refcount + 1, the new entry without COPIED, the old entry released.
//!
//! So a false dedup is impossible whatever the index says.
//! All-zero clusters become zero clusters. Partial-cluster writes read the rest of the cluster
//! first. Sharing stops below half the refcount maximum (room for snapshots).
//!
//! A guest cluster rewritten with the content its verified record says it has costs no I/O;
//! with an unverified (loaded) record, one read and no write.

pub(crate) mod background;
pub(crate) mod lifecycle;
mod link;
mod pending;
mod rebuild;
mod rebuild_state;
mod rebuild_worker;
mod records;
pub(crate) mod store;

pub use store::{DedupStats, IndexOpenReport, DEFAULT_RECORD_CACHE_BYTES};

use super::image::Qcow2;
use super::iov;
use super::state::State;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::dedup::DedupMode;
use crate::qcow2::format::L2Entry;
use crate::qcow2::hashindex::{hash_cluster, is_zero};
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::MutexGuard;
use store::{Dedup, MAX_HINTS};

/// Holds guest cluster `gc` for one writer; released by `release` under a lock the caller has
/// anyway (the caller then wakes the waiters, once, after the lock), or else on drop (which
/// wakes them itself). Never drop one while this thread holds the lock.
pub(crate) struct ClusterGuard<'a> {
    q: &'a Qcow2,
    gc: u64,
    armed: bool,
}

impl ClusterGuard<'_> {
    /// Release the cluster under the lock the caller holds (saves taking it once more).
    /// Returns whether threads wait for a cluster: the caller must then notify the engine's
    /// condvar (after dropping the lock, together with any other wake-up it owes).
    #[must_use = "when true, notify the engine's condvar: a writer may wait for this cluster"]
    pub(crate) fn release(mut self, m: &mut State) -> bool {
        self.armed = false;
        unhold(m, self.gc)
    }
}

/// Returns whether threads wait for a cluster (they must be woken).
fn unhold(m: &mut State, gc: u64) -> bool {
    if let Some(d) = m.dedup.as_mut() {
        d.published.remove(&gc);
    }
    m.unhold(gc)
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let wake = unhold(&mut self.q.lock(), self.gc);
            if wake {
                self.q.cond.notify_all();
            }
        }
    }
}

impl Qcow2 {
    /// True when inline dedup is on (and not paused).
    pub fn dedup_enabled(&self) -> bool {
        // No lock: every write asks.
        self.dedup_on
            && self.dedup_mode() == DedupMode::Inline
            && !self.dedup_paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The dedup mode now (Off when the image is not served with dedup).
    pub fn dedup_mode(&self) -> DedupMode {
        if !self.dedup_on {
            return DedupMode::Off;
        }
        let bits = self.dedup_mode.load(std::sync::atomic::Ordering::Relaxed);
        DedupMode::from_bits(bits).unwrap_or(DedupMode::Off)
    }

    /// Switch between off, inline and background (the image must be served with dedup). The
    /// setting is written to the image at once, so it survives a restart (also a crash).
    pub fn set_dedup_mode(&self, mode: DedupMode) -> Result<()> {
        if !self.dedup_on {
            return Err(Qcow2Error::DedupOff);
        }
        self.dedup_mode
            .store(mode.bits(), std::sync::atomic::Ordering::SeqCst);
        log::info!("dedup mode set to {mode:?}");
        // Woken also when the setting could not be written: it is in effect already.
        let r = self.persist_dedup_setting();
        self.wake_worker();
        r
    }

    pub(crate) fn persist_dedup_setting(&self) -> Result<()> {
        let (mode, paused) = (self.dedup_mode(), self.dedup_paused());
        // The header may be rewritten whole from what the file holds: no DIRTY set without
        // the metadata lock may be on its way meanwhile (`Qcow2::dirty_ahead`).
        let _wb = self.wb_lock();
        let mut m = self.lock();
        let cb = self.g.cluster_bits;
        match m.dedup.as_mut() {
            Some(d) => lifecycle::write_setting(self.storage.as_ref(), d, cb, mode, paused),
            None => Ok(()),
        }
    }

    /// True when the image is served with dedup (paused or not).
    pub fn dedup_available(&self) -> bool {
        self.dedup_on
    }

    /// True when dedup was paused (writes then go the plain way; shared clusters stay right).
    pub fn dedup_paused(&self) -> bool {
        self.dedup_paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Pause or resume inline dedup. An error when the image is not served with dedup.
    pub fn set_dedup_paused(&self, paused: bool) -> Result<()> {
        if !self.dedup_on {
            return Err(Qcow2Error::DedupOff);
        }
        self.dedup_paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
        log::info!("dedup {}", if paused { "paused" } else { "resumed" });
        // Woken also when the setting could not be written: it is in effect already.
        let r = self.persist_dedup_setting();
        self.wake_worker();
        r
    }

    /// Dedup counters, when dedup is on.
    pub fn dedup_stats(&self) -> Option<DedupStats> {
        self.lock().dedup.as_ref().map(Dedup::snapshot_stats)
    }

    /// How the dedup index was made at open (loaded or rebuilt, and why), when dedup is on.
    pub fn dedup_open_report(&self) -> Option<IndexOpenReport> {
        self.lock().dedup.as_ref().map(|d| d.open_report.clone())
    }

    /// Read the index clusters holding the records of guest clusters `gcs` that are not
    /// cached (at most `MAX_RECORD_LOADS`) without the lock (dropped and taken again around
    /// the reads), as `load_tables` does for tables. A write loads its own record; a discard
    /// or write-zeroes batch the records it forgets.
    pub(crate) fn load_records<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gcs: std::ops::Range<u64>,
    ) -> MutexGuard<'a, State> {
        let want = match m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
            Some(r) => r.records_to_load(gcs.start, gcs.end, MAX_RECORD_LOADS),
            None => return m,
        };
        self.read_records(m, want)
    }

    /// Read the index clusters `want` names (registered by `Records::record_to_load`) without
    /// the lock, which is dropped and taken again around the reads, and cache them.
    pub(crate) fn read_records<'a>(
        &'a self,
        m: MutexGuard<'a, State>,
        want: Vec<(u64, u64, usize, u64)>,
    ) -> MutexGuard<'a, State> {
        if want.is_empty() {
            return m;
        }
        drop(m);
        let s = self.storage.as_ref();
        let read: Vec<_> = want
            .into_iter()
            .map(|(k, off, len, ticket)| {
                let mut buf = vec![0u8; len];
                let ok = s.read_at(&mut buf, off).is_ok();
                (k, ticket, ok.then_some(buf))
            })
            .collect();
        let mut m = self.lock();
        if let Some(r) = m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
            for (k, ticket, buf) in read {
                if let Err(e) = r.loaded(s, k, ticket, buf.as_deref()) {
                    log::warn!("dedup index cluster {k}: {e}");
                }
            }
        }
        m
    }

    /// True when evicted index clusters wait for a writer (see `write_evicted_records`).
    pub(crate) fn records_evicted(m: &State) -> bool {
        m.dedup
            .as_ref()
            .and_then(|d| d.records.as_ref())
            .is_some_and(|r| r.has_evicted())
    }

    /// Write the dirty index clusters the record cache evicted, without the metadata lock (under
    /// the writeback lock, so that the index area cannot move meanwhile). Records are hints: a
    /// failed write only loses them (logged).
    pub(crate) fn write_evicted_records(&self) {
        let s = self.storage.as_ref();
        let _wb = self.wb_lock();
        let batch = match self.lock().dedup.as_mut().and_then(|d| d.records.as_mut()) {
            // A request writes a few; one left with more leaves the rest to the next.
            Some(r) => r.take_evicted(16),
            None => return,
        };
        let done: Vec<(u64, bool)> = batch
            .iter()
            .map(|(k, off, b)| {
                let r = s.write_at(b, *off);
                if let Err(e) = &r {
                    log::warn!("dedup index cluster {k} not written ({e}): its hints are lost");
                }
                (*k, r.is_ok())
            })
            .collect();
        let mut m = self.lock();
        if let Some(r) = m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
            for (k, ok) in done {
                r.evicted_written(k, ok);
            }
        }
    }

    fn hold_cluster(&self, gc: u64) -> ClusterGuard<'_> {
        self.hold_cluster_locked(gc).1
    }

    /// Hold guest cluster `gc`, then run `f` under the same lock.
    fn hold_cluster_then<T>(
        &self,
        gc: u64,
        f: impl FnOnce(&mut State) -> T,
    ) -> (ClusterGuard<'_>, T) {
        let (mut m, guard) = self.hold_cluster_locked(gc);
        let t = f(&mut m);
        drop(m);
        (guard, t)
    }

    /// Hold guest cluster `gc`; returns the lock, still taken, and the hold. Its L2 table is
    /// read first if it is not cached, without the lock (`load_tables`), so that a miss stalls
    /// only this request; a table that cannot be read is left to `entry`, which reports it.
    fn hold_cluster_locked(&self, gc: u64) -> (MutexGuard<'_, State>, ClusterGuard<'_>) {
        let cb = self.g.cluster_bits;
        let m = self
            .load_tables(self.lock(), gc << cb, 1 << cb)
            .unwrap_or_else(|_| self.lock());
        let mut m = self.load_records(m, gc..gc + 1);
        while m.is_held(gc) {
            m = self.wait_cluster(m);
        }
        m.hold(gc);
        let guard = ClusterGuard {
            q: self,
            gc,
            armed: true,
        };
        (m, guard)
    }

    /// The write path of an image served with dedup: cluster by cluster, each guest cluster held
    /// for the whole operation (also while paused, so that no plain write can race a record).
    /// Returns the table change it depends on that is not in the file yet (see
    /// `Meta::ack_need`).
    pub(crate) fn write_dedup(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<u64> {
        let cs = self.g.cluster_size();
        let len = iov::len(bufs);
        let hashing = self.dedup_enabled();
        self.guest_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // One cluster buffer for the request: a full cluster overwrites all of it, a partial
        // one reads the whole cluster first.
        let mut buf = if hashing {
            vec![0u8; cs as usize]
        } else {
            Vec::new()
        };
        let mut need = 0;
        // Evicted index clusters are written once the request holds nothing.
        let mut evicted = false;
        for iov::Chunk {
            gc,
            in_off,
            n,
            buf_off,
        } in iov::chunks(offset, len, self.g.cluster_bits)
        {
            let pos = offset + buf_off as u64;
            let sub = iov::slice(bufs, buf_off, n as usize);
            if (gc + 1) * cs > self.size() {
                // The last cluster of a disk whose size is not a cluster multiple (never indexed).
                need = need.max(self.write_plain(pos, &sub)?);
                continue;
            }
            if !hashing {
                // Held, so the worker cannot take it before the data has landed: recorded as
                // pending (background) or forgotten (paused, off) before the write.
                let s = self.storage.as_ref();
                let background = self.dedup_mode() == DedupMode::Background;
                let (guard, first) = self.hold_cluster_then(gc, |m| {
                    let r = if background {
                        mark_pending(m, s, gc)
                    } else {
                        forget(m, s, gc).map(|()| false)
                    };
                    evicted |= Self::records_evicted(m);
                    r
                });
                if first? {
                    // The first pending cluster: the worker sleeps until told.
                    self.wake_worker();
                }
                need = need.max(self.write_plain_held(pos, &sub, Some(guard))?);
                continue;
            }
            // A whole cluster is hashed before it is held (the guest's buffer does not change
            // during its request); a partial one is held first, so that the rest stays as read.
            let partial = if n < cs {
                let guard = self.hold_cluster(gc);
                self.read(gc * cs, &mut [IoSliceMut::new(&mut buf)])?;
                Some(guard)
            } else {
                None
            };
            iov::copy_out(&sub, &mut buf, in_off as usize);
            let h = (!is_zero(&buf)).then(|| hash_cluster(&buf));
            let (m, guard) = match partial {
                Some(guard) => {
                    let mut m = self.lock();
                    if let Some(d) = m.dedup.as_mut() {
                        d.stats.partial_cluster_reads += 1;
                    }
                    (m, guard)
                }
                None => self.hold_cluster_locked(gc),
            };
            // The refcount blocks the allocator searches, read, and the block (or table) it
            // needs next, made, without the lock (the cluster stays held), as on the plain
            // write path.
            let m = self.load_alloc_refcounts(m, 1);
            let m = self.create_refcount_block(m);
            // One lock section from here to the release, but for the data write of a unique
            // cluster and the loads of its candidates.
            let mut m = self.settle_cluster(m, gc, &buf, h.as_ref(), false)?;
            // Its entry: a link, a zero cluster or a new cluster just made, or the one an
            // identical rewrite or an in-place write relied on.
            need = need.max(m.ack_need(gc, gc));
            evicted |= Self::records_evicted(&m);
            let wake = guard.release(&mut m);
            drop(m);
            if wake {
                self.cond.notify_all();
            }
        }
        if evicted {
            self.write_evicted_records();
        }
        Ok(need)
    }

    /// Give guest cluster `gc` (held by the caller, under lock `m`) the whole-cluster content
    /// `buf`, whose hash is `h` (None: all zeros): a zero cluster, a link or unique data (see
    /// `link_or_write`, also for `have`). Gives the lock back, so the caller releases `gc` in the
    /// same section; on an error the lock is already released, so the hold may drop.
    fn settle_cluster<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gc: u64,
        buf: &[u8],
        h: Option<&[u8; 32]>,
        have: bool,
    ) -> Result<MutexGuard<'a, State>> {
        match h {
            Some(h) => self.link_or_write(m, gc, buf, h, have),
            None => {
                self.make_zero_cluster(&mut m, gc)?;
                Ok(m)
            }
        }
    }

    /// Turn guest cluster `gc` (held by the caller) into a zero cluster.
    fn make_zero_cluster(&self, m: &mut State, gc: u64) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let old = m.entry(s, gc)?;
        forget(m, s, gc)?;
        if !matches!(old, L2Entry::Zero { host: None, .. }) {
            m.set_entry(
                s,
                gc,
                L2Entry::Zero {
                    host: None,
                    copied: false,
                },
            )?;
            m.release(s, gc, old)?;
        }
        if let Some(d) = m.dedup.as_mut() {
            d.stats.zero_clusters += 1;
            d.stats.bytes_saved += cs;
        }
        Ok(())
    }

    /// Deduplicate the data already in the image (offline): each allocated cluster is read and
    /// hashed once; the first copy of a content is indexed where it is, later copies go through
    /// the link path. Open with `dedup_index_at_open: false`: this pass builds the index.
    /// `progress(done, total, bytes_saved)`.
    pub fn dedup_existing(&self, progress: &mut dyn FnMut(u64, u64, u64)) -> Result<DedupStats> {
        let cs = self.g.cluster_size();
        let total = self.size() / cs;
        for gc in 0..total {
            self.dedup_existing_cluster(gc)?;
            if gc % 256 == 0 || gc + 1 == total {
                let saved = self.dedup_stats().map_or(0, |d| d.bytes_saved);
                progress(gc + 1, total, saved);
            }
        }
        self.flush_all()?;
        self.dedup_stats().ok_or(Qcow2Error::DedupOff)
    }

    /// A hint proved wrong: forget it, and the candidate's record if it says the same.
    fn drop_hint(&self, m: &mut State, h: &[u8; 32], cand: u64) -> Result<()> {
        if matches!(record(m, self.storage.as_ref(), cand)?, Some((rh, _)) if rh == *h) {
            forget(m, self.storage.as_ref(), cand)?;
        }
        if let Some(d) = m.dedup.as_mut() {
            d.index.remove(h, cand);
            d.stats.stale_hints_rejected += 1;
        }
        Ok(())
    }
}

/// The record of guest cluster `gc` (its content's hash) and whether it is verified.
fn record(m: &mut State, s: &dyn Storage, gc: u64) -> Result<Option<([u8; 32], bool)>> {
    match m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
        Some(r) => r.get(s, gc),
        None => Ok(None),
    }
}

/// Guest cluster `gc` holds content `h` now (proven this session): record it, and drop the hint
/// of the content it held before.
fn set_record(m: &mut State, s: &dyn Storage, gc: u64, h: &[u8; 32]) -> Result<()> {
    let Some(d) = m.dedup.as_mut() else {
        return Ok(());
    };
    let old = match d.records.as_mut() {
        Some(r) => r.set(s, gc, Some(h), true)?,
        None => None,
    };
    if let Some(old) = old.filter(|o| o != h) {
        d.index.remove(&old, gc);
    }
    Ok(())
}

/// The record of a unique cluster set before its data lands: if the data write unwinds instead
/// of returning, the record is forgotten (the error paths forget it themselves).
struct RecordGuard<'a> {
    q: &'a Qcow2,
    gc: u64,
}

impl Drop for RecordGuard<'_> {
    fn drop(&mut self) {
        forget_after_error(&mut self.q.lock(), self.q.storage.as_ref(), self.gc);
    }
}

/// `forget` while handling another error, which is the one to report. If forgetting fails too,
/// `forget` has already stopped trusting whatever is loaded from the area later.
fn forget_after_error(m: &mut State, s: &dyn Storage, gc: u64) {
    if let Err(e) = forget(m, s, gc) {
        log::warn!("dedup record of guest cluster {gc} not cleared: {e}");
    }
}

/// Index clusters a discard batch reads without the lock at most (33 cover a batch of 4096
/// guest clusters at 4 KiB clusters); the rest, if any, load under it.
const MAX_RECORD_LOADS: usize = 40;

/// Guest cluster `gc` is about to get content we do not hash: forget its record and its hint.
/// Called under the lock before the change is planned, so no record ever outlives the content.
pub(crate) fn forget(m: &mut State, s: &dyn Storage, gc: u64) -> Result<()> {
    let Some(d) = m.dedup.as_mut() else {
        return Ok(());
    };
    let old = match d.records.as_mut() {
        Some(r) => match r.set(s, gc, None, false) {
            Ok(old) => old,
            Err(e) => {
                // The record may live on in the area (its index cluster could not be loaded):
                // whatever is loaded from now on is only a hint, proven by a byte compare.
                r.all_verified = false;
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(old) = old {
        d.index.remove(&old, gc);
    }
    Ok(())
}

/// Mark guest cluster `gc` pending (its data was just written plain in background mode).
/// Returns true when nothing was pending before.
pub(crate) fn mark_pending(m: &mut State, s: &dyn Storage, gc: u64) -> Result<bool> {
    let Some(d) = m.dedup.as_mut() else {
        return Ok(false);
    };
    let old = match d.records.as_mut() {
        Some(r) => r.set_pending(s, gc)?,
        None => None,
    };
    if let Some(old) = old {
        d.index.remove(&old, gc);
    }
    let first = d.pending.len() == 0;
    d.pending.insert(gc);
    Ok(first)
}
