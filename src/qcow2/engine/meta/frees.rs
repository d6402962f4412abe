//! Frees: host clusters an L2 change unlinked wait here until the unlink is durable and no
//! I/O planned before it can still touch them; then their refcounts drop, and those that reach
//! zero are punched out of the file. A child of `meta` so that it works on the core's own
//! fields.

use super::Meta;
use crate::qcow2::error::Result;
use crate::qcow2::format::L2Entry;
use crate::storage::Storage;
use std::sync::atomic::Ordering;

/// How many unapplied frees make the engine flush on its own.
pub(crate) const PENDING_FREE_LIMIT: usize = 4096;

/// How many refcount blocks one round of reads without the lock takes (`refcounts_to_load`).
pub(crate) const MAX_BLOCK_LOADS: usize = 64;

/// Punch the holes of freed cluster runs (first, count); a failure only keeps the old bytes
/// (logged).
/// Punch the holes of `runs` (first cluster, count); returns the runs punched.
pub(crate) fn punch_runs(s: &dyn Storage, cs: u64, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut done = Vec::with_capacity(runs.len());
    for &(first, n) in runs {
        match s.punch_hole(first * cs, n * cs) {
            Ok(()) => done.push((first, n)),
            Err(e) => log::debug!("punch hole at clusters {first}..{}: {e}", first + n),
        }
    }
    done
}

impl Meta {
    /// Queue the host clusters `entry` holds for release once its replacement is durable.
    pub(crate) fn release(&mut self, s: &dyn Storage, gc: u64, entry: L2Entry) -> Result<()> {
        let cs = self.g.cluster_size();
        if let L2Entry::Normal { host, .. } = entry {
            self.sharing.remove(host.0 / cs, gc);
        }
        match entry {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => self.pending_unlink.push(host.0 / cs),
            L2Entry::Compressed { host, size } => {
                let first = (host & !511) / cs;
                let last = (host + size.max(1) - 1) / cs;
                for c in first..=last {
                    self.pending_unlink.push(c);
                }
            }
            _ => {}
        }
        // (Frees waiting for old I/O are not counted: no flush can apply those.) At the limit
        // the request asks for a flush without the lock once it is done (discards flush
        // between their batches, `zero_range`); this flush under the lock is the backstop.
        if self.pending_unlink.len() > PENDING_FREE_LIMIT {
            self.flush_wanted.store(true, Ordering::Relaxed);
        }
        if self.pending_unlink.len() > 4 * PENDING_FREE_LIMIT && !self.flush_outside {
            self.stats.locked_flushes += 1;
            self.flush(s)?;
        }
        Ok(())
    }

    /// Frees waiting for the next flush to make their unlink durable.
    pub(crate) fn frees_pending(&self) -> usize {
        self.pending_unlink.len()
    }

    /// The clusters a flush will free: those waiting for I/O, then `unlinked` (the flush's).
    fn frees_with<'a>(&'a self, unlinked: &'a [u64]) -> impl Iterator<Item = u64> + 'a {
        self.pending_io
            .iter()
            .map(|&(_, c)| c)
            .chain(unlinked.iter().copied())
    }

    /// Refcount blocks that are not cached but that a flush's frees need: those of the frees
    /// waiting for I/O and of `unlinked` (the flush's). At most `MAX_BLOCK_LOADS`, the lowest
    /// first, as (block, file offset, ticket), each marked as being read (see
    /// `Refcounts::block_to_load`): the caller reads them without the lock. Called again
    /// after those reads, it hands out the next ones.
    pub(crate) fn refcounts_to_load(&mut self, unlinked: &[u64]) -> Vec<(u64, u64, u64)> {
        let mut blocks: Vec<u64> = Vec::new();
        // Frees come in runs: a block is looked up once per run of its clusters, and only
        // the missing ones are sorted.
        let mut last = None;
        for c in self.frees_with(unlinked) {
            let b = self.rc.block_of(c);
            if last != Some(b) && self.rc.wants_load(b) {
                blocks.push(b);
            }
            last = Some(b);
        }
        blocks.sort_unstable();
        blocks.dedup();
        let mut out = Vec::new();
        for b in blocks {
            if out.len() >= MAX_BLOCK_LOADS {
                break;
            }
            if let Some((off, ticket)) = self.rc.block_to_load(b) {
                out.push((b, off, ticket));
            }
        }
        out
    }

