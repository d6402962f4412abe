//! The metadata flush: tables, refcounts and the header written in crash-safe order
//! (docs/design.md, "Write ordering"), the DIRTY protocol of lazy refcounts and of COPIED
//! windows, and the corrupt bit. A child of `meta` so that it works on the core's own fields.

use super::Meta;
use crate::qcow2::engine::overlap::kind;
use crate::qcow2::error::Result;
use crate::qcow2::format::entries::L1E_OFFSET_MASK;
use crate::qcow2::format::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_INCOMPATIBLE};
use crate::qcow2::format::L2Entry;
use crate::storage::Storage;
use std::sync::atomic::Ordering;

/// What `flush_begin` hands to `flush_end`, across the sync that may run without the lock.
pub(crate) struct FlushTicket {
    /// Frees whose unlink the sync makes durable.
    unlink: Vec<u64>,
    /// A COPIED window: DIRTY is cleared after the sync.
    fixup: bool,
    /// For a COPIED window closed by a flush that wrote copies (`flush_copy`): the count of
    /// COPIED changes and of table writes when it copied. DIRTY is cleared only if neither
    /// moved by the end of its last sync (the caller keeps the writeback lock until then).
    /// None: the locked path, whose last sync runs under the metadata lock.
    seen: Option<(u64, u64)>,
    corrupt: bool,
    /// `Meta::flushes_started` when this flush began (see `Meta::flush_durable`).
    started: u64,
}

/// The copies a flush writes without the metadata lock (`Meta::flush_copy`; the caller holds
/// the writeback lock, so no persister writes tables meanwhile), in the order of "Write
/// ordering": refcount blocks, sync, L2 tables, sync, L1 entries.
pub(crate) struct FlushCopies {
    /// Dirty refcount blocks (strict refcounts): (file offset, bytes).
    refcounts: Vec<(u64, Vec<u8>)>,
    /// A cluster was linked since the last sync whose data must be durable before its entry.
    sync_data: bool,
    /// Dirty L2 tables: (file offset, bytes).
    tables: Vec<(u64, Vec<u8>)>,
    /// Dirty L1 entries: (index, file offset, value).
    l1: Vec<(usize, u64, u64)>,
    /// The frees whose unlink these writes carry.
    unlink: Vec<u64>,
    /// A COPIED window: (COPIED changes, table writes) when copied (see `FlushTicket::seen`).
    fixup: Option<(u64, u64)>,
    /// `Meta::flushes_started` when copied.
    started: u64,
}

impl FlushCopies {
    /// Write the copies with the syncs their order needs (the last sync is the caller's).
    pub(crate) fn write(&self, s: &dyn Storage) -> std::io::Result<()> {
        for (off, b) in &self.refcounts {
            s.write_at(b, *off)?;
        }
        if self.tables.is_empty() && self.l1.is_empty() {
            return Ok(());
        }
        if self.sync_data || !self.refcounts.is_empty() {
            s.flush()?;
        }
        for (off, b) in &self.tables {
            s.write_at(b, *off)?;
        }
        if !self.l1.is_empty() {
            if !self.tables.is_empty() {
                s.flush()?;
            }
            for (_, off, v) in &self.l1 {
                s.write_at(&v.to_be_bytes(), *off)?;
            }
        }
        Ok(())
    }
}

impl FlushTicket {
    /// The host clusters whose unlink this flush makes durable (their frees follow it).
    pub(crate) fn unlinked(&self) -> &[u64] {
        &self.unlink
    }

    /// True when the sync must run with the lock held (a COPIED window clears DIRTY after it).
    pub(crate) fn keep_lock(&self) -> bool {
        self.fixup && self.seen.is_none()
    }

    /// True when the caller must keep the writeback lock through the last sync and the sync of
    /// the DIRTY clear (a COPIED window closed by copies; see `seen`).
    pub(crate) fn keep_writeback(&self) -> bool {
        self.fixup && self.seen.is_some()
    }
}

impl Meta {
    /// Make every metadata change durable, in crash-safe order, then apply waiting frees.
    pub(crate) fn flush(&mut self, s: &dyn Storage) -> Result<()> {
        let t = self.flush_begin(s)?;
        let r = s.flush();
        self.flush_end(s, t, r)
    }

