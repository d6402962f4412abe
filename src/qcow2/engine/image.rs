//! An open image: the `Qcow2` handle (its lock, its state, the paths' shared fields), its
//! life cycle after open (flush, lazy refcounts, close) and the block-device trait. Opening is
//! `open.rs`; the I/O paths are `io.rs`, `zero.rs`, `backing.rs` and `dedup/`.

use super::dedup::lifecycle;
use super::group;
use super::meta::frees::punch_runs;
use super::meta::{EngineStats, Geometry};
use super::overlap::OverlapMode;
use super::state::State;
use crate::block::{BlockDevice, BlockError, DirectPlan, Direction};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::dedup::DedupMode;
use crate::qcow2::format::header::OFF_INCOMPATIBLE;
use crate::qcow2::format::Header;
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Lazy refcounts: None follows the image's compatible bit (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// Which metadata every write is checked against.
    pub overlap_check: OverlapMode,
    /// Most RAM the overlap map may take at open (None: 64 MiB). Past it the snapshots' tables
    /// (the only kind not bounded by the disk size) are not tracked, and a warning says so.
    pub overlap_map_cap: Option<usize>,
    /// Deduplication (qcow2 v3 images only): Some(true) inline, Some(false) off, None follows
    /// the image's recorded setting (`dedup_mode` overrides).
    pub dedup: Option<bool>,
    /// Deduplication mode (off, inline, background); overrides `dedup`.
    pub dedup_mode: Option<DedupMode>,
    /// With dedup: build the hint index at open by hashing every allocated cluster (true for
    /// `serve`; offline dedup builds it as it goes). Default (None): true.
    pub dedup_index_at_open: Option<bool>,
    /// With dedup: when the index must be rebuilt from the data, open without hashing it and
    /// leave that to the dedup worker (`start_dedup_worker`), which hashes while the image is
    /// served (`serve` does this). Default: hash everything in the open.
    pub dedup_rebuild_in_background: bool,
    /// With dedup: most RAM for cached index clusters (the persistent per-cluster records).
    /// Default (None): `DEFAULT_RECORD_CACHE_BYTES`.
    pub dedup_cache_bytes: Option<u64>,
    /// Open the image (and its backing files) with O_DIRECT, bypassing the host page cache
    /// (`serve --cache none|directsync`).
    pub direct: bool,
    /// What a write has made of its metadata when it returns (`serve --ack-durability`).
    pub ack_durability: AckDurability,
    /// Most RAM for cached L2 tables (QEMU's `l2-cache-size`), at least 16 tables whatever
    /// the cluster size. Default (None): 16 MiB.
    pub l2_cache_bytes: Option<u64>,
    /// Told how the repair of a dirty image (at a read-write open) goes. None: not told.
    pub repair_progress: Option<ProgressHook>,
}

/// Told the progress of a long job inside the engine: `(done, total)` of the current pass
/// (a repair walks the image more than once; a new total starts a new pass), called on the
/// thread doing the job, at most a few hundred times per pass. The engine knows nothing of
/// what shows it (a bar, log lines).
#[derive(Clone)]
pub struct ProgressHook(Arc<dyn Fn(u64, u64) + Send + Sync>);

impl ProgressHook {
    pub fn new(f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        ProgressHook(Arc::new(f))
    }

    pub fn report(&self, done: u64, total: u64) {
        (self.0)(done, total)
    }
}

impl std::fmt::Debug for ProgressHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressHook")
    }
}

/// What a completed write guarantees about the metadata it depends on (its L2 entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckDurability {
    /// Written into the image file before the write returns (no sync): a crash of the process
    /// loses no completed write, since the host keeps what was written (docs/design.md,
    /// "Acknowledged writes outlive the process"). qcow2 v2 images have no DIRTY bit: there a
    /// write that changed metadata returns after a flush.
    #[default]
    File,
    /// Kept in memory until the next flush (or a timer, eviction, close): a crash of the
    /// process loses completed writes that were not flushed.
    Memory,
}