    /// Guest clusters whose L2 tables the frees of a flush may look up and the cache lacks,
    /// one per table, at most half the cache: the sharers of the clusters freed, among which
    /// `unref_ready` finds the one user left of a cluster whose refcount falls to 1. The
    /// caller reads those tables without the lock.
    pub(crate) fn free_tables_to_load(&self, unlinked: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        if self.sharing.is_empty() {
            // No dedup link: no lookup per free under the lock on every flush.
            return out;
        }
        let max = self.l2.cap() / 2;
        let mut tables = std::collections::HashSet::new();
        for c in self.frees_with(unlinked) {
            for g in self.sharing.sharers(c) {
                let Ok(Some(off)) = self.l1_entry(g).map(|e| e.l2_offset) else {
                    continue;
                };
                if self.l2.contains(off.0) || self.loading.contains(off.0) || !tables.insert(off.0)
                {
                    continue;
                }
                out.push(g);
                if out.len() >= max {
                    return out;
                }
            }
        }
        out
    }

    /// Decrement the refcounts of clusters whose unlink is durable and that no in-flight I/O can
    /// still touch. Clusters that drop to zero are punched out of the file.
    pub(crate) fn apply_frees(&mut self, s: &dyn Storage) -> Result<()> {
        let (r, runs) = self.apply_frees_unpunched(s);
        // Under the lock: no sync follows, so none of them counts as a durable hole.
        punch_runs(s, self.g.cluster_size(), &runs);
        self.rc.punched(&runs, &[]);
        r
    }

    /// `apply_frees` without the hole punches: the runs (first cluster, count) of clusters that
    /// reached zero, which the allocator skips until the caller has punched them (without the
    /// lock) and called `punched`. Freed clusters are punched together, a run of neighbours in
    /// one call (one fallocate per cluster made a large discard or an offline dedup wait on
    /// the file system's journal cluster by cluster).
    pub(crate) fn apply_frees_unpunched(
        &mut self,
        s: &dyn Storage,
    ) -> (Result<()>, Vec<(u64, u64)>) {
        let oldest = self.inflight_io.keys().next().copied().unwrap_or(u64::MAX);
        let (ready, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_io)
            .into_iter()
            .partition(|&(seq, _)| seq <= oldest);
        self.pending_io = wait;
        let mut freed = Vec::new();
        let r = self.unref_ready(s, ready, &mut freed);
        freed.sort_unstable();
        let mut runs = Vec::new();
        let mut i = 0;
        while i < freed.len() {
            let first = freed[i];
            let mut n = 1;
            while freed.get(i + n as usize) == Some(&(first + n)) {
                n += 1;
            }
            runs.push((first, n));
            i += n as usize;
        }
        self.rc.hold_punching(&runs);
        (r, runs)
    }

    /// The holes of `runs` (from `apply_frees_unpunched`) are punched.
    /// `durable`: the runs whose holes a sync made durable since (see `Refcounts::punched`).
    pub(crate) fn punched(&mut self, runs: &[(u64, u64)], durable: &[(u64, u64)]) {
        self.rc.punched(runs, durable);
    }

    /// Drop one reference of each cluster in `ready`; those that reach 0 go into `freed`.
    fn unref_ready(
        &mut self,
        s: &dyn Storage,
        ready: Vec<(u64, u64)>,
        freed: &mut Vec<u64>,
    ) -> Result<()> {
        let cs = self.g.cluster_size();
        for (seq, c) in ready {
            if self.pinned.contains_key(&c) {
                // A verifier is reading this cluster: free it later.
                self.pending_io.push((seq, c));
                continue;
            }
            match self.rc.add(s, c, -1)? {
                0 => {
                    self.sharing.take(c);
                    self.stats.clusters_freed += 1;
                    freed.push(c);
                }
                1 => {
                    if let Some(list) = self.sharing.take(c) {
                        // The one entry still pointing at the cluster gets COPIED back.
                        let mut alive = Vec::new();
                        for g in list {
                            if matches!(self.entry(s, g)?, L2Entry::Normal { host, .. } if host.0 / cs == c)
                            {
                                alive.push(g);
                            }
                        }
                        if let [survivor] = alive[..] {
                            self.set_copied(s, survivor, c, true)?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}
