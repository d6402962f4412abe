//! Refcount table and blocks: lookup, cluster allocation, and crash-safe growth.
//!
//! Refcount blocks are loaded on demand. Changed (dirty) blocks stay in memory until
//! `write_dirty` writes them; the caller orders that against L2 writes (see docs/design.md).
//! Clean blocks live in a bounded LRU cache (`CLEAN_CACHE_BYTES`), so the RAM they take does not
//! grow with the image: an image of 512-byte clusters has one block per 128 KiB of data.
//! New refcount blocks and a grown refcount table are written and synced before they are linked.

use super::clustermap::{ClusterHash, ClusterMap, ClusterSet};
use super::loading::Loading;
use super::overlap::{kind, MetadataMap, OverlapMode};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::{self, refblock};
use crate::storage::Storage;
use lru::LruCache;
use std::num::NonZeroUsize;

mod growth;
mod growth_state;
mod holes;
mod table_growth;

/// Most RAM for clean (unchanged since read or written) refcount blocks; the least recently
/// used is dropped past it. 16 MiB covers the refcounts of 512 GiB of data at 64 KiB clusters.
pub(crate) const CLEAN_CACHE_BYTES: u64 = 16 << 20;

/// Clean blocks kept for `cluster_bits` (at least 8, whatever the cluster size).
fn clean_cap(cluster_bits: u32) -> NonZeroUsize {
    NonZeroUsize::new(((CLEAN_CACHE_BYTES >> cluster_bits).max(8)) as usize)
        .unwrap_or(NonZeroUsize::MIN)
}

/// In-memory view of the refcount structures.
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    epb: u64,
    max: u64,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    /// Blocks changed in memory and not yet written: kept until `write_dirty`.
    dirty: ClusterMap<Vec<u8>>,
    /// Dirty blocks whose copies a flush is writing without the metadata lock (`copy_dirty`):
    /// they stay dirty until `copies_written`.
    flushing: ClusterSet,
    /// Blocks of `flushing` changed since their copy was taken: still dirty afterwards.
    touched: ClusterSet,
    /// Blocks being read without the metadata lock (`block_to_load`), by index. A load under
    /// the lock takes its block out of here: the reader outside then drops its copy, which may
    /// be older than what the cache has seen since.
    loading: Loading,
    /// Freed clusters whose holes are being punched without the metadata lock
    /// (`hold_punching`): the allocator skips them until `punched`, so a punch never lands on
    /// a cluster handed out again.
    punching: ClusterSet,
    /// Free clusters whose holes are durable (`refcount/holes.rs`); one leaves when its
    /// refcount does.
    holes: holes::Holes,
    /// The last `alloc` took a run of `holes` (it reads as zeros, durably).
    pub(crate) last_alloc_holes: bool,
    /// The last `alloc` took clusters of a run in `ahead` (allocated before, so written
    /// maybe, although past `allocations`).
    pub(crate) last_alloc_ahead: bool,
    /// Blocks as they are on disk, least recently used dropped first.
    clean: LruCache<u64, Vec<u8>, ClusterHash>,
    /// No cluster below this index is free.
    free_hint: u64,
    /// The end of the furthest run `alloc` handed out since open (`frontier`).
    alloc_high: u64,
    /// First cluster index past everything allocated since open (as a contiguous range from
    /// the clusters the refcount structures knew of at open), but for the runs in `ahead`.
    pub(crate) allocations: u64,
    /// Runs (first cluster -> end) allocated past `allocations` with a gap before them: a
    /// refcount block created ahead of the allocator, or data placed past a block's range
    /// the allocator skipped while the block was being created. The gap was never written
    /// and still reads as zeros, so such a run does not move the watermark (it did, and every
    /// new data cluster in the gap was then written in full with zeros and synced before its
    /// entry). A run merges into the watermark when the allocations reach it.
    ahead: std::collections::BTreeMap<u64, u64>,
    /// Where the metadata is (kept here since the allocator places refcount structures).
    pub(crate) map: MetadataMap,
    /// Kinds of metadata every write is checked against.
    pub(crate) check_mask: u16,
    /// Clusters the allocator must not hand out although their refcount is 0 (the dedup index
    /// area: first cluster, count); set by `reserve`.
    reserved: Option<(u64, u64)>,
    /// A block being created without the metadata lock (`block_to_create`): the allocator
    /// skips the clusters it covers until `block_created`.
    creating: Option<u64>,
    /// Refcount tables a growth replaced while a block was being created, (offset, clusters):
    /// freed by `block_created` (its entry write may still land in the old table).
    old_tables: Vec<(u64, u64)>,
    /// A growth of the table without the metadata lock (`table_to_grow`).
    growing: Option<growth_state::Growth>,
    /// The last growth's id.
    next_growth: u64,
    /// Who may switch the header to a grown table (`growth_state::HeaderSlot`).
    header_slot: std::sync::Arc<std::sync::Mutex<growth_state::HeaderSlot>>,
}