impl OpenOptions {
    pub fn read_only(read_only: bool) -> Self {
        OpenOptions {
            read_only,
            ..Default::default()
        }
    }
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(super) storage: Arc<dyn Storage>,
    pub(super) meta: Mutex<State>,
    pub(super) cond: Condvar,
    pub(super) g: Geometry,
    /// The virtual disk size in bytes: `Meta::size`, readable without the lock. It grows (by
    /// `resize`) only after the L1 table and the header cover the new size.
    pub(super) size: AtomicU64,
    /// The header as it was read at open (its size and L1 fields may be older).
    pub(super) header: Header,
    pub(super) backing: Option<Arc<dyn BlockDevice>>,
    pub(super) read_only: bool,
    pub(super) closed: AtomicBool,
    pub(super) on_corrupt: Mutex<Option<CorruptionListener>>,
    pub(super) dedup_paused: AtomicBool,
    /// Dedup state exists (fixed at open): the write path asks this, not the locked state.
    pub(super) dedup_on: bool,
    /// `DedupMode::bits` of the current mode.
    pub(super) dedup_mode: AtomicU32,
    /// The background dedup worker waits here for work.
    pub(super) work_cond: Condvar,
    pub(super) worker_stop: AtomicBool,
    /// Guest writes so far (the background worker yields while this moves).
    pub(super) guest_writes: AtomicU64,
    /// Concurrent guest flushes share one sync; a flush with nothing new costs none.
    pub(super) group: group::GroupCommit,
    /// Tries at the metadata lock before sleeping on it (0 on a single CPU: see `lock`).
    pub(super) lock_spins: u32,
    /// The writeback lock: one persister at a time writes table pieces, and a full flush waits
    /// for it (`engine/persist.rs`). Taken before the metadata lock, never while holding it.
    pub(super) wb: Mutex<()>,
    /// `Meta::flush_wanted`, read without the lock.
    pub(super) flush_wanted: Arc<AtomicBool>,
}

/// Tries at a busy metadata lock before sleeping on it, each followed by a few spin hints:
/// about 8 µs in all on the test VM (more on CPUs with a slow pause), longer than a request ever
/// holds the lock (about 1-3 µs).
pub(super) const LOCK_SPINS: u32 = 100;

/// Called once when an overlap check marks the image corrupt, with a description.
pub type CorruptionListener = Box<dyn Fn(&str) + Send + Sync>;

