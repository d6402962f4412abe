//! The core's part of growing the disk (QMP `block_resize`): the L1 table first, the header's
//! size last (docs/design.md, "Growing the disk"). A child of `meta` so that it works on the
//! core's own fields.
//!
//! At every point the file's `l1_size` covers its `size`, so a crash leaves the old or the new
//! size with a valid L1 table (at worst leaked clusters):
//! - the L1 table's clusters have room: the new entries are zeroed (synced), then `l1_size`
//!   (synced), then the size (synced);
//! - otherwise the table moves: new clusters are taken and their refcounts written (synced),
//!   the copied and extended table is written (synced), then `l1_size` and `l1_table_offset`
//!   in one 12-byte write inside the header's first sector (synced), then the size (synced),
//!   and only then are the old table's clusters freed.

use super::{l2_cache_cap, Meta, MAX_L1_BYTES};
use crate::qcow2::engine::overlap::kind;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::encode_table;
use crate::qcow2::format::header::{OFF_L1_SIZE, OFF_SIZE};
use crate::storage::Storage;

impl Meta {
    /// L1 entries a disk of `size` bytes needs.
    pub(crate) fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.g.cluster_size() << self.g.l2_bits)
    }

    /// Grow the disk to `new_size` bytes (larger than now; the caller checked it and holds the
    /// writeback lock, so no persister writes L1 entries meanwhile).
    pub(crate) fn grow(&mut self, s: &dyn Storage, new_size: u64) -> Result<()> {
        let cs = self.g.cluster_size();
        let need = self.l1_entries_for(new_size);
        if need.saturating_mul(8) > MAX_L1_BYTES {
            let max = (MAX_L1_BYTES / 8) * (cs << self.g.l2_bits);
            return Err(Qcow2Error::Invalid(format!(
                "{new_size} bytes need an L1 table larger than QEMU's limit of 32 MiB: at most \
                 {max} bytes with {cs}-byte clusters"
            )));
        }
        let old = self.l1.len() as u64;
        if need > old {
            let room = (old * 8).div_ceil(cs) * cs;
            if self.l1_offset != 0 && need * 8 <= room {
                self.grow_l1_in_place(s, need)?;
            } else {
                self.move_l1(s, need)?;
            }
            self.l2.set_cap(l2_cache_cap(self.l2_cache_bytes, cs, need));
        }
        // The L1 table covers the new size by now (in the file): the size goes last.
        s.write_at(&new_size.to_be_bytes(), OFF_SIZE)?;
        s.flush()?;
        self.size = new_size;
        Ok(())
    }

    /// More entries in the clusters the table has: whatever lies past `l1_size` there (nothing
    /// reads it) becomes zeros before the header counts it.
    fn grow_l1_in_place(&mut self, s: &dyn Storage, need: u64) -> Result<()> {
        let old = self.l1.len() as u64;
        let off = self.l1_offset + old * 8;
        let len = (need - old) * 8;
        self.rc.guard(off, len, kind::ACTIVE_L1)?;
        s.write_at(&vec![0u8; len as usize], off)?;
        s.flush()?;
        s.write_at(&(need as u32).to_be_bytes(), OFF_L1_SIZE)?;
        s.flush()?;
        self.l1.resize(need as usize, 0);
        self.file_len = self.file_len.max(off + len);
        log::info!("L1 table grown in place to {need} entries");
        Ok(())
    }

    /// A copy of the table with `need` entries in new clusters, then the header switched to it,
    /// then the old clusters freed.
    fn move_l1(&mut self, s: &dyn Storage, need: u64) -> Result<()> {
        let cs = self.g.cluster_size();
        let n = (need * 8).div_ceil(cs);
        if n > self.rc.max_run() {
            return Err(Qcow2Error::Unsupported(format!(
                "an L1 table of {n} clusters is longer than the allocator's longest run ({}) at \
                 this cluster size and refcount width",
                self.rc.max_run()
            )));
        }
        // Every table change in the file and none in memory only: the copy below is then the
        // table as the file has it, and every L2 table it points at is durable.
        self.flush(s)?;
        if !self.l1_dirty.is_empty() {
            return Err(Qcow2Error::corrupt(
                "L1 entries still unwritten after a flush",
            ));
        }
        let zero_from = self.zero_from.max(self.rc.allocations * cs);
        let first = self.rc.alloc(s, n)?;
        let new = first * cs;
        if let Err(e) = self.rc.guard(new, n * cs, 0) {
            self.unalloc_data(s, new, n);
            return Err(e);
        }
        for c in first..first + n {
            // A reader outside the lock of an old L2 table that lived here must not insert it.
            self.loading.cancel(c * cs);
        }
        self.stats.clusters_allocated += n;
        self.rc.map.add(first, n, kind::ACTIVE_L1);
        self.cover_allocation(s, zero_from, new + n * cs)?;
        // Refcounts first (also with lazy refcounts: table moves keep their order).
        self.rc.write_dirty(s)?;
        let mut table = self.l1.clone();
        table.resize(need as usize, 0);
        let mut bytes = encode_table(&table);
        bytes.resize((n * cs) as usize, 0);
        s.write_at(&bytes, new)?;
        s.flush()?;
        let mut field = [0u8; 12];
        field[..4].copy_from_slice(&(need as u32).to_be_bytes());
        field[4..].copy_from_slice(&new.to_be_bytes());
        if let Err(e) = s.write_at(&field, OFF_L1_SIZE).and_then(|()| s.flush()) {
            // A failed write or sync may still have changed the header: later L1 writes must go
            // to the table the file names (both hold the same entries). Whichever is not in
            // use is leaked, never freed.
            let mut now = [0u8; 12];
            match s.read_at(&mut now, OFF_L1_SIZE) {
                Ok(()) if now == field => {
                    self.l1 = table;
                    self.l1_offset = new;
                }
                Ok(()) => {}
                Err(_) => {
                    log::error!("the L1 table's place is unknown after a failed resize");
                    self.corrupt = true;
                }
            }
            return Err(e.into());
        }
        let old_off = self.l1_offset;
        let old_n = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1 = table;
        self.l1_offset = new;
        if old_n > 0 {
            // The header no longer points at the old table: its clusters are free (a crash
            // before their refcounts are written only leaks them).
            self.rc.map.remove(old_off / cs, old_n, kind::ACTIVE_L1);
            for c in old_off / cs..old_off / cs + old_n {
                if self.rc.add(s, c, -1)? == 0 {
                    self.stats.clusters_freed += 1;
                }
            }
        }
        log::info!("L1 table moved to {new:#x} ({need} entries, {n} clusters)");
        Ok(())
    }
}
