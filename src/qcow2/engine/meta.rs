//! The metadata state behind the engine's one lock: L1 table, L2 cache, refcounts, the frees
//! waiting for their unlink to be durable, and the guest clusters being allocated right now.
//!
//! Write ordering (docs/design.md): refcount blocks, then sync, then L2 tables, then sync, then
//! L1 entries, then sync. A freed cluster's refcount drops only after the L2/L1 change that
//! unlinked it is durable and after every data I/O that was planned before the unlink finished.

use super::clustermap::{ClusterMap, ClusterSet};
use super::l2cache::L2Cache;
use super::loading::Loading;
use super::overlap::kind;
use super::refcount::Refcounts;
use super::sharing::Sharing;
use super::writeback::Writeback;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::{self, L1Entry, L2Entry};
use crate::storage::Storage;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod alloc;
mod flush;
pub(crate) mod frees;
mod persist;
mod resize;

/// Largest L1 table QEMU accepts (32 MiB).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// RAM the L2 cache may use by default.
pub(crate) const L2_CACHE_BYTES: u64 = 16 << 20;

/// L2 tables the cache keeps for a disk of `l1_entries` tables of `cs` bytes: `bytes` of
/// them, but no more than the disk has (and at least 16).
pub(crate) fn l2_cache_cap(bytes: u64, cs: u64, l1_entries: u64) -> usize {
    (bytes / cs).clamp(16, l1_entries.max(16)) as usize
}

/// Fixed facts about an open image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub l2_bits: u32,
    pub version: u32,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    pub fn l1_index(&self, gc: u64) -> usize {
        (gc >> self.l2_bits) as usize
    }
    pub fn l2_index(&self, gc: u64) -> usize {
        (gc & ((1u64 << self.l2_bits) - 1)) as usize
    }
}

/// Counters kept under the lock.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EngineStats {
    pub l2_hits: u64,
    pub l2_misses: u64,
    pub clusters_allocated: u64,
    pub clusters_freed: u64,
    pub cow_clusters: u64,
    pub metadata_flushes: u64,
    /// Flushes the engine ran under the metadata lock because requests outran the flush they
    /// asked for (a cache full of dirty tables past its slack, frees far past their limit).
    pub locked_flushes: u64,
    /// Guest flushes that ran a sync, and those a sync already running or done covered.
    pub flush_syncs: u64,
    pub flushes_without_sync: u64,
    /// Persist before ack: batches of table pieces written before writes returned, and their
    /// bytes.
    pub persist_batches: u64,
    pub persist_bytes: u64,
}