impl Qcow2 {
    /// The header as it was read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The virtual disk size in bytes (it grows with `resize`).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.g.cluster_size()
    }

    /// Counters of the metadata layer.
    pub fn stats(&self) -> EngineStats {
        let mut st = self.lock().stats;
        (st.flush_syncs, st.flushes_without_sync) = self.group.counts();
        st
    }

    /// The metadata lock. A busy lock is tried again for a short while before the thread sleeps:
    /// queue threads hold it for a microsecond or two per request, while a futex sleep and the
    /// wake-up that ends it cost far more (on a VM, an inter-processor interrupt each). With two
    /// queues writing unique data with inline dedup, 75% of the daemon's context switches were
    /// sleeps on this lock; spinning first gave 5-20% more IOPS in every dedup mode and with
    /// dedup off (8 GiB image, 4 KiB clusters, QD32, 2 queues). (std's `Mutex` spins too, but
    /// for about 100 checks only, and not at all once a sleeper is queued.) The re-lock after a
    /// condvar wait does not spin: those waits are for I/O, not for a short lock section.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        use std::sync::TryLockError;
        for _ in 0..self.lock_spins {
            match self.meta.try_lock() {
                Ok(g) => return g,
                // A panic under the lock fails only its request (the request layer catches
                // it, the guards undo its registrations): the state stays usable.
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    for _ in 0..8 {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until some held or in-flight guest cluster is released (counted, so that a release
    /// wakes threads only when there are any).
    pub(crate) fn wait_cluster<'a>(&self, mut m: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        m.cluster_wait(true);
        let mut m = self.wait(m);
        m.cluster_wait(false);
        m
    }

    /// Run the flush the engine asked for instead of flushing under the lock (a cache full of
    /// dirty tables, many frees waiting; see `Meta::flush_wanted`). Called by a request once
    /// it holds nothing (no lock, no guest cluster: the `BlockDevice` calls, not the engine's
    /// own reads and writes, which may run with a cluster held), and by the daemon's timer;
    /// never after close. A failure is
    /// logged, not returned: the request that calls this is done, and the next flush (the
    /// guest's own included) writes the same tables again and reports it.
    pub fn flush_if_wanted(&self) {
        // One request takes the job; the others go on (a failed flush is asked for again by
        // the next request that finds the cache full).
        if self.read_only
            || self.closed.load(Ordering::Relaxed)
            || !self.flush_wanted.load(Ordering::Relaxed)
            || !self.flush_wanted.swap(false, Ordering::Relaxed)
        {
            return;
        }
        if let Err(e) = self.flush_all() {
            log::warn!("the flush the metadata cache asked for failed: {e}");
        }
    }

    /// Make everything durable that completed before the call (data and metadata). Concurrent
    /// calls share one sync, which runs without the metadata lock (see `group`).
    pub fn flush_all(&self) -> Result<()> {
        let want = self.lock().changes();
        let r = self.group.flush(want, || {
            let s = self.storage.as_ref();
            // No persister is writing table pieces while this flush writes tables: it covers
            // everything (see `Meta::flush_begin`). Its writes and inner syncs run without
            // the metadata lock, on copies, unless a COPIED window needs the locked order.
            let wb = self.wb_lock();
            self.dirty_ahead(None)?;
            let mut m = self.lock();
            let sampled = m.changes();
            let t = match m.flush_copy(s)? {
                Some(c) => {
                    drop(m);
                    let r = c.write(s);
                    m = self.lock();
                    m.flush_copied(c, r)?
                }
                None => m.flush_begin(s)?,
            };
            // A COPIED window closed by copies keeps the writeback lock through the last sync
            // and the sync of the DIRTY clear: no persister may put a table piece into the
            // file between them.
            let wb = t.keep_writeback().then_some(wb);
            if t.keep_lock() {
                drop(wb);
                let r = s.flush();
                m.flush_end(s, t, r)?;
            } else {
                drop(m);
                let r = s.flush();
                // The tables and refcount blocks the frees below need, read without the lock.
                let m = self.load_free_tables(self.lock(), t.unlinked());
                let mut m = self.load_free_refcounts(m, t.unlinked());
                let (r, runs) = m.flush_end_unpunched(s, t, r);
                let sync_clear = m.take_sync_dirty_clear();
                drop(m);
                let cleared = if sync_clear { s.flush() } else { Ok(()) };
                drop(wb);
                // The holes of the clusters freed are punched without the lock (the allocator
                // skips those clusters meanwhile), then synced: a write into a durable hole
                // needs no sync of its data before its entry (`Refcounts::holes`), which on a
                // disk that discards and rewrites saves a sync per allocating write.
                if !runs.is_empty() {
                    let cs = self.g.cluster_size();
                    let punched = punch_runs(s, cs, &runs);
                    // Clusters smaller than the O_DIRECT alignment share blocks that a
                    // neighbour's read-modify-write may have put back meanwhile: no holes.
                    let aligned = s.direct_fd().is_none_or(|(_, a)| cs >= a);
                    let durable = aligned && !punched.is_empty() && s.flush().is_ok();
                    let durable = if durable { &punched[..] } else { &[] };
                    self.lock().punched(&runs, durable);
                }
                r?;
                cleared?;
            }
            Ok(sampled)
        });
        self.note_error(r)
    }

    /// Be told when an overlap check marks the image corrupt (for QMP events).
    pub fn set_corruption_listener(&self, f: CorruptionListener) {
        *self.on_corrupt.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// True once an overlap check has fired: writes are refused, reads still work.
    pub fn is_corrupt(&self) -> bool {
        self.lock().is_corrupt()
    }

    /// After an error: if it is an overlap, set the CORRUPT bit, log it and tell the listener.
    pub(crate) fn note_error<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e @ Qcow2Error::Overlap { .. }) = &r {
            let msg = e.to_string();
            // Once: a write-zeroes passes its error through here twice, and concurrent
            // writers may hit overlaps at the same time.
            match self.lock().mark_corrupt(self.storage.as_ref()) {
                Ok(false) => return r,
                Ok(true) => {}
                Err(e2) => log::error!("could not set the corrupt bit: {e2}"),
            }
            log::error!("{msg}; marking the image corrupt (reads go on, writes are refused)");
            if let Some(f) = self
                .on_corrupt
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                f(&msg);
            }
        }
        r
    }

    /// Write the refcount changes that lazy refcounts held back and clear the DIRTY bit. The
    /// daemon calls this from its timer. Its writes and syncs run without the metadata lock,
    /// so other queues go on meanwhile:
    /// 1. a flush (tables, data, frees) through the group commit;
    /// 2. under the writeback lock, copies of the dirty refcount blocks are taken under the
    ///    metadata lock (the count of table writes is noted) and written without it;
    /// 3. sync, without the lock;
    /// 4. under the writeback lock, DIRTY is cleared only if no flush wrote table entries
    ///    since 2: then every entry in the file has its refcount in the file. The header is
    ///    written and synced without the metadata lock; the locked flushes wait for it
    ///    (`Meta::clear_ahead`). Otherwise the next tick tries again. A flush that later
    ///    writes tables ahead of their refcounts sets DIRTY first, as always.
    pub fn flush_refcounts(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let s = self.storage.as_ref();
        self.flush_all()?;
        let seen = {
            let _wb = self.wb_lock();
            let (copies, seen) = {
                let mut m = self.lock();
                if m.is_corrupt() {
                    return Ok(());
                }
                if m.copied_window_open() {
                    // A COPIED change came in since: the locked path closes its window.
                    return self.note_error(m.write_refcounts(s));
                }
                (m.copy_dirty_refcounts()?, m.tables_written())
            };
            let r = copies.iter().try_for_each(|(off, b)| s.write_at(b, *off));
            self.lock().refcount_copies_written(r.is_ok());
            r?;
            seen
        };
        s.flush()?;
        let wb = self.wb_lock();
        let ahead = {
            let mut m = self.lock();
            if m.tables_written() != seen || m.copied_window_open() {
                return Ok(());
            }
            match m.clear_ahead() {
                Some(ahead) => ahead,
                None => return Ok(()),
            }
        };
        let r = s.write_at(&ahead.0.to_be_bytes(), OFF_INCOMPATIBLE);
        if self.lock().clear_ahead_done(s, ahead, r)? {
            // A flush that sets DIRTY again from here on syncs its own write after ours.
            drop(wb);
            s.flush()?;
        }
        Ok(())
    }

    /// True when lazy refcounts are in use.
    pub fn lazy_refcounts(&self) -> bool {
        self.lock().lazy
    }

    /// True when the daemon should call `flush_refcounts` periodically: lazy refcounts, or
    /// persist before ack on a v3 image (its DIRTY window ends there).
    pub fn needs_refcount_timer(&self) -> bool {
        let m = self.lock();
        m.lazy || (m.wb.on && self.g.version >= 3)
    }

    /// Close cleanly: all metadata written and synced. Later calls do nothing.
    pub fn close(&self) -> Result<()> {
        if self.read_only || self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.wake_worker();
        let _wb = self.wb_lock();
        let mut m = self.lock();
        // The background worker stops before its next cluster; let it finish the one in hand.
        while m.dedup.as_ref().is_some_and(|d| d.worker_busy) {
            m = self.wait(m);
        }
        let s = self.storage.as_ref();
        // Flushes the tables, applies the frees they made durable, writes every refcount
        // (those decrements included, so the image has no leaks) and clears DIRTY.
        m.write_refcounts(s)?;
        let corrupt = m.is_corrupt();
        if let Some(d) = m.dedup.as_mut() {
            if !corrupt {
                let (mode, paused) = (self.dedup_mode(), self.dedup_paused());
                lifecycle::close(s, d, self.g.cluster_bits, mode, paused)?;
            }
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            log::error!("closing the image failed: {e}");
        }
    }
}

