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

mod background;
mod lifecycle;
mod records;

pub use background::DedupWorker;

pub(crate) use lifecycle::{close as write_back, open};
pub use lifecycle::{IndexOpenReport, DEFAULT_RECORD_CACHE_BYTES};

use super::meta::Meta;
use super::{iov, Qcow2};
use crate::qcow2::dedup::persist::{DedupExtension, DedupMode};
use crate::qcow2::dedup::{hash_cluster, is_zero, DedupIndex};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::L2Entry;
use crate::qcow2::offsets::HostOffset;
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::MutexGuard;

/// Counters of the dedup layer.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DedupStats {
    /// Clusters written as a reference to an existing cluster.
    pub clusters_deduplicated: u64,
    /// Clusters written as new, unique data.
    pub clusters_unique: u64,
    /// All-zero clusters turned into zero clusters.
    pub zero_clusters: u64,
    /// Rewrites of a cluster with the content it already had (no I/O).
    pub identical_rewrites: u64,
    /// Space saved: clusters linked plus zero clusters detected, in bytes.
    pub bytes_saved: u64,
    /// Partial-cluster writes that read the rest of their cluster first.
    pub partial_cluster_reads: u64,
    /// Hashes in the index.
    pub index_entries: u64,
    /// RAM used by the index.
    pub index_ram_bytes: u64,
    /// Links not made because the cluster was shared to the cap.
    pub refcount_cap_hits: u64,
    /// Index hints found stale (content differed, or the cluster moved on).
    pub stale_hints_rejected: u64,
    /// Links made on a verified record, without reading the candidate back.
    pub links_without_read: u64,
    /// RAM of the cached index clusters (the persistent records), bounded.
    pub record_cache_bytes: u64,
    /// Clusters waiting for the background worker.
    pub pending_clusters: u64,
    /// Clusters the background worker has processed.
    pub background_processed: u64,
}

/// The hint index: hash -> guest clusters that held that content, in the compact index of
/// `qcow2::dedup` (under 8 bytes per entry). It stores guest cluster + 1 (0 marks a free slot).
#[derive(Default)]
pub(crate) struct HintIndex {
    inner: DedupIndex,
}

impl HintIndex {
    fn lookup(&self, h: &[u8; 32]) -> Vec<u64> {
        self.inner.lookup(h).into_iter().map(|c| c - 1).collect()
    }
    fn insert(&mut self, h: &[u8; 32], gc: u64) {
        if !self.inner.contains(h, gc + 1) {
            // A guest cluster past the index's reach is simply not indexed (written unshared).
            let _ = self.inner.insert(h, gc + 1);
        }
    }
    /// Insert unless the content already has `MAX_HINTS` hints (counted by fingerprint).
    fn insert_limited(&mut self, h: &[u8; 32], gc: u64) {
        let mut n = 0;
        self.inner.for_each_candidate(h, |_| {
            n += 1;
            n < MAX_HINTS
        });
        if n < MAX_HINTS {
            self.insert(h, gc);
        }
    }
    fn remove(&mut self, h: &[u8; 32], gc: u64) {
        self.inner.remove(h, gc + 1);
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn ram_bytes(&self) -> u64 {
        self.inner.ram_bytes()
    }
}

/// Hints kept per content (see the link step).
const MAX_HINTS: usize = 4;

/// Dedup state, kept under the metadata lock.
pub(crate) struct Dedup {
    index: HintIndex,
    pub stats: DedupStats,
    /// Largest refcount a dedup link may produce.
    cap: u64,
    /// The image's recorded setting and counters (our header extension), as found at open.
    pub recorded: Option<DedupExtension>,
    /// The persistent records (None for a disk smaller than one cluster).
    records: Option<records::Records>,
    /// How the index came to be at open.
    pub open_report: IndexOpenReport,
    /// Guest clusters waiting for the background worker.
    pending: background::Pending,
    /// The worker holds a cluster now.
    pub(crate) worker_busy: bool,
}

impl Dedup {
    pub(crate) fn new(max_refcount: u64) -> Dedup {
        Dedup {
            index: HintIndex::default(),
            recorded: None,
            records: None,
            open_report: IndexOpenReport::default(),
            pending: background::Pending::default(),
            worker_busy: false,
            stats: DedupStats::default(),
            cap: (max_refcount / 2).max(1),
        }
    }
    pub(crate) fn snapshot_stats(&self) -> DedupStats {
        let mut s = self.stats;
        s.index_entries = self.index.len();
        s.index_ram_bytes = self.index.ram_bytes();
        s.record_cache_bytes = self.records.as_ref().map_or(0, records::Records::ram_bytes);
        s.pending_clusters = self.pending.len();
        s
    }
}

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
    pub(crate) fn release(mut self, m: &mut Meta) -> bool {
        self.armed = false;
        unhold(m, self.gc)
    }
}

