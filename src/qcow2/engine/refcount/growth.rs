//! Refcount structure growth: a new refcount block (created under the lock, or prepared
//! under it and written without it: `block_to_create`), and a larger refcount table.

use super::{Refcounts, MAX_REFTABLE_BYTES};
use crate::qcow2::engine::overlap::kind;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::{self, header, refblock};
use crate::storage::Storage;

/// A refcount block to create without the metadata lock (`Refcounts::block_to_create`): its
/// bytes, where they go, and where its table entry goes.
pub(crate) struct NewBlock {
    b: u64,
    /// Its cluster.
    at: u64,
    data: Vec<u8>,
    /// The table (offset) the entry was placed in.
    table_offset: u64,
}

impl NewBlock {
    /// The end of the block's cluster in the file.
    pub(crate) fn end(&self, cs: u64) -> u64 {
        (self.at + 1) * cs
    }

    /// Write the block, sync, write its table entry, sync: the entry never points at a block
    /// that is not in the file, and the block is in the table before any refcount in it is
    /// relied on.
    pub(crate) fn write(&self, s: &dyn Storage, cs: u64) -> std::io::Result<()> {
        let first = self.at * cs;
        s.write_at(&self.data, first)?;
        s.flush()?;
        s.write_at(&first.to_be_bytes(), self.table_offset + self.b * 8)?;
        s.flush()
    }
}

impl Refcounts {
    /// The refcount block the allocator will need soon, to create without the lock: when the
    /// allocator's frontier (`frontier`) is in a block that does not exist, or in the second
    /// half of the last one before a block that does not. None when none is due, one is being
    /// created, or the table has no room to spare (`table_to_grow` grows it then). Until
    /// `block_created`, the allocator skips the clusters the block covers.
    pub(crate) fn block_to_create(&mut self) -> Option<NewBlock> {
        if self.creating.is_some() || self.growing.is_some() {
            return None;
        }
        let b = self.block_due()?;
        // Room to spare: an allocator skipping this block does not grow the table at once.
        if b + 1 >= self.table.len() as u64 || self.table.get(b as usize) != Some(&0) {
            return None;
        }
        let cs = self.cs();
        let lo = b.checked_mul(self.epb)?;
        let at = self.skip_reserved(lo, 1);
        if at >= lo + self.epb
            || self.is_reserved(at)
            || self.guard(at.checked_mul(cs)?, cs, 0).is_err()
            || self
                .guard(self.table_offset + b * 8, 8, kind::REFCOUNT_TABLE)
                .is_err()
        {
            return None;
        }
        let mut data = vec![0u8; cs as usize];
        refblock::set(&mut data, (at - lo) as usize, self.order, 1);
        self.creating = Some(b);
        Some(NewBlock {
            b,
            at,
            data,
            table_offset: self.table_offset,
        })
    }

    /// The block the allocator will need next: the one its frontier is in when that does not
    /// exist, or the next one when the frontier is in the second half of one that does. None
    /// when the frontier is past the table.
    pub(super) fn block_due(&self) -> Option<u64> {
        let front = self.frontier();
        let hb = front / self.epb;
        match self.table.get(hb as usize) {
            Some(0) => Some(hb),
            Some(_) if front % self.epb >= self.epb / 2 => Some(hb + 1),
            _ => None,
        }
    }

    /// Where new clusters are handed out: past the furthest allocation since open, or the
    /// allocator's search start if that is further. (The search start alone lags: a small free
    /// run that larger allocations do not fit in keeps it behind.)
    pub(super) fn frontier(&self) -> u64 {
        self.free_hint.max(self.alloc_high)
    }

    /// True when cluster `c` lies in the block being created (`block_to_create`) or in the
    /// blocks of a table growth without the lock (`table_to_grow`).
    pub(super) fn in_creating(&self, c: u64) -> bool {
        let b = c / self.epb;
        self.creating == Some(b) || self.in_growth(b)
    }