impl BlockDevice for Qcow2 {
    fn capacity(&self) -> u64 {
        self.size()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> std::result::Result<(), BlockError> {
        let r = self.read(offset, bufs);
        self.flush_if_wanted();
        Ok(r?)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
    ) -> std::result::Result<(), BlockError> {
        let r = self.write(offset, bufs);
        self.flush_if_wanted();
        Ok(r?)
    }
    fn flush(&self) -> std::result::Result<(), BlockError> {
        Ok(self.flush_all()?)
    }
    fn discard(&self, offset: u64, len: u64) -> std::result::Result<(), BlockError> {
        let r = self.discard_range(offset, len);
        self.flush_if_wanted();
        Ok(r?)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> std::result::Result<(), BlockError> {
        let r = self.write_zeroes_range(offset, len, unmap);
        self.flush_if_wanted();
        Ok(r?)
    }
    fn close(&self) -> std::result::Result<(), BlockError> {
        Ok(Qcow2::close(self)?)
    }
    fn plan_direct(
        &self,
        dir: Direction,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Option<DirectPlan>, BlockError> {
        Ok(self.plan_direct_io(dir, offset, len)?)
    }
    fn end_direct(&self, seq: u64, dir: Direction, ok: bool) {
        self.end_direct_io(seq, dir, ok)
    }
    fn resize(&self, new_size: u64) -> std::result::Result<(), BlockError> {
        Qcow2::resize(self, new_size).map_err(|e| match e {
            Qcow2Error::Invalid(m) | Qcow2Error::Unsupported(m) => BlockError::Invalid(m),
            Qcow2Error::MarkedCorrupt => BlockError::Invalid(e.to_string()),
            e => e.into(),
        })
    }
}