pub(crate) struct Meta {
    pub g: Geometry,
    /// The virtual disk size in bytes (grows with `grow`; `Qcow2::size` mirrors it).
    pub size: u64,
    /// The L2 cache's RAM bound (`OpenOptions::l2_cache_bytes`), for a disk that grows.
    pub l2_cache_bytes: u64,
    pub l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: BTreeSet<usize>,
    l2: L2Cache,
    pub rc: Refcounts,
    /// Host clusters to decrement once the change that unlinked them is durable.
    pending_unlink: Vec<u64>,
    /// Host clusters whose unlink is durable, with the I/O sequence number at that time.
    pending_io: Vec<(u64, u64)>,
    /// Guest clusters with an allocation in flight.
    inflight: ClusterSet,
    /// Guest clusters held by a writer of an image served with dedup (every data write to such
    /// an image holds its clusters, so a held-free cluster has no data I/O in flight).
    held: ClusterSet,
    /// Threads waiting for a held or in-flight guest cluster (a release wakes only when there
    /// are any).
    cluster_waiters: usize,
    io_seq: u64,
    inflight_io: BTreeMap<u64, u32>,
    file_len: u64,
    /// Nothing at or past this offset was ever written since open (it reads as zeros).
    zero_from: u64,
    pub stats: EngineStats,
    /// Lazy refcounts: refcount blocks are written by `write_refcounts`, not by `flush`.
    pub lazy: bool,
    /// The incompatible feature bits as they are on disk.
    pub incompatible: u64,
    /// Writes of the incompatible bits under the lock so far (see `dirty_ahead`).
    incompat_writes: u64,
    /// An overlap check fired: no more metadata or data writes.
    corrupt: bool,
    /// Threads waiting for older I/O to finish (a verifier's barrier): every end of an I/O must
    /// wake them.
    barrier_waiters: usize,
    /// Host clusters being verified (read back), with how many verifiers: their frees wait.
    pinned: ClusterMap<u32>,
    /// Active guest clusters sharing a host cluster: when its refcount falls back to 1 the
    /// survivor gets COPIED again.
    pub sharing: Sharing,
    /// COPIED changed on an entry while its refcount changed between 1 and 2 (a dedup link
    /// cleared it, or a survivor got it back): the next flush writes refcounts and tables
    /// inside a DIRTY window, since no order of those two writes is consistent on its own.
    copied_window: bool,
    /// COPIED changes so far (see `FlushTicket::seen`).
    copied_changes: u64,
    /// A flush cleared DIRTY without a sync (`take_sync_dirty_clear`).
    sync_dirty_clear: bool,
    /// Flushes that wrote L2 or L1 entries to the file so far (see `Qcow2::flush_refcounts`).
    tables_written: u64,
    /// A cluster was linked since the last sync whose data must reach the disk before its L2
    /// entry (it had bytes to copy, or it was not fresh past the end of the file).
    data_before_l2: bool,
    /// New clusters whose data was written without a sync before their entry (they read as
    /// zeros on disk: `alloc_data`), by host cluster, with the flush count when linked
    /// (`note_unsynced`); see `link_needs_sync`.
    unsynced: ClusterMap<u64>,
    /// Too many of those to track: every link until a flush started after this count ends
    /// needs the sync.
    unsynced_all: Option<u64>,
    /// Flushes started so far (`flush_copy`, `flush_begin`), and the most a finished one had
    /// when it started: data that completed before it was counted is durable.
    flushes_started: u64,
    flushes_durable: u64,
    /// Counts changes a guest flush must make durable (links, table changes, completed writes);
    /// a flush whose count was reached by a finished sync needs no sync of its own.
    changes: u64,
    /// L2 tables being read without the lock (`l2_to_load`), by host offset. A load under the
    /// lock takes a table out of here: the reader outside then drops its copy, which may be
    /// older than what the cache has seen since.
    loading: Loading,
    /// What of the tables is newer in memory than in the file (persist before ack).
    pub wb: Writeback,
    /// A flush is writing its copies without the metadata lock (`flush_copy`): the flushes
    /// this lock would otherwise run (a full cache, too many frees) wait for the next time.
    flush_outside: bool,
    /// Set instead of flushing under the lock when the L2 cache is full of dirty tables or
    /// frees pile up: the request that set it (or the next one, or the daemon's timer) runs a
    /// flush without the lock once it is done (`Qcow2::flush_if_wanted`). Shared with the
    /// image, which reads it without the lock.
    pub flush_wanted: Arc<AtomicBool>,
}

/// One more waiter (`enter`) or one fewer.
fn count(waiters: &mut usize, enter: bool) {
    if enter {
        *waiters += 1;
    } else {
        *waiters = waiters.saturating_sub(1);
    }
}

/// How much the file grows at least when allocations pass its end.
const GROW_STEP: u64 = 4 << 20;

