//! A larger refcount table made without the metadata lock, before the allocator needs it.
//!
//! The steps (each `TableStep` runs without the lock, `table_step_done` takes the result
//! under it):
//! 1. `table_to_grow` (lock): places the new blocks and the table, as a growth under the lock
//!    would, at the start of the area the first missing block covers. The allocator skips the
//!    blocks' whole range until the growth ends.
//! 2. Writes (no lock): the new blocks and the new table (a copy of the old one with the new
//!    blocks' entries), then one sync.
//! 3. `table_step_done` (lock): an entry the old table got meanwhile (a block created under the
//!    lock) is copied into the new table by one more write step. When there is none, every
//!    entry written into the old table from now on also goes into the new one, before its sync.
//! 4. The header switch (no lock): written and synced under the `HeaderSlot` mutex, only while
//!    the slot still allows this growth.
//! 5. `table_step_done` (lock): the new table replaces the old in memory, which is freed.
//!
//! A growth under the lock that comes while this one runs (the allocator outran it) settles
//! it first (`settle_growth`): it applies it when its header is on disk, and cancels it
//! otherwise; a cancelled growth's clusters stay skipped until its steps come back. Its
//! clusters were counted as allocated (`note_allocated`) from step 1, so that a cancelled or
//! failed growth's bytes are never taken for zeros.

use super::growth_state::{Growth, TableStep, Work};
use super::Refcounts;
use crate::qcow2::engine::overlap::kind;
use crate::qcow2::error::Result;
use crate::qcow2::format::{self, refblock};
use crate::storage::Storage;

impl Refcounts {
    /// The blocks a growth without the lock creates (`lo..hi`), if one runs.
    pub(super) fn growth_blocks(&self) -> Option<(u64, u64)> {
        self.growing.as_ref().map(|g| (g.b, g.b + g.k))
    }

    /// Whether block `b` is one a growth without the lock is creating.
    pub(super) fn in_growth(&self, b: u64) -> bool {
        self.growing
            .as_ref()
            .is_some_and(|g| b >= g.b && b - g.b < g.k)
    }

    /// The first step of a table growth to run without the lock, when the allocator is close
    /// to the end of what the table covers (where `block_to_create` declines); or the header
    /// step of a growth whose header write failed before. None otherwise.
    pub(crate) fn table_to_grow(&mut self) -> Option<TableStep> {
        if let Some(g) = &mut self.growing {
            if g.header_pending && !g.busy && !g.cancelled {
                g.busy = true;
                return Some(self.header_step());
            }
            return None;
        }
        if self.creating.is_some() {
            return None;
        }
        let len = self.table.len() as u64;
        let b = self.block_due()?;
        // Only the table's last entry, or past it: `block_to_create` takes the others.
        if b + 1 < len || (b < len && self.table.get(b as usize) != Some(&0)) {
            return None;
        }
        let plan = self.growth_plan(b).ok()?;
        let (k, t_clusters, at) = plan;
        let cs = self.cs();
        let used = k + t_clusters;
        let base = at.checked_mul(cs)?;
        if self.guard(base, used.checked_mul(cs)?, 0).is_err() {
            return None;
        }
        let blocks = self.new_blocks(b, k, at, used);
        let entries = t_clusters * (cs / 8);
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for j in 0..k {
            table[(b + j) as usize] = base + j * cs;
        }
        let table_off = base + k * cs;
        let mut writes: Vec<(u64, Vec<u8>)> = blocks
            .iter()
            .enumerate()
            .map(|(j, d)| (base + j as u64 * cs, d.clone()))
            .collect();
        writes.push((table_off, format::encode_table(&table)));
        self.next_growth += 1;
        let id = self.next_growth;
        self.growing = Some(Growth {
            id,
            b,
            k,
            at,
            table_off,
            t_clusters,
            entries,
            blocks,
            written: self.table.clone(),
            header_pending: false,
            busy: true,
            cancelled: false,
        });
        // Whatever happens to the growth, these clusters do not read as zeros any more.
        self.note_allocated(at, used);
        Some(TableStep {
            id,
            work: Work::Writes(writes),
            slot: self.header_slot.clone(),
            end: (at + used) * cs,
        })
    }

