//! A bounded cache of L2 tables keyed by their host offset, least-recently-used eviction of
//! clean tables. Dirty tables are written only by the metadata flush, which orders them.

use super::clustermap::ClusterMap;
use crate::storage::Storage;
use std::io;

struct Slot {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

pub(crate) struct L2Cache {
    map: ClusterMap<Slot>,
    cap: usize,
    tick: u64,
}

impl L2Cache {
    pub(crate) fn new(cap: usize) -> Self {
        L2Cache {
            map: ClusterMap::default(),
            cap: cap.max(4),
            tick: 0,
        }
    }

    pub(crate) fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    /// The table at `off`, if cached.
    pub(crate) fn get(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(&off).map(|s| {
            s.used = t;
            &mut s.entries
        })
    }

    /// True when inserting would need an eviction.
    pub(crate) fn full(&self) -> bool {
        self.map.len() >= self.cap
    }

    /// Drop the least recently used clean table; false when every table is dirty.
    pub(crate) fn evict_clean(&mut self) -> bool {
        let victim = self
            .map
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
            .map(|(&k, _)| k);
        match victim {
            Some(k) => {
                self.map.remove(&k);
                true
            }
            None => false,
        }
    }

    pub(crate) fn insert(&mut self, off: u64, entries: Vec<u64>, dirty: bool) {
        self.tick += 1;
        self.map.insert(
            off,
            Slot {
                entries,
                dirty,
                used: self.tick,
            },
        );
    }

    pub(crate) fn mark_dirty(&mut self, off: u64) {
        if let Some(s) = self.map.get_mut(&off) {
            s.dirty = true;
        }
    }

    pub(crate) fn has_dirty(&self) -> bool {
        self.map.values().any(|s| s.dirty)
    }

    /// Write every dirty table (no sync), each after `guard` allows it.
    pub(crate) fn write_dirty<E: From<io::Error>>(
        &mut self,
        s: &dyn Storage,
        guard: impl Fn(u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let keys: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        self.write_tables(s, keys, guard)
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
            let Some(slot) = self.map.get_mut(&k).filter(|s| s.dirty) else {
                continue;
            };
            guard(k)?;
            s.write_at(&crate::qcow2::format::encode_table(&slot.entries), k)?;
            slot.dirty = false;
        }
        Ok(())
    }
}