impl Meta {
    pub(crate) fn new(
        g: Geometry,
        size: u64,
        l1: Vec<u64>,
        l1_offset: u64,
        mut rc: Refcounts,
        l2_cap: usize,
        file_len: u64,
    ) -> Meta {
        // What the file holds at open counts as allocated: runs allocated past the watermark
        // are kept apart (`Refcounts::ahead`), and the first one must not be.
        rc.note_allocated(0, file_len.div_ceil(g.cluster_size()));
        Meta {
            g,
            size,
            l2_cache_bytes: L2_CACHE_BYTES,
            l1,
            l1_offset,
            l1_dirty: BTreeSet::new(),
            l2: L2Cache::new(l2_cap),
            rc,
            pending_unlink: Vec::new(),
            pending_io: Vec::new(),
            inflight: ClusterSet::default(),
            held: ClusterSet::default(),
            cluster_waiters: 0,
            io_seq: 0,
            inflight_io: BTreeMap::new(),
            file_len,
            zero_from: file_len,
            stats: EngineStats::default(),
            lazy: false,
            corrupt: false,
            barrier_waiters: 0,
            pinned: ClusterMap::default(),
            sharing: Sharing::default(),
            copied_window: false,
            copied_changes: 0,
            sync_dirty_clear: false,
            tables_written: 0,
            loading: Loading::default(),
            incompatible: 0,
            incompat_writes: 0,
            data_before_l2: false,
            unsynced: ClusterMap::default(),
            unsynced_all: None,
            flushes_started: 0,
            flushes_durable: 0,
            changes: 0,
            wb: Writeback::new(false, 512),
            flush_outside: false,
            flush_wanted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A change a guest flush must make durable (a completed write, a table change).
    pub(crate) fn note_change(&mut self) {
        self.changes += 1;
    }

    /// The count of such changes so far (a flush that saw it needs no sync of its own once a
    /// sync that started later has finished).
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// A cluster was linked whose data must be durable before its L2 entry (see `flush_begin`).
    pub(crate) fn data_first(&mut self) {
        self.data_before_l2 = true;
    }

    /// An overlap check fired: no more metadata or data writes.
    pub(crate) fn is_corrupt(&self) -> bool {
        self.corrupt
    }

    /// Guest cluster `gc` has an allocation in flight (other writers of it wait).
    pub(crate) fn allocating(&self, gc: u64) -> bool {
        self.inflight.contains(&gc)
    }

    pub(crate) fn begin_alloc(&mut self, gc: u64) {
        self.inflight.insert(gc);
    }

    /// Ends `begin_alloc`; returns whether threads wait for a cluster (they must be woken).
    #[must_use = "when true, notify the engine's condvar: a writer may wait for this cluster"]
    pub(crate) fn end_alloc(&mut self, gc: u64) -> bool {
        self.inflight.remove(&gc);
        self.cluster_waiters > 0
    }

    /// Guest cluster `gc` is held by a writer for a whole read-modify-write.
    pub(crate) fn is_held(&self, gc: u64) -> bool {
        self.held.contains(&gc)
    }

    pub(crate) fn hold(&mut self, gc: u64) {
        self.held.insert(gc);
    }

    /// Ends `hold`; returns whether threads wait for a cluster (they must be woken).
    #[must_use = "when true, notify the engine's condvar: a writer may wait for this cluster"]
    pub(crate) fn unhold(&mut self, gc: u64) -> bool {
        self.held.remove(&gc);
        self.cluster_waiters > 0
    }

    /// Whether threads wait for a held or allocating guest cluster.
    pub(crate) fn cluster_waiters(&self) -> bool {
        self.cluster_waiters > 0
    }

    /// Count a thread waiting for a cluster (+1) or done waiting (-1).
    pub(crate) fn cluster_wait(&mut self, enter: bool) {
        count(&mut self.cluster_waiters, enter);
    }

    /// Count a thread waiting for older I/O (+1) or done waiting (-1): every end of an I/O
    /// wakes them while there are any.
    pub(crate) fn barrier_wait(&mut self, enter: bool) {
        count(&mut self.barrier_waiters, enter);
    }

    /// Keep the frees of host cluster `hc` waiting while a verifier reads it.
    pub(crate) fn pin(&mut self, hc: u64) {
        *self.pinned.entry(hc).or_default() += 1;
    }

    /// End one `pin` of `hc`.
    pub(crate) fn unpin(&mut self, hc: u64) {
        if let Some(n) = self.pinned.get_mut(&hc) {
            *n -= 1;
            if *n == 0 {
                self.pinned.remove(&hc);
            }
        }
    }

    /// Register a data I/O planned now; frees queued later wait for it.
    pub(crate) fn begin_io(&mut self) -> u64 {
        let s = self.io_seq;
        self.io_seq += 1;
        *self.inflight_io.entry(s).or_default() += 1;
        s
    }

    /// Returns whether threads wait for older I/O to finish (`barrier_waiters`): the caller must
    /// then wake them, or they wait for ever.
    #[must_use = "when true, notify the engine's condvar: a barrier waiter may wait for this I/O"]
    pub(crate) fn end_io(&mut self, seq: u64) -> bool {
        if let Some(n) = self.inflight_io.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.inflight_io.remove(&seq);
            }
        }
        self.barrier_waiters > 0
    }