    /// `flush_begin` for a caller that holds the writeback lock and writes the metadata
    /// without the metadata lock: copies of what is dirty, in crash-safe order
    /// (`FlushCopies::write`), then `flush_copied`. None when the flush must run under the lock
    /// (a corrupt image). In a COPIED window DIRTY is set first, as in `flush_begin`.
    pub(crate) fn flush_copy(&mut self, s: &dyn Storage) -> Result<Option<FlushCopies>> {
        if self.corrupt {
            return Ok(None);
        }
        self.stats.metadata_flushes += 1;
        self.flushes_started += 1;
        self.flush_wanted.store(false, Ordering::Relaxed);
        let fixup = self.copied_window;
        if fixup && self.incompatible & INCOMPAT_DIRTY == 0 {
            self.set_incompatible(s, self.incompatible | INCOMPAT_DIRTY)?;
        }
        // Every table a persister would still write goes too (those are dirty anyway; a table
        // no longer cached was written before it left).
        for k in self.wb.pending() {
            if self.l2.contains(k) {
                self.l2.mark_dirty(k);
            } else {
                self.wb.forget(k);
            }
        }
        let keys = self.l2.dirty_keys();
        self.guard_tables(&keys)?;
        let tables_dirty = !keys.is_empty() || !self.l1_dirty.is_empty();
        if self.rc.has_dirty()
            && self.lazy
            && tables_dirty
            && self.incompatible & INCOMPAT_DIRTY == 0
        {
            // Tables are about to reach the disk ahead of their refcounts: mark the image
            // dirty first, durably (once per DIRTY window).
            self.set_incompatible(s, self.incompatible | INCOMPAT_DIRTY)?;
        }
        let refcounts = if self.lazy {
            Vec::new()
        } else {
            self.rc.copy_dirty()?
        };
        let tables = self.l2.copy_dirty(keys);
        // These copies hold every change a persister would write.
        self.wb.take();
        let l1: Vec<(usize, u64, u64)> = std::mem::take(&mut self.l1_dirty)
            .into_iter()
            .map(|i| (i, self.l1_offset + i as u64 * 8, self.l1[i]))
            .collect();
        let sync_data = if tables_dirty {
            // The timer must not clear DIRTY over these writes.
            self.tables_written += 1;
            std::mem::take(&mut self.data_before_l2)
        } else {
            false
        };
        self.flush_outside = true;
        Ok(Some(FlushCopies {
            refcounts,
            sync_data,
            tables,
            l1,
            unlink: std::mem::take(&mut self.pending_unlink),
            fixup: fixup.then_some((self.copied_changes, self.tables_written)),
            started: self.flushes_started,
        }))
    }

    /// Overlap checks of the tables at `tables` and of the dirty L1 entries, before a writer
    /// takes copies of them.
    pub(super) fn guard_tables(&self, tables: &[u64]) -> Result<()> {
        let cs = self.g.cluster_size();
        for &k in tables {
            self.rc.guard(k, cs, kind::ACTIVE_L2)?;
        }
        for &i in &self.l1_dirty {
            self.rc
                .guard(self.l1_offset + i as u64 * 8, 8, kind::ACTIVE_L1)?;
        }
        Ok(())
    }

    /// The copies of `flush_copy` were written with result `r`: what was not changed since is
    /// clean (or, on failure, everything is dirty again). The caller runs the last sync and
    /// `flush_end`, as after `flush_begin`.
    pub(crate) fn flush_copied(
        &mut self,
        c: FlushCopies,
        r: std::io::Result<()>,
    ) -> Result<FlushTicket> {
        self.flush_outside = false;
        let ok = r.is_ok();
        self.rc.copies_written(ok);
        self.l2.copies_written(ok);
        // Tables clean by now are marked so above; nothing else to do with the idle list.
        self.wb.done(ok);
        if let Err(e) = r {
            self.l1_dirty.extend(c.l1.iter().map(|&(i, _, _)| i));
            self.data_before_l2 |= c.sync_data;
            self.pending_unlink.extend(c.unlink);
            return Err(e.into());
        }
        for &(_, _, v) in &c.l1 {
            self.wb.linked(v & L1E_OFFSET_MASK);
        }
        Ok(FlushTicket {
            unlink: c.unlink,
            fixup: c.fixup.is_some(),
            seen: c.fixup,
            corrupt: false,
            started: c.started,
        })
    }

