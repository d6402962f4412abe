//! A bounded cache of L2 tables keyed by their host offset, least-recently-used eviction of
//! clean tables (the `lru` crate keeps the order: a lookup, an insert and the usual eviction
//! are O(1)). Dirty tables are written by the metadata flush, which orders them, or by a
//! persister (persist before ack, which then marks them clean); a set of them makes "anything
//! dirty?" and the flush's walk cost what is dirty, not the cache size.

use super::clustermap::{ClusterHash, ClusterSet};
use crate::storage::Storage;
use lru::LruCache;
use std::io;

pub(crate) struct L2Cache {
    /// Tables by host offset, most recently used first.
    map: LruCache<u64, Vec<u64>, ClusterHash>,
    dirty: ClusterSet,
    /// Dirty tables whose copies a flush is writing without the metadata lock
    /// (`copy_dirty`); they stay dirty, so not evictable, until `copies_written`.
    flushing: ClusterSet,
    /// Tables of `flushing` changed since their copy was taken: still dirty afterwards.
    touched: ClusterSet,
    cap: usize,
}

impl L2Cache {
    pub(crate) fn new(cap: usize) -> Self {
        L2Cache {
            map: LruCache::unbounded_with_hasher(ClusterHash::default()),
            dirty: ClusterSet::default(),
            flushing: ClusterSet::default(),
            touched: ClusterSet::default(),
            cap: cap.max(4),
        }
    }