    /// The end of the clusters of a block being created (or of a growth's blocks) that
    /// `start..start + n` overlaps, if any.
    pub(super) fn creating_over(&self, start: u64, n: u64) -> Option<u64> {
        let end = start.saturating_add(n);
        let block = self.creating.map(|b| (b, b + 1));
        let growth = self.growth_blocks();
        [block, growth]
            .into_iter()
            .flatten()
            .map(|(lo, hi)| (lo.saturating_mul(self.epb), hi.saturating_mul(self.epb)))
            .find(|&(lo, hi)| start < hi && lo < end)
            .map(|(_, hi)| hi)
    }

    /// The block of `block_to_create` was written (`ok`) or not: it joins the table, and the
    /// allocator may use its clusters again. If the table moved meanwhile (grown under the
    /// lock), the entry is written into the new table here, and the old one is freed now.
    pub(crate) fn block_created(&mut self, s: &dyn Storage, nb: NewBlock, ok: bool) -> Result<()> {
        self.creating = None;
        // An allocator that skipped the range meanwhile moved its search past it.
        self.free_hint = self.free_hint.min(nb.b * self.epb);
        let cs = self.cs();
        // Linked or not, the block's bytes may be in its cluster: not zeros any more.
        self.note_allocated(nb.at, 1);
        let mut r = Ok(());
        if ok && self.table.get(nb.b as usize) == Some(&0) {
            let first = nb.at * cs;
            if self.table_offset != nb.table_offset {
                r = self
                    .guard(self.table_offset + nb.b * 8, 8, kind::REFCOUNT_TABLE)
                    .and_then(|()| {
                        s.write_at(&first.to_be_bytes(), self.table_offset + nb.b * 8)?;
                        s.flush()?;
                        Ok(())
                    });
            }
            if r.is_ok() {
                self.map.add(nb.at, 1, kind::REFCOUNT_BLOCK);
                self.table[nb.b as usize] = first;
                self.clean.put(nb.b, nb.data);
                log::debug!(
                    "new refcount block {} at {first:#x} (without the lock)",
                    nb.b
                );
            }
        }
        for (off, n) in std::mem::take(&mut self.old_tables) {
            for c in 0..n {
                self.add(s, off / cs + c, -1)?;
            }
        }
        r
    }

    /// Create refcount block `b` at the first cluster it covers that is not reserved (all of them
    /// are free, since the block does not exist). The block is written and synced before the
    /// table links it.
    pub(super) fn create_block(&mut self, s: &dyn Storage, b: u64) -> Result<()> {
        if self.creating == Some(b) || self.in_growth(b) {
            // The allocator skips a block being created, and nothing else sets a refcount in
            // a range without a block.
            return Err(Qcow2Error::Invalid(format!(
                "refcount block {b} is being created"
            )));
        }
        if b >= self.table.len() as u64 {
            return self.grow(s, b);
        }
        let cs = self.cs();
        let lo = b
            .checked_mul(self.epb)
            .ok_or_else(|| Qcow2Error::corrupt("refcount block offset overflow"))?;
        let at = self.skip_reserved(lo, 1);
        if at >= lo + self.epb {
            return Err(Qcow2Error::Invalid(format!(
                "refcount block {b} has no room outside the dedup index area"
            )));
        }
        let first = at
            .checked_mul(cs)
            .ok_or_else(|| Qcow2Error::corrupt("refcount block offset overflow"))?;
        let mut data = vec![0u8; cs as usize];
        refblock::set(&mut data, (at - lo) as usize, self.order, 1);
        self.guard(first, cs, 0)?;
        s.write_at(&data, first)?;
        s.flush()?;
        self.map.add(first / cs, 1, kind::REFCOUNT_BLOCK);
        self.table[b as usize] = first;
        self.guard(self.table_offset + b * 8, 8, kind::REFCOUNT_TABLE)?;
        s.write_at(&first.to_be_bytes(), self.table_offset + b * 8)?;
        if let Some(at) = self.mirror_entry(b) {
            // A growth without the lock waits for its header switch: the new table needs
            // the entry too, whichever table the header points at after a crash.
            s.write_at(&first.to_be_bytes(), at)?;
        }
        s.flush()?;
        self.clean.put(b, data);
        self.note_allocated(at, 1);
        log::debug!("new refcount block {b} at {first:#x}");
        Ok(())
    }