/// Returns whether threads wait for a cluster (they must be woken).
fn unhold(m: &mut Meta, gc: u64) -> bool {
    m.held.remove(&gc);
    m.published.remove(&gc);
    m.cluster_waiters > 0
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

    fn hold_cluster(&self, gc: u64) -> ClusterGuard<'_> {
        self.hold_cluster_locked(gc).1
    }

    /// Hold guest cluster `gc`, then run `f` under the same lock.
    fn hold_cluster_then<T>(
        &self,
        gc: u64,
        f: impl FnOnce(&mut Meta) -> T,
    ) -> (ClusterGuard<'_>, T) {
        let (mut m, guard) = self.hold_cluster_locked(gc);
        let t = f(&mut m);
        drop(m);
        (guard, t)
    }

    /// Hold guest cluster `gc`; returns the lock, still taken, and the hold.
    fn hold_cluster_locked(&self, gc: u64) -> (MutexGuard<'_, Meta>, ClusterGuard<'_>) {
        let mut m = self.lock();
        while m.held.contains(&gc) {
            m = self.wait_cluster(m);
        }
        m.held.insert(gc);
        let guard = ClusterGuard {
            q: self,
            gc,
            armed: true,
        };
        (m, guard)
    }

    /// The write path of an image served with dedup: cluster by cluster, each guest cluster held
    /// for the whole operation (also while paused, so that no plain write can race a record).
    pub(crate) fn write_dedup(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
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
        for iov::Chunk {
            gc,
            in_off,
            n,
            buf_off,
        } in iov::chunks(offset, len, self.g.cluster_bits)
        {
            let pos = offset + buf_off as u64;
            let sub = iov::slice(bufs, buf_off, n as usize);
            if (gc + 1) * cs > self.g.size {
                // The last cluster of a disk whose size is not a cluster multiple (never indexed).
                self.write_plain(pos, &sub)?;
                continue;
            }
            if !hashing {
                // Held, so the worker cannot take it before the data has landed: recorded as
                // pending (background) or forgotten (paused, off) before the write.
                let s = self.storage.as_ref();
                let background = self.dedup_mode() == DedupMode::Background;
                let (guard, first) = self.hold_cluster_then(gc, |m| {
                    if background {
                        background::mark_pending(m, s, gc)
                    } else {
                        forget(m, s, gc).map(|()| false)
                    }
                });
                if first? {
                    // The first pending cluster: the worker sleeps until told.
                    self.wake_worker();
                }
                self.write_plain_held(pos, &sub, Some(guard))?;
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
            let mut p = in_off as usize;
            for b in &sub {
                buf[p..p + b.len()].copy_from_slice(b);
                p += b.len();
            }
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
            // One lock section from the hold (whole clusters) to the release, but for the data
            // write of a unique cluster.
            let mut m = self.settle_cluster(m, gc, &buf, h.as_ref(), false)?;
            let wake = guard.release(&mut m);
            drop(m);
            if wake {
                self.cond.notify_all();
            }
        }
        Ok(())
    }

    /// Give guest cluster `gc` (held by the caller, under lock `m`) the whole-cluster content
    /// `buf`, whose hash is `h` (None: all zeros): a zero cluster, a link or unique data (see
    /// `link_or_write`, also for `have`). Gives the lock back, so the caller releases `gc` in the
    /// same section; on an error the lock is already released, so the hold may drop.
    fn settle_cluster<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        buf: &[u8],
        h: Option<&[u8; 32]>,
        have: bool,
    ) -> Result<MutexGuard<'a, Meta>> {
        match h {
            Some(h) => self.link_or_write(m, gc, buf, h, have),
            None => {
                self.make_zero_cluster(&mut m, gc)?;
                Ok(m)
            }
        }
    }

    /// Turn guest cluster `gc` (held by the caller) into a zero cluster.
    fn make_zero_cluster(&self, m: &mut Meta, gc: u64) -> Result<()> {
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

    /// Write whole cluster `buf` with hash `h` to guest cluster `gc` (held by the caller): a link
    /// to an identical cluster if one is proven, else unique data.
    /// With `have`, `gc` already holds `buf`: nothing is written, a unique cluster is only
    /// recorded and indexed where it is.
    /// Takes the lock (taken by the caller, who holds `gc`) and gives it back at the end, so the
    /// caller releases `gc` without taking it again.
    fn link_or_write<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        gc: u64,
        buf: &[u8],
        h: &[u8; 32],
        have: bool,
    ) -> Result<MutexGuard<'a, Meta>> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let h = *h;
        // The guest rewrites the content its cluster holds (a verified record says so): no I/O.
        if let (Some((rh, true)), L2Entry::Normal { .. }) =
            (record(&mut m, s, gc)?, m.entry(s, gc)?)
        {
            if rh == h {
                if let Some(d) = m.dedup.as_mut() {
                    d.stats.identical_rewrites += 1;
                }
                return Ok(m);
            }
        }
        'candidates: loop {
            let Some(d) = m.dedup.as_ref() else {
                return Err(Qcow2Error::DedupOff);
            };
            // The most shared copy first, our own cluster last: linking to it frees ours if it
            // held a separate copy, and separate copies of one content converge on one cluster.
            let mut cands: Vec<(bool, u64, u64)> = Vec::new();
            for c in d.index.lookup(&h) {
                let rc = match m.entry(s, c)? {
                    L2Entry::Normal { host, .. } => m.rc.get(s, host.0 / cs)?,
                    _ => 0,
                };
                cands.push((c == gc, u64::MAX - rc, c));
            }
            cands.sort_unstable();
            let n_cands = cands.len();
            let cands: Vec<u64> = cands.into_iter().map(|(_, _, c)| c).collect();
            for cand in cands {
                if cand != gc && m.held.contains(&cand) {
                    if m.published.contains(&cand) {
                        // Its writer is writing this content there right now: wait, then look
                        // again (so two writers of one content end with one cluster).
                        m = self.wait_cluster(m);
                        continue 'candidates;
                    }
                    // Its writer is replacing the content the hint names (and may itself be
                    // waiting for the cluster we hold): not a candidate.
                    continue;
                }
                let (host, copied) = match m.entry(s, cand)? {
                    L2Entry::Normal { host, copied } => (host.0, copied),
                    _ => {
                        self.drop_hint(&mut m, &h, cand)?;
                        continue;
                    }
                };
                let hc = host / cs;
                let cap = m.dedup.as_ref().map_or(0, |d| d.cap);
                if m.rc.get(s, hc)? >= cap {
                    if let Some(d) = m.dedup.as_mut() {
                        d.stats.refcount_cap_hits += 1;
                    }
                    continue;
                }
                // A verified record of the candidate proves its content (full SHA-256, kept
                // current under this lock by every write since it was computed; no writer holds
                // the candidate): link without reading it back.
                let proven = matches!(record(&mut m, s, cand)?, Some((rh, true)) if rh == h);
                let copied_flag = copied;
                let copied = copied && cand != gc;
                if proven {
                    if copied {
                        m.set_copied(s, cand, hc, false)?;
                    }
                    if let Some(d) = m.dedup.as_mut() {
                        d.stats.links_without_read += 1;
                    }
                } else {
                    // 1. Freeze the candidate: no COPIED, pinned, older I/O finished.
                    if copied {
                        m.set_copied(s, cand, hc, false)?;
                    }
                    m.pin(hc);
                    if copied_flag {
                        // Writes planned while the entry still had COPIED may be writing into
                        // the cluster in place: let them finish. A cluster without COPIED has
                        // had none since the link that cleared it waited here.
                        let barrier = m.next_io();
                        m.barrier_waiters += 1;
                        while m.oldest_io() < barrier {
                            m = self.wait(m);
                        }
                        m.barrier_waiters -= 1;
                    }
                    let io = self.begin_io(&mut m);
                    drop(m);
                    // 2. Compare.
                    let mut theirs = vec![0u8; cs as usize];
                    let read = s.read_at(&mut theirs, host);
                    m = self.lock();
                    if io.end(&mut m) {
                        self.cond.notify_all();
                    }
                    m.unpin(hc);
                    let same = read.is_ok() && theirs == buf && m.rc.get(s, hc)? >= 1;
                    if !same && copied && m.rc.get(s, hc)? == 1 {
                        // Not linked after all: the candidate is its cluster's only user again.
                        m.set_copied(s, cand, hc, true)?;
                    }
                    read?;
                    if !same {
                        self.drop_hint(&mut m, &h, cand)?;
                        continue 'candidates;
                    }
                    // The candidate's record is proven now.
                    set_record(&mut m, s, cand, &h)?;
                }
                // 3. Link.
                let cur = m.entry(s, gc)?;
                let cand_alive = matches!(m.entry(s, cand)?,
                    L2Entry::Normal { host: h2, .. } if h2.0 == host);
                let identical = cur.host_cluster().map(|o| o.0) == Some(host);
                if !identical {
                    m.rc.add(s, hc, 1)?;
                    m.set_entry(
                        s,
                        gc,
                        L2Entry::Normal {
                            host: HostOffset(host),
                            copied: false,
                        },
                    )?;
                    m.release(s, gc, cur)?;
                    let list = m.shared.entry(hc).or_default();
                    if cand_alive {
                        list.insert(cand);
                    }
                    list.insert(gc);
                }
                set_record(&mut m, s, gc, &h)?;
                if let Some(d) = m.dedup.as_mut() {
                    // Both hold the content now: either can serve as the hint later. A few
                    // hints per content are enough to survive rewrites of the first ones; more
                    // would only make every lookup of a popular content longer.
                    if n_cands < MAX_HINTS {
                        d.index.insert(&h, gc);
                    }
                    // Space saved counts links only: an identical rewrite saves a write, not space.
                    if identical {
                        d.stats.identical_rewrites += 1;
                    } else {
                        d.stats.clusters_deduplicated += 1;
                        d.stats.bytes_saved += cs;
                    }
                }
                return Ok(m);
            }
            break;
        }
        if have {
            set_record(&mut m, s, gc, &h)?;
            if let Some(d) = m.dedup.as_mut() {
                d.index.insert(&h, gc);
            }
            return Ok(m);
        }
        // Unique data: in place when the cluster is ours alone, else a new cluster.
        let cur = m.entry(s, gc)?;
        let (host, fresh_alloc) = match cur {
            L2Entry::Normal { host, copied: true } => (host.0, false),
            _ => (m.alloc_data(s, 1)?.0, true),
        };
        if let Err(e) = m.rc.guard(host, cs, 0) {
            if fresh_alloc {
                m.unalloc_data(s, host, 1);
            }
            return Err(e);
        }
        // Recorded and indexed before the data lands, so a concurrent writer of the same content
        // waits for this one (we hold the cluster) and links to it instead of writing a copy.
        if let Err(e) = set_record(&mut m, s, gc, &h) {
            if fresh_alloc {
                m.unalloc_data(s, host, 1);
            }
            return Err(e);
        }
        if let Some(d) = m.dedup.as_mut() {
            d.index.insert(&h, gc);
        }
        m.published.insert(gc);
        let io = self.begin_io(&mut m);
        // A panic before the data is in place must not leave a verified record that says it is.
        let record = RecordGuard { q: self, gc };
        drop(m);
        let w = s.write_at(buf, host);
        let mut m = self.lock();
        std::mem::forget(record);
        if io.end(&mut m) {
            // (Waking under the lock: the waiters look again once we release it.)
            self.cond.notify_all();
        }
        // The data is in the file (or failed): the next flush must sync it.
        m.changes += 1;
        // On any failure from here the record is false: forget it first, so that no link and no
        // "identical rewrite" ever trusts it.
        if let Err(e) = w {
            forget_after_error(&mut m, s, gc);
            if fresh_alloc {
                m.unalloc_data(s, host, 1);
            }
            return Err(e.into());
        }
        if fresh_alloc {
            let linked = m
                .set_entry(
                    s,
                    gc,
                    L2Entry::Normal {
                        host: HostOffset(host),
                        copied: true,
                    },
                )
                .and_then(|()| m.release(s, gc, cur));
            if let Err(e) = linked {
                forget_after_error(&mut m, s, gc);
                return Err(e);
            }
            m.data_before_l2 = true;
        }
        if let Some(d) = m.dedup.as_mut() {
            d.stats.clusters_unique += 1;
        }
        Ok(m)
    }

    /// Deduplicate the data already in the image (offline): each allocated cluster is read and
    /// hashed once; the first copy of a content is indexed where it is, later copies go through
    /// the link path. Open with `dedup_index_at_open: false`: this pass builds the index.
    /// `progress(done, total, bytes_saved)`.
    pub fn dedup_existing(&self, progress: &mut dyn FnMut(u64, u64, u64)) -> Result<DedupStats> {
        let cs = self.g.cluster_size();
        let total = self.g.size / cs;
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
    fn drop_hint(&self, m: &mut Meta, h: &[u8; 32], cand: u64) -> Result<()> {
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
fn record(m: &mut Meta, s: &dyn Storage, gc: u64) -> Result<Option<([u8; 32], bool)>> {
    match m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
        Some(r) => r.get(s, gc),
        None => Ok(None),
    }
}

/// Guest cluster `gc` holds content `h` now (proven this session): record it, and drop the hint
/// of the content it held before.
fn set_record(m: &mut Meta, s: &dyn Storage, gc: u64, h: &[u8; 32]) -> Result<()> {
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
fn forget_after_error(m: &mut Meta, s: &dyn Storage, gc: u64) {
    if let Err(e) = forget(m, s, gc) {
        log::warn!("dedup record of guest cluster {gc} not cleared: {e}");
    }
}

/// Guest cluster `gc` is about to get content we do not hash: forget its record and its hint.
/// Called under the lock before the change is planned, so no record ever outlives the content.
pub(crate) fn forget(m: &mut Meta, s: &dyn Storage, gc: u64) -> Result<()> {
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