    /// Everything of `flush` up to its last sync: metadata written in order (with the syncs
    /// between the steps). The caller runs the last sync, with or without the lock (see
    /// `FlushTicket::keep_lock`), then `flush_end`. Writes linked while the sync runs without
    /// the lock are in dirty tables, written by the next flush.
    pub(crate) fn flush_begin(&mut self, s: &dyn Storage) -> Result<FlushTicket> {
        debug_assert!(!self.flush_outside, "a flush is writing copies");
        self.stats.metadata_flushes += 1;
        self.flushes_started += 1;
        self.flush_wanted.store(false, Ordering::Relaxed);
        if self.corrupt {
            // Nothing more is written into a corrupt image's metadata.
            return Ok(FlushTicket {
                unlink: Vec::new(),
                fixup: false,
                seen: None,
                corrupt: true,
                started: self.flushes_started,
            });
        }
        let l2_dirty = self.l2.has_dirty();
        let l1_dirty = !self.l1_dirty.is_empty();
        let mut sync_first = self.data_before_l2;
        let fixup = self.copied_window;
        if fixup && self.incompatible & INCOMPAT_DIRTY == 0 {
            self.set_incompatible(s, self.incompatible | INCOMPAT_DIRTY)?;
        }
        if self.rc.has_dirty() {
            if !self.lazy {
                self.rc.write_dirty(s)?;
                sync_first = true;
            } else if (l2_dirty || l1_dirty) && self.incompatible & INCOMPAT_DIRTY == 0 {
                // Tables are about to reach the disk ahead of their refcounts: mark the image
                // dirty first, durably.
                self.set_incompatible(s, self.incompatible | INCOMPAT_DIRTY)?;
            }
        }
        // A table whose copy a persister is writing right now is left alone (ours would land
        // first, and its older copy after): only a flush under the writeback lock (which waits
        // for the persister) covers everything. One that skips a table writes no L1 entry,
        // frees nothing and keeps any COPIED window open.
        let mut partial = false;
        if l2_dirty || l1_dirty {
            // Data and refcounts reach the disk before the tables that point at them. With lazy
            // refcounts and only fresh, zero-padded clusters linked, a lost data write reads as
            // the zeros the guest saw before, so the sync is not needed.
            if sync_first {
                s.flush()?;
            }
            self.data_before_l2 = false;
            self.tables_written += 1;
            if l2_dirty {
                let (keys, skipped): (Vec<u64>, Vec<u64>) = self
                    .l2
                    .dirty_keys()
                    .into_iter()
                    .partition(|&k| !self.wb.inflight(k) && !self.l2.is_flushing(k));
                partial = !skipped.is_empty();
                let (rc, cs) = (&self.rc, self.g.cluster_size());
                let r = self
                    .l2
                    .write_tables(s, keys.clone(), |off| rc.guard(off, cs, kind::ACTIVE_L2));
                for k in keys {
                    if !self.l2.is_dirty(k) {
                        self.wb.written(k);
                    }
                }
                r?;
            }
            if l1_dirty && !partial {
                if l2_dirty {
                    s.flush()?;
                }
                let idx: Vec<usize> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
                for (n, &i) in idx.iter().enumerate() {
                    let off = self.l1_offset + i as u64 * 8;
                    let r = self
                        .rc
                        .guard(off, 8, kind::ACTIVE_L1)
                        .and_then(|_| Ok(s.write_at(&self.l1[i].to_be_bytes(), off)?));
                    if let Err(e) = r {
                        // This entry and every one after it are still to be written.
                        self.l1_dirty.extend(&idx[n..]);
                        return Err(e);
                    }
                    self.wb.linked(self.l1[i] & L1E_OFFSET_MASK);
                }
            }
        }
        if partial {
            return Ok(FlushTicket {
                unlink: Vec::new(),
                fixup: false,
                seen: None,
                corrupt: false,
                started: self.flushes_started,
            });
        }
        self.wb.all_written();
        // Only the frees unlinked by what was written above: the sync covers those.
        Ok(FlushTicket {
            unlink: std::mem::take(&mut self.pending_unlink),
            fixup,
            seen: None,
            corrupt: false,
            started: self.flushes_started,
        })
    }

