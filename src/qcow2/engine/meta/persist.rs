//! The core's part of persist before ack (docs/design.md, "Acknowledged writes outlive the
//! process"): under the lock, copy every table piece and L1 entry that is newer in memory than
//! in the file (`persist_begin`); the caller writes them without the lock (`PersistBatch::write`)
//! and reports back (`persist_end`). A child of `meta` so that it works on the core's own fields.

use super::Meta;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::encode_table;
use crate::qcow2::format::entries::L1E_OFFSET_MASK;
use crate::qcow2::format::header::INCOMPAT_DIRTY;
use crate::storage::Storage;

/// The copies one persister writes.
pub(crate) struct PersistBatch {
    /// Sync before the table writes: a cluster linked since the last sync needs its data
    /// durable before its entry (see `Meta::data_first`).
    sync_data: bool,
    /// (file offset, bytes) of table pieces; whole tables for those never written.
    tables: Vec<(u64, Vec<u8>)>,
    /// L1 entries: (index, file offset, value).
    l1: Vec<(usize, u64, u64)>,
    /// Sync before the L1 entries: one points at a table whose lost write would not read as
    /// what the L1 entry stood for before (a copy of a table, or a table in a reused cluster).
    sync_l1: bool,
}

impl PersistBatch {
    /// Write the copies (no lock held; the caller holds the writeback lock, so no two batches
    /// overlap and none races a flush's table writes). Syncs only where a host crash needs
    /// an order: data before the entries that point at it, new tables before their L1 entries.
    pub(crate) fn write(&self, s: &dyn Storage) -> std::io::Result<()> {
        if self.sync_data {
            s.flush()?;
        }
        for (off, b) in &self.tables {
            s.write_at(b, *off)?;
        }
        if !self.l1.is_empty() {
            // A new table (or copy) is durable before the L1 entry that points at it, unless
            // it is an empty table in a cluster never written (lost, it reads as itself).
            if self.sync_l1 {
                s.flush()?;
            }
            for (_, off, v) in &self.l1 {
                s.write_at(&v.to_be_bytes(), *off)?;
            }
        }
        Ok(())
    }

    /// Bytes this batch writes (for statistics).
    pub(crate) fn bytes(&self) -> u64 {
        self.tables.iter().map(|(_, b)| b.len() as u64).sum::<u64>() + self.l1.len() as u64 * 8
    }
}

impl Meta {
    /// Copy every table change not in the file yet, unless the change `need` is there already
    /// (None). The DIRTY bit is set (synced) first if it is not: the tables reach the file ahead
    /// of their refcounts, which a repair on the next open rebuilds. That sync under the lock
    /// happens once per DIRTY window (the refcount timer or a clean close ends one).
    pub(crate) fn persist_begin(
        &mut self,
        s: &dyn Storage,
        need: u64,
    ) -> Result<Option<PersistBatch>> {
        if self.wb.covered(need) {
            return Ok(None);
        }
        if self.corrupt {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        // Overlap checks before anything is taken.
        self.guard_tables(&self.wb.pending())?;
        if self.incompatible & INCOMPAT_DIRTY == 0 {
            self.set_incompatible(s, self.incompatible | INCOMPAT_DIRTY)?;
        }
        let per_unit = (self.wb.unit / 8) as usize;
        let mut tables = Vec::new();
        for c in self.wb.take() {
            let Some(t) = self.l2.peek(c.off) else {
                // Written by a flush and evicted since.
                self.wb.forget(c.off);
                continue;
            };
            if c.whole {
                tables.push((c.off, encode_table(t)));
                continue;
            }
            for (first, n) in c.runs {
                let lo = (first * per_unit).min(t.len());
                let hi = ((first + n) * per_unit).min(t.len());
                tables.push((c.off + lo as u64 * 8, encode_table(&t[lo..hi])));
            }
        }
        let l1: Vec<(usize, u64, u64)> = std::mem::take(&mut self.l1_dirty)
            .into_iter()
            .map(|i| (i, self.l1_offset + i as u64 * 8, self.l1[i]))
            .collect();
        let sync_l1 = l1
            .iter()
            .any(|&(_, _, v)| !self.wb.fresh(v & L1E_OFFSET_MASK));
        let sync_data = std::mem::take(&mut self.data_before_l2);
        // The refcount timer must not clear DIRTY over these writes.
        self.tables_written += 1;
        Ok(Some(PersistBatch {
            sync_data,
            tables,
            l1,
            sync_l1,
        }))
    }

    /// The batch's writes returned `r`: on success its changes are in the file (tables with
    /// nothing newer are clean for the flush); on failure they are pending again.
    pub(crate) fn persist_end(&mut self, b: PersistBatch, r: std::io::Result<()>) -> Result<()> {
        let ok = r.is_ok();
        for off in self.wb.done(ok) {
            self.l2.mark_clean(off);
        }
        if ok {
            for &(_, _, v) in &b.l1 {
                self.wb.linked(v & L1E_OFFSET_MASK);
            }
        }
        if !ok {
            self.l1_dirty.extend(b.l1.iter().map(|&(i, _, _)| i));
            if b.sync_data {
                self.data_before_l2 = true;
            }
        }
        self.stats.persist_batches += 1;
        self.stats.persist_bytes += b.bytes();
        Ok(r?)
    }
}