    fn l1_entry(&self, gc: u64) -> Result<L1Entry> {
        let i = self.g.l1_index(gc);
        let raw = *self
            .l1
            .get(i)
            .ok_or_else(|| Qcow2Error::corrupt("guest cluster beyond the L1 table"))?;
        let e = L1Entry::decode(raw);
        if e.reserved {
            return Err(Qcow2Error::corrupt(format!(
                "L1 entry {i} has reserved bits set ({raw:#x})"
            )));
        }
        if let Some(off) = e.l2_offset {
            if off.0 % self.g.cluster_size() != 0 {
                return Err(Qcow2Error::corrupt(format!(
                    "L2 table offset {off} is not cluster aligned"
                )));
            }
        }
        Ok(e)
    }

    /// Make room in the L2 cache. When every cached table is dirty, the cache takes a few
    /// tables over its cap and asks for a flush that runs without the lock
    /// (`Qcow2::flush_if_wanted`); only past that slack does it write the tables here, under
    /// the lock. Our caller is in the middle of an operation on the tables: the frees that
    /// locked flush made durable are only queued here, not applied (applying one can give a
    /// survivor COPIED back, an edit of the tables under the caller's feet); the next flush
    /// applies them.
    ///
    /// When a flush is writing the tables that are dirty, the cache takes one table more than
    /// its cap for now (the next miss evicts again).
    fn make_room(&mut self, s: &dyn Storage) -> Result<()> {
        while self.l2.full() {
            if !self.l2.evict_clean() {
                if self.flush_outside {
                    // Its copies are dirty until it is done; one table over the cap for now.
                    break;
                }
                if !self.l2.past_slack() {
                    self.flush_wanted.store(true, Ordering::Relaxed);
                    break;
                }
                self.stats.locked_flushes += 1;
                let t = self.flush_begin(s)?;
                let r = s.flush();
                self.finish_flush(s, t, r)?;
                if !self.l2.evict_clean() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn load_l2(&mut self, s: &dyn Storage, off: u64) -> Result<()> {
        if self.l2.contains(off) {
            self.stats.l2_hits += 1;
            return Ok(());
        }
        self.stats.l2_misses += 1;
        // Whoever reads this table without the lock must not insert it after us.
        self.loading.cancel(off);
        let cs = self.g.cluster_size();
        let end = off.saturating_add(cs);
        if end > self.file_len {
            self.file_len = s.len()?;
        }
        if end > self.file_len {
            return Err(Qcow2Error::corrupt(format!(
                "L2 table at {off:#x} lies past the end of the file"
            )));
        }
        self.make_room(s)?;
        let mut buf = vec![0u8; cs as usize];
        s.read_at(&mut buf, off)?;
        self.l2.insert(off, format::decode_table(&buf), false);
        Ok(())
    }

    /// If the L2 table of guest cluster `gc` must be read from the file, register the read and
    /// return its offset and size: the caller reads it without the lock, then `l2_loaded`.
    /// None: the table is cached, being read already, or there is none.
    pub(crate) fn l2_to_load(
        &mut self,
        s: &dyn Storage,
        gc: u64,
    ) -> Result<Option<(u64, u64, u64)>> {
        let Some(off) = self.l1_entry(gc)?.l2_offset else {
            return Ok(None);
        };
        let off = off.0;
        if self.l2.contains(off) || self.loading.contains(off) {
            return Ok(None);
        }
        let cs = self.g.cluster_size();
        if off.saturating_add(cs) > self.file_len {
            self.file_len = s.len()?;
        }
        if off.saturating_add(cs) > self.file_len {
            // `entry` reports it.
            return Ok(None);
        }
        let ticket = self.loading.start(off);
        Ok(Some((off, cs, ticket)))
    }

    /// An L2 table read without the lock (`l2_to_load`) arrives: cached unless a load under
    /// the lock superseded it.
    pub(crate) fn l2_loaded(
        &mut self,
        s: &dyn Storage,
        off: u64,
        ticket: u64,
        buf: Option<&[u8]>,
    ) -> Result<()> {
        if !self.loading.finish(off, ticket) || self.l2.contains(off) {
            return Ok(());
        }
        let Some(buf) = buf else {
            return Ok(());
        };
        self.stats.l2_misses += 1;
        self.make_room(s)?;
        self.l2.insert(off, format::decode_table(buf), false);
        Ok(())
    }

    /// The host offset of guest cluster `gc`'s data cluster, when its table is cached and the
    /// entry is a plain allocated one (no I/O; the cache's order is left alone).
    pub(crate) fn l2_cached_host(&self, gc: u64) -> Option<u64> {
        let i = usize::try_from(gc >> self.g.l2_bits).ok()?;
        let l1 = L1Entry::decode(*self.l1.get(i)?);
        let raw = *self.l2.peek(l1.l2_offset?.0)?.get(self.g.l2_index(gc))?;
        match L2Entry::decode(raw, self.g.cluster_bits) {
            L2Entry::Normal { host, .. } => Some(host.0),
            _ => None,
        }
    }

    /// The L2 entry of guest cluster `gc`.
    pub(crate) fn entry(&mut self, s: &dyn Storage, gc: u64) -> Result<L2Entry> {
        let Some(off) = self.l1_entry(gc)?.l2_offset else {
            return Ok(L2Entry::Unallocated);
        };
        self.load_l2(s, off.0)?;
        let idx = self.g.l2_index(gc);
        let raw = self
            .l2
            .get(off.0)
            .and_then(|t| t.get(idx).copied())
            .unwrap_or(0);
        let e = L2Entry::decode(raw, self.g.cluster_bits);
        match e {
            L2Entry::Invalid(raw) => Err(Qcow2Error::corrupt(format!(
                "L2 entry for guest cluster {gc} is invalid ({raw:#x})"
            ))),
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } if host.0 % self.g.cluster_size() != 0 => Err(Qcow2Error::corrupt(format!(
                "L2 entry for guest cluster {gc} points at unaligned offset {host}"
            ))),
            e => Ok(e),
        }
    }

    /// The offset of a writable (refcount 1, COPIED) L2 table for guest cluster `gc`,
    /// allocating or copying one when needed.
    fn writable_l2(&mut self, s: &dyn Storage, gc: u64) -> Result<u64> {
        let i = self.g.l1_index(gc);
        let e = self.l1_entry(gc)?;
        let cs = self.g.cluster_size();
        match e.l2_offset {
            Some(off) if e.copied => {
                self.load_l2(s, off.0)?;
                Ok(off.0)
            }
            Some(off) => {
                self.load_l2(s, off.0)?;
                if self.rc.get(s, off.0 / cs)? == 1 {
                    // Only the flag was missing.
                    self.l1[i] = L1Entry::encode(off, true);
                    self.l1_dirty.insert(i);
                    self.wb.l1_changed();
                    return Ok(off.0);
                }
                let copy = self
                    .l2
                    .get(off.0)
                    .cloned()
                    .ok_or_else(|| Qcow2Error::corrupt("L2 table left the cache"))?;
                let (new, _) = self.new_l2_cluster(s)?;
                self.rc.map.remove(off.0 / cs, 1, kind::ACTIVE_L2);
                self.make_room(s)?;
                self.l2.insert(new, copy, true);
                self.wb.new_table(new, false);
                self.l1[i] = L1Entry::encode(crate::qcow2::offsets::HostOffset(new), true);
                self.l1_dirty.insert(i);
                self.wb.l1_changed();
                self.pending_unlink.push(off.0 / cs);
                Ok(new)
            }
            None => {
                let (new, fresh) = self.new_l2_cluster(s)?;
                self.make_room(s)?;
                self.l2
                    .insert(new, vec![0u64; 1usize << self.g.l2_bits], true);
                // An empty table in a cluster never written reads as itself if its write is
                // lost: its L1 entry needs no sync before it (see `PersistBatch::write`).
                self.wb.new_table(new, fresh);
                self.l1[i] = L1Entry::encode(crate::qcow2::offsets::HostOffset(new), true);
                self.l1_dirty.insert(i);
                self.wb.l1_changed();
                Ok(new)
            }
        }
    }

    /// Take a cluster for a new L2 table and mark it in the overlap map. Returns its offset
    /// and whether it lies past everything ever written (it reads as zeros until written). The
    /// file is grown to cover it, as for data (`alloc_data`).
    fn new_l2_cluster(&mut self, s: &dyn Storage) -> Result<(u64, bool)> {
        let cs = self.g.cluster_size();
        let zero_from = self.zero_from.max(self.rc.allocations * cs);
        let new = self.rc.alloc(s, 1)? * cs;
        let ahead = self.rc.last_alloc_ahead;
        // A reader outside the lock of an old table that lived here must not insert it.
        self.loading.cancel(new);
        self.stats.clusters_allocated += 1;
        if let Err(e) = self.rc.guard(new, cs, 0) {
            // A cluster with refcount 0 that holds metadata: the refcounts are wrong.
            self.rc.add(s, new / cs, -1)?;
            return Err(e);
        }
        self.rc.map.add(new / cs, 1, kind::ACTIVE_L2);
        self.cover_allocation(s, zero_from, new + cs)?;
        Ok((new, new >= zero_from && !ahead))
    }

    /// Point guest cluster `gc` at `entry` (in the cache; durable at the next flush).
    pub(crate) fn set_entry(&mut self, s: &dyn Storage, gc: u64, entry: L2Entry) -> Result<()> {
        let off = self.writable_l2(s, gc)?;
        let idx = self.g.l2_index(gc);
        let cb = self.g.cluster_bits;
        let t = self
            .l2
            .get(off)
            .ok_or_else(|| Qcow2Error::corrupt("L2 table left the cache"))?;
        t[idx] = entry.encode(cb);
        self.l2.mark_dirty(off);
        self.wb.changed(off, idx);
        self.changes += 1;
        Ok(())
    }

    /// The table change a write of guest clusters `first..=last` depends on that is not in the
    /// file yet (0: none): their entries (a link just made, or the entry an in-place write
    /// went through) must be written before the write returns (`Qcow2::persist`).
    pub(crate) fn ack_need(&self, first: u64, last: u64) -> u64 {
        if !self.wb.on {
            return 0;
        }
        let per = 1u64 << self.g.l2_bits;
        let mut need = 0;
        let mut gc = first;
        while gc <= last {
            let hi = last.min((gc / per + 1) * per - 1);
            let raw = self.l1.get(self.g.l1_index(gc)).copied().unwrap_or(0);
            if let Some(off) = L1Entry::decode(raw).l2_offset {
                let n = self
                    .wb
                    .need(off.0, self.g.l2_index(gc), self.g.l2_index(hi));
                need = need.max(n);
            }
            gc = hi + 1;
        }
        if self.wb.covered(need) {
            0
        } else {
            need
        }
    }
}