    /// The rest of `flush` once its last sync returned `synced`: clear DIRTY after a COPIED
    /// window, start the frees made durable, apply those no I/O can still touch.
    pub(crate) fn flush_end(
        &mut self,
        s: &dyn Storage,
        t: FlushTicket,
        synced: std::io::Result<()>,
    ) -> Result<()> {
        let corrupt = t.corrupt;
        self.finish_flush(s, t, synced)?;
        if corrupt {
            return Ok(());
        }
        // Decrements stay in memory until the next flush: a crash before then only leaks.
        self.apply_frees(s)
    }

    /// `flush_end` without the hole punches of the clusters freed: see
    /// `Meta::apply_frees_unpunched` (the caller punches the runs returned and calls
    /// `punched`).
    pub(crate) fn flush_end_unpunched(
        &mut self,
        s: &dyn Storage,
        t: FlushTicket,
        synced: std::io::Result<()>,
    ) -> (Result<()>, Vec<(u64, u64)>) {
        let corrupt = t.corrupt;
        if let Err(e) = self.finish_flush(s, t, synced) {
            return (Err(e), Vec::new());
        }
        if corrupt {
            return (Ok(()), Vec::new());
        }
        self.apply_frees_unpunched(s)
    }

    /// `flush_end` without applying the frees (they stay queued with their I/O numbers).
    pub(super) fn finish_flush(
        &mut self,
        s: &dyn Storage,
        t: FlushTicket,
        synced: std::io::Result<()>,
    ) -> Result<()> {
        if let Err(e) = synced {
            self.pending_unlink.extend(t.unlink);
            return Err(e.into());
        }
        self.flush_durable(t.started);
        if t.corrupt {
            return Ok(());
        }
        // Taken after the sync: every I/O planned before the unlink has a smaller number.
        let seq = self.io_seq;
        for c in t.unlink {
            self.pending_io.push((seq, c));
        }
        match (t.fixup, t.seen) {
            (false, _) => {}
            (true, None) => {
                self.copied_window = false;
                if !self.lazy {
                    self.set_incompatible(s, self.incompatible & !INCOMPAT_DIRTY)?;
                }
            }
            (true, Some(seen)) => {
                // Copies written without the lock: the window closes only if nothing COPIED
                // changed and no table reached the file since they were taken; otherwise the
                // next flush closes it. The clear is synced by the caller, which holds the
                // writeback lock until then (no persister writes a table before that sync).
                if (self.copied_changes, self.tables_written) == seen {
                    self.copied_window = false;
                    if !self.lazy && self.clear_dirty_unsynced(s)? {
                        self.sync_dirty_clear = true;
                    }
                }
            }
        }
        self.file_len = s.len()?;
        Ok(())
    }

    /// Rewrite the incompatible feature bits in the header (synced).
    pub(super) fn set_incompatible(&mut self, s: &dyn Storage, bits: u64) -> Result<()> {
        self.incompat_writes += 1;
        s.write_at(&bits.to_be_bytes(), OFF_INCOMPATIBLE)?;
        s.flush()?;
        self.incompatible = bits;
        Ok(())
    }

    /// For a caller that holds the writeback lock, before `flush_copy` (`need`: None) or
    /// `persist_begin` (`need`: Some): the incompatible bits with DIRTY to write and sync
    /// without the metadata lock, when that step would otherwise set DIRTY (synced) under it;
    /// with the count of locked writes of the bits, for `dirty_ahead_done`. The writeback lock
    /// keeps every other writer of tables ahead of refcounts out meanwhile.
    pub(crate) fn dirty_ahead(&self, need: Option<u64>) -> Option<(u64, u64)> {
        if self.corrupt || self.g.version < 3 || self.incompatible & INCOMPAT_DIRTY != 0 {
            return None;
        }
        let wanted = match need {
            Some(n) => !self.wb.covered(n),
            None => {
                let tables = self.l2.has_dirty()
                    || !self.l1_dirty.is_empty()
                    || !self.wb.pending().is_empty();
                self.copied_window || (self.lazy && self.rc.has_dirty() && tables)
            }
        };
        wanted.then_some((self.incompatible | INCOMPAT_DIRTY, self.incompat_writes))
    }