    fn header_step(&self) -> TableStep {
        let (id, off, n) = self
            .growing
            .as_ref()
            .map_or((0, 0, 0), |g| (g.id, g.table_off, g.t_clusters));
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&off.to_be_bytes());
        hdr[8..].copy_from_slice(&(n as u32).to_be_bytes());
        TableStep {
            id,
            work: Work::Header(hdr),
            slot: self.header_slot.clone(),
            end: 0,
        }
    }

    /// A step of `table_to_grow` ran (`ok`) or failed: the next step, if any.
    pub(crate) fn table_step_done(
        &mut self,
        s: &dyn Storage,
        step: TableStep,
        ok: bool,
    ) -> Result<Option<TableStep>> {
        let Some(g) = self.growing.as_mut().filter(|g| g.id == step.id) else {
            // Applied by a growth under the lock meanwhile.
            return Ok(None);
        };
        g.busy = false;
        if g.cancelled || (!ok && !g.header_pending) {
            if !g.cancelled {
                log::warn!(
                    "growing the refcount table without the lock failed; left to the allocator"
                );
            }
            self.end_growth();
            return Ok(None);
        }
        if !ok {
            // The header write failed: it is tried again by the next `table_to_grow`, and
            // entries keep going into both tables until then.
            return Ok(None);
        }
        if matches!(step.work, Work::Header(_)) {
            if let Some(g) = self.growing.take() {
                self.apply_growth(s, g)?;
            }
            return Ok(None);
        }
        // Entries the old table got since the new one was written.
        let mut late = Vec::new();
        for (i, (&now, was)) in self.table.iter().zip(g.written.iter_mut()).enumerate() {
            if now != *was {
                *was = now;
                late.push((g.table_off + i as u64 * 8, now.to_be_bytes().to_vec()));
            }
        }
        g.busy = true;
        if !late.is_empty() {
            return Ok(Some(TableStep {
                id: g.id,
                work: Work::Writes(late),
                slot: self.header_slot.clone(),
                // Inside the table written by the first step: the file holds it.
                end: 0,
            }));
        }
        g.header_pending = true;
        let id = g.id;
        self.header_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allowed = Some(id);
        Ok(Some(self.header_step()))
    }

    /// A growth without the lock that is over (failed or cancelled): the allocator may use its
    /// blocks' range again (it creates them when it needs them).
    fn end_growth(&mut self) {
        if let Some(g) = self.growing.take() {
            self.free_hint = self.free_hint.min(g.b * self.epb);
        }
    }

    /// Where block `b` of a new table's entries goes too, while a growth waits for its header
    /// switch (the old table stays the one on disk until then).
    pub(super) fn mirror_entry(&self, b: u64) -> Option<u64> {
        self.growing
            .as_ref()
            .filter(|g| g.header_pending && !g.cancelled && b < g.written.len() as u64)
            .map(|g| g.table_off + b * 8)
    }

    /// Before a growth under the lock: a growth without it whose header is on disk is applied
    /// (the caller then builds on its table); one whose header is not is cancelled, and its
    /// header write will not happen.
    pub(super) fn settle_growth(&mut self, s: &dyn Storage) -> Result<()> {
        let Some(g) = self.growing.as_mut().filter(|g| !g.cancelled) else {
            return Ok(());
        };
        let mut slot = self.header_slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.written == Some(g.id) {
            drop(slot);
            if let Some(g) = self.growing.take() {
                self.apply_growth(s, g)?;
            }
            return Ok(());
        }
        slot.allowed = None;
        g.cancelled = true;
        if !g.busy {
            drop(slot);
            self.end_growth();
        }
        Ok(())
    }

    /// The header points at `g`'s table: it replaces the old one, which is freed.
    fn apply_growth(&mut self, s: &dyn Storage, g: Growth) -> Result<()> {
        let cs = self.cs();
        // (Never shorter: only a growth under the lock lengthens the table, and it settles
        // this one first.)
        let len = (g.entries as usize).max(self.table.len());
        self.table.resize(len, 0);
        for j in 0..g.k {
            if let Some(e) = self.table.get_mut((g.b + j) as usize) {
                *e = (g.at + j) * cs;
            }
        }
        self.map.add(g.at, g.k, kind::REFCOUNT_BLOCK);
        self.map.add(g.at + g.k, g.t_clusters, kind::REFCOUNT_TABLE);
        self.map.remove(
            self.table_offset / cs,
            self.table_clusters,
            kind::REFCOUNT_TABLE,
        );
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table_offset = g.table_off;
        self.table_clusters = g.t_clusters;
        for (j, data) in g.blocks.into_iter().enumerate() {
            self.clean.put(g.b + j as u64, data);
        }
        self.free_hint = self.free_hint.min(g.b * self.epb);
        log::info!(
            "refcount table grown to {} clusters at {:#x} ({} new blocks, without the lock)",
            g.t_clusters,
            g.table_off,
            g.k
        );
        for c in 0..old_clusters {
            self.add(s, old_off / cs + c, -1)?;
        }
        Ok(())
    }

    /// The contents of new blocks `b..b + k` placed at cluster `at`, which count the `used`
    /// clusters from `at` (the blocks and the table) as taken.
    pub(super) fn new_blocks(&self, b: u64, k: u64, at: u64, used: u64) -> Vec<Vec<u8>> {
        let cs = self.cs();
        (0..k)
            .map(|j| {
                let mut data = vec![0u8; cs as usize];
                let lo = (b + j) * self.epb;
                for c in at.max(lo)..(lo + self.epb).min(at + used) {
                    refblock::set(&mut data, (c - lo) as usize, self.order, 1);
                }
                data
            })
            .collect()
    }
}