    /// Where a growth of the table for block `b` goes: (new blocks `k`, table clusters, first
    /// cluster). The new blocks and the table go at the start of the area block `b` covers, or
    /// just past the dedup index area if that lies there; the new blocks must cover them.
    pub(super) fn growth_plan(&self, b: u64) -> Result<(u64, u64, u64)> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let old_len = self.table.len() as u64;
        let first_cluster = b
            .checked_mul(self.epb)
            .ok_or_else(|| Qcow2Error::corrupt("refcount area offset overflow"))?;
        let mut k = 1u64;
        let (t, at) = loop {
            let want = (b + k).max(old_len.saturating_mul(2)).max(per_cluster);
            let t = want.div_ceil(per_cluster);
            let at = self.skip_reserved(first_cluster, k + t);
            if (b + k).saturating_mul(self.epb) >= at + k + t {
                break (t, at);
            }
            k += 1;
        };
        if t * cs > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::Unsupported(
                "the refcount table would exceed 8 MiB (image too large for its cluster size)"
                    .into(),
            ));
        }
        at.checked_mul(cs)
            .ok_or_else(|| Qcow2Error::corrupt("refcount area offset overflow"))?;
        Ok((k, t, at))
    }

    /// Grow the refcount table so that it covers block `b`: new blocks for `b..b+k` and the new
    /// table are placed by `growth_plan`, written and synced, then the header is switched
    /// (synced), then the old table freed. A growth without the lock in progress is settled
    /// first (`settle_growth`); when it is applied, the grown table may cover `b` already.
    fn grow(&mut self, s: &dyn Storage, b: u64) -> Result<()> {
        self.settle_growth(s)?;
        if b < self.table.len() as u64 {
            if self.table.get(b as usize) == Some(&0) {
                return self.create_block(s, b);
            }
            return Ok(());
        }
        let cs = self.cs();
        let per_cluster = cs / 8;
        let (k, t_clusters, at) = self.growth_plan(b)?;
        let entries = t_clusters * per_cluster;
        let base = at * cs;
        let used = k + t_clusters; // clusters taken by the new blocks and the table
        self.guard(base, used * cs, 0)?;
        let new_blocks = self.new_blocks(b, k, at, used);
        for (j, data) in new_blocks.iter().enumerate() {
            s.write_at(data, base + j as u64 * cs)?;
        }
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for j in 0..k {
            table[(b + j) as usize] = base + j * cs;
        }
        let table_off = base + k * cs;
        s.write_at(&format::encode_table(&table), table_off)?;
        s.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(t_clusters as u32).to_be_bytes());
        s.write_at(&hdr, header::OFF_REFCOUNT_TABLE)?;
        s.flush()?;
        self.map.add(at, k, kind::REFCOUNT_BLOCK);
        self.map.add(at + k, t_clusters, kind::REFCOUNT_TABLE);
        self.map.remove(
            self.table_offset / cs,
            self.table_clusters,
            kind::REFCOUNT_TABLE,
        );
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_off;
        self.table_clusters = t_clusters;
        for (j, data) in new_blocks.into_iter().enumerate() {
            self.clean.put(b + j as u64, data);
        }
        self.note_allocated(at, used);
        // The header no longer points at the old table: free its clusters, unless a block
        // being created may still write its entry there (then `block_created` frees them).
        if self.creating.is_some() {
            self.old_tables.push((old_off, old_clusters));
        } else {
            for c in 0..old_clusters {
                self.add(s, old_off / cs + c, -1)?;
            }
        }
        log::info!(
            "refcount table grown to {t_clusters} clusters at {table_off:#x} ({k} new blocks)"
        );
        Ok(())
    }
}