    /// The bits of `dirty_ahead` were written and synced with result `r`. If a write under
    /// the lock changed the bits in the file meanwhile (a CORRUPT mark, a locked flush's own
    /// set), either may have landed last, ours included when it failed part way: the bits
    /// memory holds are written again, under the lock, with DIRTY when ours succeeded (a
    /// CORRUPT mark is never lost).
    pub(crate) fn dirty_ahead_done(
        &mut self,
        s: &dyn Storage,
        (bits, writes): (u64, u64),
        r: std::io::Result<()>,
    ) -> Result<()> {
        if self.incompat_writes != writes {
            let dirty = if r.is_ok() { INCOMPAT_DIRTY } else { 0 };
            // (A CORRUPT mark whose own write failed half way is put in too.)
            let corrupt = if self.corrupt { INCOMPAT_CORRUPT } else { 0 };
            self.set_incompatible(s, self.incompatible | dirty | corrupt)?;
            return Ok(r?);
        }
        r?;
        debug_assert_eq!(self.incompatible | INCOMPAT_DIRTY, bits);
        self.incompatible = bits;
        Ok(())
    }

    /// Set or clear COPIED on guest cluster `gc` if it still points at host cluster `hc`.
    pub(crate) fn set_copied(
        &mut self,
        s: &dyn Storage,
        gc: u64,
        hc: u64,
        copied: bool,
    ) -> Result<()> {
        let cs = self.g.cluster_size();
        if let L2Entry::Normal { host, copied: c } = self.entry(s, gc)? {
            if host.0 / cs == hc && c != copied {
                self.set_entry(s, gc, L2Entry::Normal { host, copied })?;
                // The refcount moves with the flag (a link to it, or the last other reference
                // gone): the flush that writes both does it inside a DIRTY window.
                self.copied_window = true;
                self.copied_changes += 1;
            }
        }
        Ok(())
    }

    /// True once (then false) when a flush cleared DIRTY without a sync: the caller syncs
    /// before it lets the writeback lock go.
    pub(crate) fn take_sync_dirty_clear(&mut self) -> bool {
        std::mem::take(&mut self.sync_dirty_clear)
    }

    /// Sequence number of the oldest data I/O still in flight.
    pub(crate) fn oldest_io(&self) -> u64 {
        self.inflight_io.keys().next().copied().unwrap_or(u64::MAX)
    }

    /// The sequence number the next I/O will get.
    pub(crate) fn next_io(&self) -> u64 {
        self.io_seq
    }

    /// Set the CORRUPT bit (synced) after an overlap check fired; later writes are refused.
    /// Returns false when the image was marked already.
    pub(crate) fn mark_corrupt(&mut self, s: &dyn Storage) -> Result<bool> {
        if std::mem::replace(&mut self.corrupt, true) {
            return Ok(false);
        }
        if self.g.version >= 3 && self.incompatible & INCOMPAT_CORRUPT == 0 {
            self.set_incompatible(s, self.incompatible | INCOMPAT_CORRUPT)?;
        }
        Ok(true)
    }

    /// The count of flushes that wrote table entries to the file.
    pub(crate) fn tables_written(&self) -> u64 {
        self.tables_written
    }

    /// True while a COPIED change waits for the flush that closes its DIRTY window.
    pub(crate) fn copied_window_open(&self) -> bool {
        self.copied_window
    }