/// Largest refcount table QEMU accepts (8 MiB).
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;

impl Refcounts {
    pub(crate) fn load(
        s: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters
            .checked_mul(cs)
            .filter(|&b| b > 0 && b <= MAX_REFTABLE_BYTES)
            .ok_or_else(|| {
                Qcow2Error::corrupt(format!(
                    "refcount table of {table_clusters} clusters is empty or larger than 8 MiB"
                ))
            })?;
        if table_offset == 0 || !table_offset.is_multiple_of(cs) {
            return Err(Qcow2Error::corrupt(format!(
                "refcount table offset {table_offset:#x} is not cluster aligned"
            )));
        }
        let file_len = s.len()?;
        if table_offset
            .checked_add(bytes)
            .is_none_or(|e| e > file_len.max(cs) + bytes)
        {
            return Err(Qcow2Error::corrupt(format!(
                "refcount table at {table_offset:#x} lies past the end of the file"
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        s.read_at(&mut buf, table_offset)?;
        let table = format::decode_table(&buf);
        for (i, &e) in table.iter().enumerate() {
            if e & (cs - 1) != 0 {
                return Err(Qcow2Error::corrupt(format!(
                    "refcount table entry {i} ({e:#x}) is not cluster aligned"
                )));
            }
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            epb: refblock::entries_per_block(cluster_bits, order),
            max: refblock::max_refcount(order),
            table,
            table_offset,
            table_clusters,
            dirty: ClusterMap::default(),
            flushing: ClusterSet::default(),
            touched: ClusterSet::default(),
            loading: Loading::default(),
            punching: ClusterSet::default(),
            holes: holes::Holes::default(),
            last_alloc_holes: false,
            last_alloc_ahead: false,
            clean: LruCache::with_hasher(clean_cap(cluster_bits), ClusterHash::default()),
            free_hint: 0,
            allocations: 0,
            ahead: std::collections::BTreeMap::new(),
            map: MetadataMap::new(),
            check_mask: OverlapMode::All.mask(),
            reserved: None,
            creating: None,
            old_tables: Vec::new(),
            growing: None,
            next_growth: 0,
            alloc_high: 0,
            header_slot: Default::default(),
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Largest refcount a cluster can hold.
    pub(crate) fn max_refcount(&self) -> u64 {
        self.max
    }

    /// Refuse a write of `len` bytes at `off` that would touch metadata other than `ignore`.
    pub(crate) fn guard(&self, off: u64, len: u64, ignore: u16) -> Result<()> {
        let cb = self.cluster_bits;
        let first = off >> cb;
        let n = (off.saturating_add(len.max(1)) - 1) >> cb;
        match self
            .map
            .find(first, n - first + 1, self.check_mask & !ignore)
        {
            None => Ok(()),
            Some(o) => Err(Qcow2Error::Overlap {
                kind: kind::name(o.kind),
                offset: off,
                len,
            }),
        }
    }

    /// Load block `b` into the cache if the table has one; false when it has none.
    fn load_block(&mut self, s: &dyn Storage, b: u64) -> Result<bool> {
        if self.dirty.contains_key(&b) || self.clean.contains(&b) {
            return Ok(true);
        }
        self.loading.cancel(b);
        let off = match self.table.get(b as usize) {
            Some(&o) if o != 0 => o,
            _ => return Ok(false),
        };
        let mut data = vec![0u8; self.cs() as usize];
        s.read_at(&mut data, off)?;
        self.clean.put(b, data);
        Ok(true)
    }

    /// Block `b` is in the table but not cached, and nobody reads it: its file offset, for a
    /// read without the lock (`block_loaded` then). None otherwise.
    pub(crate) fn block_to_load(&mut self, b: u64) -> Option<(u64, u64)> {
        if !self.wants_load(b) {
            return None;
        }
        let off = self.table.get(b as usize).copied().filter(|&o| o != 0)?;
        Some((off, self.loading.start(b)))
    }

    /// Block `b` is not cached and nobody reads it (`block_to_load` would hand it out if the
    /// table has it).
    pub(crate) fn wants_load(&self, b: u64) -> bool {
        !(self.dirty.contains_key(&b) || self.clean.contains(&b) || self.loading.contains(b))
    }

    /// Move the allocator's search start past the clusters in use, as far as the cached blocks
    /// tell (it only ever passes clusters with a refcount, so "no free cluster below it"
    /// stays true), then look on for a run of `n` free clusters. Returns the block where that
    /// stopped when the table has the block and the cache lacks it: the caller reads it
    /// (`blocks_to_load_from`) and asks again. None when a run was found, or the search
    /// reached a block to create or being created (the allocator's own business). Clusters
    /// the allocator skips for other reasons (reserved, being punched) count as free here:
    /// this only reads ahead for `alloc`, which decides.
    pub(crate) fn skip_allocated(&mut self, n: u64) -> Option<u64> {
        let mut c = self.free_hint;
        // Free clusters in a row just before `c`, and whether the search start is settled.
        let (mut run, mut settled) = (0u64, false);
        loop {
            let b = c / self.epb;
            if self.in_creating(c) || self.table.get(b as usize).is_none_or(|&o| o == 0) {
                return None;
            }
            let data = match self.dirty.get(&b).or_else(|| self.clean.peek(&b)) {
                Some(d) => d,
                None => return Some(b),
            };
            let i = (c % self.epb) as usize;
            let Some(z) = refblock::first_zero(data, i, self.order) else {
                run = 0;
                c = (b + 1) * self.epb;
                if !settled {
                    self.free_hint = c;
                }
                continue;
            };
            if z > i {
                run = 0;
            }
            let zc = b * self.epb + z as u64;
            if !settled {
                self.free_hint = zc;
                settled = true;
            }
            // Looked at only as far as the run needs (fresh space is whole blocks of zeros).
            let lim = (z as u64).saturating_add(n - run).min(self.epb) as usize;
            let e = refblock::first_nonzero(data, z, lim, self.order).unwrap_or(lim);
            let end = b * self.epb + e as u64;
            run += end - zc;
            if run >= n {
                return None;
            }
            c = end;
        }
    }

    /// Up to `n` blocks from `b` on (while the table has them) that are not cached and that
    /// nobody reads, as `refcounts_to_load` hands them out: (block, file offset, ticket).
    pub(crate) fn blocks_to_load_from(&mut self, b: u64, n: usize) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let end = (self.table.len() as u64).min(b.saturating_add(n as u64));
        for k in b..end {
            if self.table.get(k as usize).is_none_or(|&o| o == 0) {
                break;
            }
            if let Some((off, ticket)) = self.block_to_load(k) {
                out.push((k, off, ticket));
            }
        }
        out
    }

    /// How many clean blocks the cache keeps.
    pub(crate) fn clean_capacity(&self) -> usize {
        self.clean.cap().get()
    }

    /// The block of `block_to_load` was read (`data`, or None when the read failed): cached
    /// unless a load under the lock took it over meanwhile.
    pub(crate) fn block_loaded(&mut self, b: u64, ticket: u64, data: Option<Vec<u8>>) {
        if !self.loading.finish(b, ticket) {
            return;
        }
        if let Some(d) = data {
            if d.len() as u64 == self.cs() && !self.dirty.contains_key(&b) {
                self.clean.put(b, d);
            }
        }
    }

    /// The block that holds cluster `c`'s refcount.
    pub(crate) fn block_of(&self, c: u64) -> u64 {
        c / self.epb
    }

    /// The contents of block `b` (None when the table has no block for it).
    fn block(&mut self, s: &dyn Storage, b: u64) -> Result<Option<&[u8]>> {
        if !self.load_block(s, b)? {
            return Ok(None);
        }
        if let Some(d) = self.dirty.get(&b) {
            return Ok(Some(d));
        }
        Ok(self.clean.get(&b).map(|d| d.as_slice()))
    }

    /// Block `b` for a change: moved to the dirty blocks, where it stays until written.
    fn block_mut(&mut self, s: &dyn Storage, b: u64) -> Result<Option<&mut Vec<u8>>> {
        if !self.load_block(s, b)? {
            return Ok(None);
        }
        if let Some(d) = self.clean.pop(&b) {
            self.dirty.insert(b, d);
        }
        if self.flushing.contains(&b) {
            self.touched.insert(b);
        }
        Ok(self.dirty.get_mut(&b))
    }

    /// Keep clusters `first..first + n` (refcount 0) from the allocator, and record them in the
    /// overlap map as metadata of kind `k`, so that no data or table write lands there.
    pub(crate) fn reserve(&mut self, first: u64, n: u64, k: u16) {
        self.not_holes(first, n);
        if let Some((f, m)) = self.reserved.replace((first, n)) {
            self.map.remove(f, m, k);
        }
        self.map.add(first, n, k);
    }

    fn is_reserved(&self, c: u64) -> bool {
        self.reserved.is_some_and(|(f, n)| c >= f && c - f < n)
            || (!self.punching.is_empty() && self.punching.contains(&c))
            || self.in_creating(c)
    }

    /// Clusters `first..first + n` are about to be written with refcount 0 (the dedup index
    /// area): none of them reads as zeros from now on.
    pub(crate) fn not_holes(&mut self, first: u64, n: u64) {
        self.holes.remove_range(first, n);
    }

    /// Clusters `first..first + n` were allocated (and may be written): they extend the
    /// watermark `allocations` when they start at or below it, else they are kept in `ahead`.
    pub(crate) fn note_allocated(&mut self, first: u64, n: u64) {
        let end = first.saturating_add(n);
        if first > self.allocations {
            // Keep the runs disjoint: one that overlaps or touches this one joins it.
            let (mut lo, mut hi) = (first, end);
            while let Some((&s, &e)) = self.ahead.range(..=hi).next_back() {
                if e < lo {
                    break;
                }
                (lo, hi) = (lo.min(s), hi.max(e));
                self.ahead.remove(&s);
            }
            self.ahead.insert(lo, hi);
            return;
        }
        self.allocations = self.allocations.max(end);
        // Runs the watermark reached (or passed) merge into it.
        while let Some((&s, &e)) = self.ahead.first_key_value() {
            if s > self.allocations {
                break;
            }
            self.allocations = self.allocations.max(e);
            self.ahead.remove(&s);
        }
    }

    /// Whether a cluster of `first..first + n` lies in a run allocated ahead of the watermark
    /// (past `allocations`, it then does not read as zeros all the same).
    pub(crate) fn allocated_ahead(&self, first: u64, n: u64) -> bool {
        let end = first.saturating_add(n);
        // Runs do not overlap: only the last one starting before `end` can reach `first`.
        self.ahead
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > first)
    }

    /// Keep the clusters of `runs` (first, count; refcount 0 now) from the allocator while
    /// their holes are punched without the lock.
    pub(crate) fn hold_punching(&mut self, runs: &[(u64, u64)]) {
        for &(f, n) in runs {
            self.punching.extend(f..f + n);
        }
    }

    /// The holes of `runs` are punched: the clusters may be handed out again. `durable`: those
    /// of them that are holes on disk now, punched and synced since (see `holes`).
    pub(crate) fn punched(&mut self, runs: &[(u64, u64)], durable: &[(u64, u64)]) {
        for &(f, n) in runs {
            for c in f..f + n {
                self.punching.remove(&c);
            }
            self.free_hint = self.free_hint.min(f);
        }
        for &(f, n) in durable {
            self.holes.insert(f, n);
        }
    }

    /// Refcount of cluster `c`.
    pub(crate) fn get(&mut self, s: &dyn Storage, c: u64) -> Result<u64> {
        let (b, i, order) = (c / self.epb, (c % self.epb) as usize, self.order);
        Ok(self
            .block(s, b)?
            .map_or(0, |blk| refblock::get(blk, i, order)))
    }

    /// Set the refcount of cluster `c`, creating its refcount block when needed.
    pub(crate) fn set(&mut self, s: &dyn Storage, c: u64, v: u64) -> Result<()> {
        if v > self.max {
            return Err(Qcow2Error::corrupt(format!(
                "refcount overflow on cluster {c}"
            )));
        }
        let (b, i, order) = (c / self.epb, (c % self.epb) as usize, self.order);
        if self.block(s, b)?.is_none() {
            if v == 0 {
                return Ok(());
            }
            self.create_block(s, b)?;
        }
        let blk = self
            .block_mut(s, b)?
            .ok_or_else(|| Qcow2Error::corrupt("refcount block vanished"))?;
        refblock::set(blk, i, order, v);
        if v != 0 && !self.holes.is_empty() {
            self.holes.remove(c);
        }
        if v == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        Ok(())
    }

    /// Add `delta` (may be negative) to the refcount of cluster `c`; returns the new value.
    pub(crate) fn add(&mut self, s: &dyn Storage, c: u64, delta: i64) -> Result<u64> {
        let old = self.get(s, c)?;
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            Qcow2Error::corrupt(format!(
                "refcount of cluster {c} would underflow ({old}{delta:+})"
            ))
        })?;
        self.set(s, c, new)?;
        Ok(new)
    }

    /// Longest run `alloc` can always find: fresh space past the last refcount block is in
    /// runs of this many clusters (a new block takes the first cluster of the range it covers).
    pub(crate) fn max_run(&self) -> u64 {
        self.epb.saturating_sub(1).max(1)
    }

    /// Find and take `n` contiguous free clusters (refcount 0 -> 1). Returns the first index.
    /// `n` should be at most [`Self::max_run`]: a longer run may never be found.
    pub(crate) fn alloc(&mut self, s: &dyn Storage, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Qcow2Error::Invalid("zero-cluster allocation".into()));
        }
        'search: loop {
            let mut start = self.free_hint;
            let mut first_free = None;
            let mut c = start;
            while c < start + n {
                if self.in_creating(c) {
                    // The whole range of a block being created, at once.
                    start = (c / self.epb + 1) * self.epb;
                    c = start;
                    continue;
                }
                if self.is_reserved(c) {
                    start = c + 1;
                    c += 1;
                    continue;
                }
                // A missing block is created first; it takes the first cluster it covers that is
                // not reserved, so the search starts again.
                if self.block(s, c / self.epb)?.is_none() {
                    self.create_block(s, c / self.epb)?;
                    continue 'search;
                }
                if self.get(s, c)? != 0 {
                    start = c + 1;
                } else if first_free.is_none() {
                    first_free = Some(c);
                }
                c += 1;
            }
            self.last_alloc_holes = self.holes.covers(start, n);
            self.last_alloc_ahead = self.allocated_ahead(start, n);
            for k in start..start + n {
                self.set(s, k, 1)?;
            }
            self.free_hint = match first_free {
                Some(f) if f < start => f,
                _ => start + n,
            };
            self.note_allocated(start, n);
            self.alloc_high = self.alloc_high.max(start + n);
            return Ok(start);
        }
    }

    /// First cluster at or after `c` such that `c .. c + n` holds no reserved cluster.
    fn skip_reserved(&self, c: u64, n: u64) -> u64 {
        match self.reserved {
            Some((f, rn)) if c < f + rn && f < c + n => f + rn,
            _ => c,
        }
    }

    /// True when some block has changes not yet written.
    pub(crate) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Write every changed block (no sync: the caller orders it). Written blocks become clean
    /// (and may then be dropped from the cache).
    pub(crate) fn write_dirty(&mut self, s: &dyn Storage) -> Result<()> {
        debug_assert!(self.flushing.is_empty(), "a flush is writing copies");
        let mut keys: Vec<u64> = self.dirty.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            let off = self.dirty_block_offset(k)?;
            if let Some(data) = self.dirty.get(&k) {
                s.write_at(data, off)?;
            }
            if let Some(data) = self.dirty.remove(&k) {
                self.clean.put(k, data);
            }
        }
        Ok(())
    }

    /// Where dirty block `k` goes in the file, after the overlap check.
    fn dirty_block_offset(&self, k: u64) -> Result<u64> {
        let off = self.table.get(k as usize).copied().unwrap_or(0);
        if off == 0 {
            return Err(Qcow2Error::corrupt(format!(
                "dirty refcount block {k} has no table entry"
            )));
        }
        self.guard(off, self.cs(), kind::REFCOUNT_BLOCK)?;
        Ok(off)
    }

    /// Copies of the dirty blocks, (file offset, bytes) sorted by offset, for a flush that
    /// writes them without the metadata lock. They stay dirty until `copies_written`; a change
    /// meanwhile keeps a block dirty after it.
    pub(crate) fn copy_dirty(&mut self) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut keys: Vec<u64> = self.dirty.keys().copied().collect();
        keys.sort_unstable();
        let mut out = Vec::with_capacity(keys.len());
        for &k in &keys {
            out.push((self.dirty_block_offset(k)?, Vec::new()));
        }
        for (o, &k) in out.iter_mut().zip(&keys) {
            if let Some(d) = self.dirty.get(&k) {
                o.1 = d.clone();
            }
        }
        self.flushing.extend(keys);
        Ok(out)
    }

    /// The copies from `copy_dirty` are in the file (`ok`) or not: the blocks not changed
    /// since their copy become clean on success; all stay dirty on failure.
    pub(crate) fn copies_written(&mut self, ok: bool) {
        for k in std::mem::take(&mut self.flushing) {
            if ok && !self.touched.contains(&k) {
                if let Some(d) = self.dirty.remove(&k) {
                    self.clean.put(k, d);
                }
            }
        }
        self.touched.clear();
    }

    /// Refcount blocks held in RAM now (dirty, clean).
    #[cfg(test)]
    pub(crate) fn cached_blocks(&self) -> (usize, usize) {
        (self.dirty.len(), self.clean.len())
    }

    /// The first cluster `c >= from` such that `c .. c + n` all have refcount 0 (the reserved
    /// range is not looked at). Ranges without a refcount block are skipped whole, so the cost
    /// follows the blocks that exist, not the size of the range.
    pub(crate) fn free_run(&mut self, s: &dyn Storage, from: u64, n: u64) -> Result<u64> {
        let mut from = from;
        loop {
            let start = self.free_run_by_refcount(s, from, n)?;
            // Not over a block being created (or the blocks of a growth).
            if let Some(hi) = self.creating_over(start, n) {
                from = hi;
                continue;
            }
            if self.punching.is_empty() {
                return Ok(start);
            }
            // Not over a cluster whose hole is still being punched.
            match (start..start.saturating_add(n)).find(|c| self.punching.contains(c)) {
                Some(c) => from = c + 1,
                None => return Ok(start),
            }
        }
    }

    /// `free_run` by the refcounts alone.
    fn free_run_by_refcount(&mut self, s: &dyn Storage, from: u64, n: u64) -> Result<u64> {
        let (epb, order) = (self.epb, self.order);
        let mut start = from;
        let mut c = from;
        while c - start < n {
            let b = c / epb;
            let next = (b + 1).saturating_mul(epb);
            let Some(blk) = self.block(s, b)? else {
                c = next;
                continue;
            };
            let lo = (c % epb) as usize;
            match (lo..epb as usize).find(|&i| refblock::get(blk, i, order) != 0) {
                Some(i) => {
                    let used = b * epb + i as u64;
                    if used - start >= n {
                        break;
                    }
                    start = used + 1;
                    c = start;
                }
                None => c = next,
            }
        }
        Ok(start)
    }

    /// Where the refcount table lives (offset, clusters).
    pub(crate) fn table_location(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// Offsets of all refcount blocks.
    pub(crate) fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&o| o != 0)
    }
}

#[cfg(test)]
mod tests;