    /// A new bound (the disk grew); a smaller one takes effect at the next evictions.
    pub(crate) fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(4);
    }

    /// How many tables the cache keeps (before its slack).
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    pub(crate) fn contains(&self, off: u64) -> bool {
        self.map.contains(&off)
    }

    /// The table at `off`, if cached (it becomes the most recently used).
    pub(crate) fn get(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        self.map.get_mut(&off)
    }

    /// True when inserting would need an eviction.
    pub(crate) fn full(&self) -> bool {
        self.map.len() >= self.cap
    }

    /// True when the cache holds its cap and a slack of a quarter more (at least 4 tables):
    /// the flush a full cache asked for has not come in time.
    pub(crate) fn past_slack(&self) -> bool {
        self.map.len() >= self.cap + (self.cap / 4).max(4)
    }

    /// Drop the least recently used clean table; false when every table is dirty. Walks from
    /// the least recently used end past dirty tables only.
    pub(crate) fn evict_clean(&mut self) -> bool {
        let victim = self
            .map
            .iter()
            .rev()
            .map(|(&k, _)| k)
            .find(|k| !self.dirty.contains(k));
        match victim {
            Some(k) => {
                self.map.pop(&k);
                true
            }
            None => false,
        }
    }

    pub(crate) fn insert(&mut self, off: u64, entries: Vec<u64>, dirty: bool) {
        self.map.put(off, entries);
        if dirty {
            self.dirty.insert(off);
            self.touch(off);
        } else {
            self.dirty.remove(&off);
        }
    }

    pub(crate) fn mark_dirty(&mut self, off: u64) {
        if self.map.contains(&off) {
            self.dirty.insert(off);
            self.touch(off);
        }
    }

    fn touch(&mut self, off: u64) {
        if self.flushing.contains(&off) {
            self.touched.insert(off);
        }
    }

    /// Copies of the dirty tables among `keys` (encoded for the file, sorted by offset) for a
    /// flush that writes them without the metadata lock. They stay dirty until
    /// `copies_written`; a change meanwhile keeps a table dirty after it.
    pub(crate) fn copy_dirty(&mut self, mut keys: Vec<u64>) -> Vec<(u64, Vec<u8>)> {
        keys.sort_unstable();
        keys.dedup();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if !self.dirty.contains(&k) {
                continue;
            }
            let Some(entries) = self.map.peek(&k) else {
                self.dirty.remove(&k);
                continue;
            };
            out.push((k, crate::qcow2::format::encode_table(entries)));
            self.flushing.insert(k);
        }
        out
    }

    /// The copies from `copy_dirty` are in the file (`ok`) or not: the tables not changed
    /// since their copy become clean on success; all stay dirty on failure.
    pub(crate) fn copies_written(&mut self, ok: bool) {
        for k in std::mem::take(&mut self.flushing) {
            if ok && !self.touched.contains(&k) {
                self.dirty.remove(&k);
            }
        }
        self.touched.clear();
    }

    /// True while copies taken by `copy_dirty` are on their way to the file.
    pub(crate) fn is_flushing(&self, off: u64) -> bool {
        self.flushing.contains(&off)
    }

    pub(crate) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub(crate) fn is_dirty(&self, off: u64) -> bool {
        self.dirty.contains(&off)
    }

    /// The table at `off` is in the file as it is here (written by a persister).
    pub(crate) fn mark_clean(&mut self, off: u64) {
        self.dirty.remove(&off);
    }

    /// The dirty tables' offsets.
    pub(crate) fn dirty_keys(&self) -> Vec<u64> {
        self.dirty.iter().copied().collect()
    }

    /// The table at `off`, if cached, without changing the recency order.
    pub(crate) fn peek(&self, off: u64) -> Option<&Vec<u64>> {
        self.map.peek(&off)
    }

    /// Write the dirty tables among `keys` (no sync), each after `guard` allows it.
    pub(crate) fn write_tables<E: From<io::Error>>(
        &mut self,
        s: &dyn Storage,
        mut keys: Vec<u64>,
        guard: impl Fn(u64) -> Result<(), E>,
    ) -> Result<(), E> {
        keys.sort_unstable();
        for k in keys {
            if !self.dirty.contains(&k) {
                continue;
            }
            // Written in place, without changing the recency order.
            let Some(entries) = self.map.peek(&k) else {
                self.dirty.remove(&k);
                continue;
            };
            guard(k)?;
            s.write_at(&crate::qcow2::format::encode_table(entries), k)?;
            self.dirty.remove(&k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_clean_table() {
        let mut c = L2Cache::new(4);
        for off in [0u64, 1, 2, 3] {
            c.insert(off << 16, vec![off], false);
        }
        assert!(c.full());
        c.mark_dirty(0);
        assert!(c.get(1 << 16).is_some()); // 1 is now the most recent
        assert!(c.evict_clean()); // 0 is dirty: 2 goes
        assert!(!c.contains(2 << 16));
        assert!(c.contains(0) && c.contains(1 << 16) && c.contains(3 << 16));
        c.mark_dirty(3 << 16);
        c.mark_dirty(1 << 16);
        assert!(!c.evict_clean(), "every table left is dirty");
        let s = crate::storage::MemStorage::new();
        let keys = c.dirty_keys();
        c.write_tables::<io::Error>(&s, keys, |_| Ok(())).unwrap();
        assert!(!c.has_dirty());
        assert!(c.evict_clean());
    }

    #[test]
    fn a_table_changed_while_its_copy_is_written_stays_dirty() {
        let mut c = L2Cache::new(4);
        for off in [1u64, 2, 3] {
            c.insert(off << 16, vec![off], true);
        }
        let copies = c.copy_dirty(c.dirty_keys());
        assert_eq!(copies.len(), 3);
        assert_eq!(copies[0].0, 1 << 16, "sorted by offset");
        c.mark_dirty(2 << 16);
        assert!(c.is_flushing(3 << 16));
        c.copies_written(true);
        assert!(!c.is_dirty(1 << 16) && !c.is_dirty(3 << 16));
        assert!(c.is_dirty(2 << 16), "changed after its copy");
        assert!(!c.is_flushing(2 << 16));
        // A failed write leaves every copied table dirty.
        let _ = c.copy_dirty(vec![2 << 16]);
        c.copies_written(false);
        assert!(c.is_dirty(2 << 16));
    }
}