    /// Copies of the refcount blocks changed in memory, (file offset, bytes), for the timer
    /// to write without the metadata lock; its caller holds the writeback lock, and the
    /// flushes this lock would run meanwhile wait for the next time (`flush_outside`), as
    /// while a flush writes its copies. End with `refcount_copies_written`.
    pub(crate) fn copy_dirty_refcounts(&mut self) -> Result<Vec<(u64, Vec<u8>)>> {
        let copies = self.rc.copy_dirty()?;
        // The caller syncs without the lock: a flush or persister that writes tables before
        // that sync must sync first, or a table could reach the disk ahead of these refcounts
        // (found by tests/engine_crash_concurrent.rs with torn sectors).
        self.data_before_l2 = true;
        self.flush_outside = true;
        Ok(copies)
    }

    /// The copies of `copy_dirty_refcounts` are in the file (`ok`) or not: the blocks not
    /// changed since become clean; on failure all stay dirty.
    pub(crate) fn refcount_copies_written(&mut self, ok: bool) {
        self.flush_outside = false;
        self.rc.copies_written(ok);
    }

    /// Clear the DIRTY bit in the header without a sync (the caller syncs, outside the lock),
    /// for the flush that closes a COPIED window of strict refcounts: every table entry in the
    /// file then has its refcount in the file.
    pub(crate) fn clear_dirty_unsynced(&mut self, s: &dyn Storage) -> Result<bool> {
        if self.corrupt || self.incompatible & INCOMPAT_DIRTY == 0 {
            return Ok(false);
        }
        let bits = self.incompatible & !INCOMPAT_DIRTY;
        self.incompat_writes += 1;
        s.write_at(&bits.to_be_bytes(), OFF_INCOMPATIBLE)?;
        self.incompatible = bits;
        Ok(true)
    }

    /// For the refcount timer, holding the writeback lock, once its refcount blocks are in
    /// the file and synced: the bits to write without DIRTY, and the count of locked writes of
    /// them, when DIRTY may be cleared (set, no corruption). Until `clear_ahead_done` the
    /// locked flushes wait (`flush_outside`) and memory keeps DIRTY, so no table reaches the
    /// file meanwhile: the writeback lock keeps out the flushes and persisters that write
    /// without this lock, and the ones under it see a flush writing.
    pub(crate) fn clear_ahead(&mut self) -> Option<(u64, u64)> {
        if self.corrupt || self.incompatible & INCOMPAT_DIRTY == 0 || self.flush_outside {
            return None;
        }
        self.flush_outside = true;
        Some((self.incompatible & !INCOMPAT_DIRTY, self.incompat_writes))
    }

    /// The bits of `clear_ahead` were written (not synced) with result `r`; true when DIRTY
    /// is now clear in memory too (the caller syncs). If a write under the lock changed the
    /// bits meanwhile (a CORRUPT mark), either may have landed last: the bits memory holds,
    /// DIRTY still among them, are written again under the lock.
    pub(crate) fn clear_ahead_done(
        &mut self,
        s: &dyn Storage,
        (bits, writes): (u64, u64),
        r: std::io::Result<()>,
    ) -> Result<bool> {
        self.flush_outside = false;
        if self.incompat_writes != writes {
            let corrupt = if self.corrupt { INCOMPAT_CORRUPT } else { 0 };
            self.set_incompatible(s, self.incompatible | corrupt)?;
            r?;
            return Ok(false);
        }
        if let Err(e) = r {
            // Part of it may have landed: DIRTY again, from memory (which still has it).
            self.set_incompatible(s, self.incompatible)?;
            return Err(e.into());
        }
        self.incompat_writes += 1;
        self.incompatible = bits;
        Ok(true)
    }

    /// Write every held-back refcount change, sync, and clear the DIRTY bit.
    pub(crate) fn write_refcounts(&mut self, s: &dyn Storage) -> Result<()> {
        if self.corrupt {
            return Ok(());
        }
        // Tables first: no refcount written below may run ahead of a COPIED flag it implies
        // (a flush can give a survivor COPIED back; the next one writes it).
        self.flush(s)?;
        if self.copied_window {
            self.flush(s)?;
        }
        if self.rc.has_dirty() {
            self.rc.write_dirty(s)?;
            s.flush()?;
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            self.set_incompatible(s, self.incompatible & !INCOMPAT_DIRTY)?;
        }
        Ok(())
    }
}
