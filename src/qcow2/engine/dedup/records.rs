//! The persistent dedup records: for every guest cluster, the SHA-256 of the content the engine
//! last gave it (or nothing), in the index area of the image (docs/dedup.md). The engine keeps a
//! bounded cache of index clusters; records change under the metadata lock whenever a guest
//! cluster's content changes, and dirty index clusters are written on eviction and at close.
//! Records are hints for the RAM index; they need no ordering against data or L2 writes.
//!
//! A record is *verified* when this session computed it from data it wrote or read itself (the
//! engine holds the image's write lock, so nobody else can change the cluster after that). Only a
//! verified record may stand in for the data: for an identical rewrite (no I/O) or a link without
//! a byte compare. Records loaded from the image are not verified: QEMU may have written the
//! cluster in place since (docs/dedup.md, "Staleness").

use crate::qcow2::engine::clustermap::ClusterMap;
use crate::qcow2::engine::loading::Loading;
use crate::qcow2::error::Result;
use crate::qcow2::format::dedup as codec;
use crate::qcow2::format::dedup::{IndexCluster, PENDING};
use crate::qcow2::hashindex::is_zero;
use crate::storage::Storage;
use std::collections::VecDeque;

/// The index area: `clusters` contiguous clusters at `offset`, refcount 0, reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Area {
    pub offset: u64,
    pub clusters: u64,
}

struct Slot {
    ic: IndexCluster,
    /// One bit per record: verified this session.
    verified: Vec<u64>,
    dirty: bool,
}

/// Cached view of the index area.
pub(crate) struct Records {
    cluster_bits: u32,
    rpc: u64,
    pub area: Area,
    pub generation: u64,
    cache: ClusterMap<Slot>,
    order: VecDeque<u64>,
    cap: usize,
    /// Index clusters whose copy in the area belongs to this generation (one bit each).
    on_disk: Vec<u64>,
    /// Every record of this generation was computed this session (rebuilt from data, or started
    /// empty): all are verified.
    pub all_verified: bool,
    /// Index cluster reads and writes (for stats and tests).
    pub reads: u64,
    pub writes: u64,
    /// The guest clusters of a rebuild batch in flight, and which of them had their record set
    /// or cleared since the batch was planned (`rebuild.rs`).
    watch: Option<Watch>,
    /// Index clusters being read without the lock (`record_to_load`). A load under the lock takes
    /// the cluster out of here, and the copy read outside is then dropped.
    loading: Loading,
    /// Dirty index clusters evicted from the cache, encoded, until a request writes them
    /// without the metadata lock (`take_evicted`, `evicted_written`; true once taken). A load
    /// meanwhile takes the bytes from here, not from the area.
    evicting: ClusterMap<(Vec<u8>, bool)>,
    /// Entries of `evicting` no writer took yet.
    untaken: usize,
}

/// Guest clusters `first..first + len` watched for record changes, one bit each.
pub(crate) struct Watch {
    first: u64,
    len: u64,
    changed: Vec<u64>,
}

impl Watch {
    /// Whether the record of guest cluster `gc` was set or cleared while watched (a cluster
    /// outside the window counts as changed: nothing vouches for it).
    pub(crate) fn changed(&self, gc: u64) -> bool {
        match gc.checked_sub(self.first) {
            Some(i) if i < self.len => bit(&self.changed, i),
            _ => true,
        }
    }
}

fn bit(v: &[u64], i: u64) -> bool {
    v.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(v: &mut [u64], i: u64, on: bool) {
    if let Some(w) = v.get_mut((i / 64) as usize) {
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

impl Records {
    /// Records of `area`, generation `generation`. `on_disk`: whether the area already holds
    /// this generation (a loaded index) or not (a new generation: every cluster starts empty).
    /// `cache_bytes` bounds the RAM of cached index clusters.
    pub(crate) fn new(
        cluster_bits: u32,
        area: Area,
        generation: u64,
        on_disk: bool,
        cache_bytes: u64,
    ) -> Records {
        let words = area.clusters.div_ceil(64) as usize;
        let cs = 1u64 << cluster_bits;
        Records {
            cluster_bits,
            rpc: codec::records_per_cluster(cluster_bits),
            area,
            generation,
            cache: ClusterMap::default(),
            order: VecDeque::new(),
            cap: (cache_bytes / cs).max(4) as usize,
            on_disk: vec![if on_disk { u64::MAX } else { 0 }; words],
            all_verified: !on_disk,
            reads: 0,
            writes: 0,
            watch: None,
            loading: Loading::default(),
            evicting: ClusterMap::default(),
            untaken: 0,
        }
    }

    /// Start noting which of guest clusters `first..first + len` get their record set or
    /// cleared (every change of a guest cluster's content on an image served with dedup sets or
    /// clears its record under the lock before any data moves). Replaces any earlier watch.
    pub(crate) fn watch(&mut self, first: u64, len: u64) {
        self.watch = Some(Watch {
            first,
            len,
            changed: vec![0; len.div_ceil(64) as usize],
        });
    }

    /// The watch of `watch`, if any (it stays on).
    pub(crate) fn watched(&self) -> Option<&Watch> {
        self.watch.as_ref()
    }

    /// Stop watching.
    pub(crate) fn unwatch(&mut self) {
        self.watch = None;
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Marks index cluster `k` as not (or no longer) holding this generation on disk.
    pub(crate) fn mark_lost(&mut self, k: u64) {
        set_bit(&mut self.on_disk, k, false);
    }

    /// Move to `new`, a larger area (free clusters, not the old area): the index clusters of
    /// this generation in the old area are copied; the new ones start empty. The cached ones
    /// stay as they are (dirty ones are written to the new area later).
    pub(crate) fn move_to(&mut self, s: &dyn Storage, new: Area) -> Result<()> {
        // Reads without the lock in the old area are stale from now on.
        self.loading.clear();
        let cs = self.cs();
        let mut buf = vec![0u8; cs as usize];
        for k in 0..self.area.clusters.min(new.clusters) {
            if !bit(&self.on_disk, k) {
                continue;
            }
            s.read_at(&mut buf, self.area.offset + k * cs)?;
            s.write_at(&buf, new.offset + k * cs)?;
            self.reads += 1;
            self.writes += 1;
        }
        self.on_disk.resize(new.clusters.div_ceil(64) as usize, 0);
        // A loaded area had every bit set, also those past its last cluster.
        for k in self.area.clusters..new.clusters {
            set_bit(&mut self.on_disk, k, false);
        }
        self.area = new;
        Ok(())
    }

    /// Index clusters in the area.
    pub(crate) fn clusters(&self) -> u64 {
        self.area.clusters
    }

    fn slot(&mut self, s: &dyn Storage, k: u64) -> Result<Option<&mut Slot>> {
        if k >= self.area.clusters {
            return Ok(None);
        }
        if !self.cache.contains_key(&k) {
            // Whoever reads this cluster without the lock must not insert it after us.
            self.loading.cancel(k);
            if self.cache.len() >= self.cap {
                self.evict(s)?;
            }
            let ic = if let Some((b, _)) = self.evicting.get(&k) {
                let b = b.clone();
                self.decode(k, &b)
            } else if bit(&self.on_disk, k) {
                let mut buf = vec![0u8; self.cs() as usize];
                s.read_at(&mut buf, self.area.offset + k * self.cs())?;
                self.reads += 1;
                self.decode(k, &buf)
            } else {
                IndexCluster::empty(self.cluster_bits, self.generation, k)
            };
            self.insert(k, ic);
        }
        Ok(self.cache.get_mut(&k))
    }

    /// Index cluster `k` as read from the area (or from `evicting`).
    fn decode(&mut self, k: u64, buf: &[u8]) -> IndexCluster {
        match IndexCluster::decode(buf, self.cluster_bits, self.generation, k) {
            Ok(ic) => ic,
            // A hole: no records for this range (see `write_all`).
            Err(_) if is_zero(buf) => IndexCluster::empty(self.cluster_bits, self.generation, k),
            Err(e) => {
                log::warn!("dedup index cluster {k} unreadable ({e}): its hints are lost");
                set_bit(&mut self.on_disk, k, false);
                IndexCluster::empty(self.cluster_bits, self.generation, k)
            }
        }
    }

    fn insert(&mut self, k: u64, ic: IndexCluster) {
        let verified =
            vec![if self.all_verified { u64::MAX } else { 0 }; self.rpc.div_ceil(64) as usize];
        self.cache.insert(
            k,
            Slot {
                ic,
                verified,
                dirty: false,
            },
        );
        self.order.push_back(k);
    }

    /// If the index cluster holding guest cluster `gc`'s record must be read from the area,
    /// register the read and return (index cluster, file offset, bytes): the caller reads it
    /// without the lock, then `loaded`. None: cached, being read, or nothing to read.
    pub(crate) fn record_to_load(&mut self, gc: u64) -> Option<(u64, u64, usize, u64)> {
        let k = gc / self.rpc;
        if k >= self.area.clusters
            || self.cache.contains_key(&k)
            || self.evicting.contains_key(&k)
            || self.loading.contains(k)
            || !bit(&self.on_disk, k)
        {
            return None;
        }
        let ticket = self.loading.start(k);
        Some((
            k,
            self.area.offset + k * self.cs(),
            self.cs() as usize,
            ticket,
        ))
    }

    /// `record_to_load` for the index clusters of guest clusters `from..to` (a discard
    /// batch's), as `records_of_to_load`.
    pub(crate) fn records_to_load(
        &mut self,
        from: u64,
        to: u64,
        max: usize,
    ) -> Vec<(u64, u64, usize, u64)> {
        if from >= to {
            return Vec::new();
        }
        let rpc = self.rpc;
        self.records_of_to_load((from / rpc..=(to - 1) / rpc).map(|k| k * rpc), max)
    }

    /// `record_to_load` for the records of guest clusters `gcs` (a dedup write's candidates),
    /// at most `max` and at most half the cache, so that the ones read first are not evicted
    /// by the last.
    pub(crate) fn records_of_to_load(
        &mut self,
        gcs: impl IntoIterator<Item = u64>,
        max: usize,
    ) -> Vec<(u64, u64, usize, u64)> {
        let max = max.min(self.cap / 2).max(1);
        let mut out = Vec::new();
        for gc in gcs {
            if out.len() >= max {
                break;
            }
            out.extend(self.record_to_load(gc));
        }
        out
    }

    /// An index cluster read without the lock (`record_to_load`) arrives (None: the read failed; a
    /// load under the lock reports it): cached unless a load under the lock superseded it.
    pub(crate) fn loaded(
        &mut self,
        s: &dyn Storage,
        k: u64,
        ticket: u64,
        buf: Option<&[u8]>,
    ) -> Result<()> {
        if !self.loading.finish(k, ticket) || self.cache.contains_key(&k) {
            return Ok(());
        }
        let Some(buf) = buf else {
            return Ok(());
        };
        if self.cache.len() >= self.cap {
            self.evict(s)?;
        }
        self.reads += 1;
        let ic = self.decode(k, buf);
        self.insert(k, ic);
        Ok(())
    }

    /// Make room for one index cluster. The oldest one goes; when it is dirty, its bytes wait
    /// in `evicting` for a request to write them without the lock (or, when too many wait
    /// already, it is written here, under the lock). A dirty one whose earlier eviction is
    /// still being written stays: two writes of one cluster in flight could land in either
    /// order, and a load must find the newest bytes. If only such ones are cached, the cache
    /// takes one more for now.
    fn evict(&mut self, s: &dyn Storage) -> Result<()> {
        for _ in 0..self.order.len() {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            let busy = self.evicting.contains_key(&k);
            let Some(slot) = self.cache.get(&k) else {
                continue;
            };
            if slot.dirty && busy {
                self.order.push_back(k);
                continue;
            }
            let Some(slot) = self.cache.remove(&k) else {
                continue;
            };
            if slot.dirty {
                if self.evicting.len() < self.cap {
                    let b = slot.ic.encode(self.cluster_bits);
                    self.evicting.insert(k, (b, false));
                    self.untaken += 1;
                } else {
                    self.write_slot(s, k, &slot.ic)?;
                }
            }
            return Ok(());
        }
        Ok(())
    }

    /// True when evicted index clusters wait for a writer (`take_evicted`).
    pub(crate) fn has_evicted(&self) -> bool {
        self.untaken > 0
    }

    /// Evicted index clusters nobody writes yet, at most `max`: (index cluster, file offset,
    /// bytes). The caller holds the writeback lock (so the area cannot move meanwhile), writes
    /// them without the metadata lock, and reports each with `evicted_written`.
    pub(crate) fn take_evicted(&mut self, max: usize) -> Vec<(u64, u64, Vec<u8>)> {
        let (off, cs) = (self.area.offset, self.cs());
        let mut out = Vec::new();
        for (&k, (b, taken)) in self.evicting.iter_mut() {
            if out.len() >= max {
                break;
            }
            if !*taken {
                *taken = true;
                out.push((k, off + k * cs, b.clone()));
            }
        }
        self.untaken -= out.len();
        out
    }

    /// The write of evicted index cluster `k` finished (`ok`: it is in the area now).
    pub(crate) fn evicted_written(&mut self, k: u64, ok: bool) {
        if self.evicting.remove(&k).is_none() {
            return;
        }
        if ok {
            self.writes += 1;
            set_bit(&mut self.on_disk, k, true);
            return;
        }
        // What the area holds for it is unknown now: its records are lost, unless the cache
        // has them again; those go out with the next eviction or close.
        set_bit(&mut self.on_disk, k, false);
        if let Some(slot) = self.cache.get_mut(&k) {
            slot.dirty = true;
        }
    }

    fn write_slot(&mut self, s: &dyn Storage, k: u64, ic: &IndexCluster) -> Result<()> {
        s.write_at(
            &ic.encode(self.cluster_bits),
            self.area.offset + k * self.cs(),
        )?;
        self.writes += 1;
        set_bit(&mut self.on_disk, k, true);
        Ok(())
    }

    /// The record of guest cluster `gc` and whether it is verified (None also for a cluster
    /// pending background dedup).
    pub(crate) fn get(&mut self, s: &dyn Storage, gc: u64) -> Result<Option<([u8; 32], bool)>> {
        let (k, i) = (gc / self.rpc, (gc % self.rpc) as usize);
        Ok(self.slot(s, k)?.and_then(|slot| {
            slot.ic
                .get(i)
                .filter(|h| **h != PENDING)
                .map(|h| (*h, bit(&slot.verified, i as u64)))
        }))
    }

    /// Records guest cluster `gc` as pending background dedup (its content is not hashed yet).
    pub(crate) fn set_pending(&mut self, s: &dyn Storage, gc: u64) -> Result<Option<[u8; 32]>> {
        self.set(s, gc, Some(&PENDING), false)
    }

    /// Sets (or clears) the record of guest cluster `gc`; returns the hash it replaced (None when
    /// there was none or the cluster was pending).
    pub(crate) fn set(
        &mut self,
        s: &dyn Storage,
        gc: u64,
        hash: Option<&[u8; 32]>,
        verified: bool,
    ) -> Result<Option<[u8; 32]>> {
        // Noted first: a change whose record fails to load still counts as a change.
        if let Some(w) = self.watch.as_mut() {
            if let Some(i) = gc.checked_sub(w.first).filter(|&i| i < w.len) {
                set_bit(&mut w.changed, i, true);
            }
        }
        let (k, i) = (gc / self.rpc, (gc % self.rpc) as usize);
        let Some(slot) = self.slot(s, k)? else {
            return Ok(None);
        };
        let old = slot.ic.get(i).copied();
        if old.as_ref() != hash {
            slot.ic.set(i, hash);
            slot.dirty = true;
        }
        set_bit(&mut slot.verified, i as u64, verified && hash.is_some());
        Ok(old.filter(|h| *h != PENDING))
    }

    /// Writes every dirty index cluster, and zeros (a hole where the file system can punch one)
    /// wherever the area does not hold this generation yet: an all-zero index cluster means "no
    /// records", so the whole area loads next time without the empty ranges taking disk space
    /// (an area is 0.8% of the disk at 4 KiB clusters). The caller syncs.
    pub(crate) fn write_all(&mut self, s: &dyn Storage) -> Result<()> {
        // Evicted ones first (the same bytes a writer outside may be writing; a cached copy
        // loaded from them since, and changed, is written after).
        let (off, cs) = (self.area.offset, self.cs());
        let mut ev: Vec<u64> = self.evicting.keys().copied().collect();
        ev.sort_unstable();
        for k in ev {
            let Some((b, taken)) = self.evicting.get(&k) else {
                continue;
            };
            let taken = *taken;
            s.write_at(b, off + k * cs)?;
            self.writes += 1;
            set_bit(&mut self.on_disk, k, true);
            if !taken {
                self.evicting.remove(&k);
                self.untaken -= 1;
            }
        }
        let mut ks: Vec<u64> = self.cache.keys().copied().collect();
        ks.sort_unstable();
        for k in ks {
            let Some(slot) = self.cache.get_mut(&k) else {
                continue;
            };
            if !slot.dirty {
                continue;
            }
            slot.dirty = false;
            let ic = slot.ic.clone();
            self.write_slot(s, k, &ic)?;
        }
        let cs = self.cs();
        let mut k = 0;
        while k < self.area.clusters {
            let stale = |r: &Self, k: u64| {
                !bit(&r.on_disk, k) && !r.cache.contains_key(&k) && !r.evicting.contains_key(&k)
            };
            if !stale(self, k) {
                k += 1;
                continue;
            }
            let first = k;
            while k < self.area.clusters && stale(self, k) {
                set_bit(&mut self.on_disk, k, true);
                k += 1;
            }
            let (off, len) = (self.area.offset + first * cs, (k - first) * cs);
            if s.punch_hole(off, len).is_err() {
                let zeros = vec![0u8; cs as usize];
                for j in 0..k - first {
                    s.write_at(&zeros, off + j * cs)?;
                }
            }
            self.writes += 1;
        }
        Ok(())
    }

    /// Bytes of RAM the cache holds.
    pub(crate) fn ram_bytes(&self) -> u64 {
        self.cache.len() as u64 * (self.rpc * 32 + self.rpc / 8 + 64)
            + self.on_disk.len() as u64 * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn area() -> Area {
        Area {
            offset: 4096 * 10,
            clusters: 5,
        }
    }

    #[test]
    fn set_get_evict_and_reload() {
        let s = MemStorage::new();
        let mut r = Records::new(12, area(), 7, false, 4 * 4096);
        let h = [9u8; 32];
        for gc in 0..(5 * 127) {
            r.set(&s, gc, Some(&h), true).unwrap();
        }
        assert!(r.has_evicted(), "the cache of 4 clusters evicted one");
        assert_eq!(r.get(&s, 3).unwrap(), Some((h, true)));
        r.write_all(&s).unwrap();
        // A new view of the same generation, loaded: records are there but not verified.
        let mut r2 = Records::new(12, area(), 7, true, 1 << 20);
        assert_eq!(r2.get(&s, 5 * 127 - 1).unwrap(), Some((h, false)));
        assert_eq!(r2.set(&s, 0, None, false).unwrap(), Some(h));
        assert_eq!(r2.get(&s, 0).unwrap(), None);
        // Past the area: nothing, no error.
        assert_eq!(r2.get(&s, 5 * 127).unwrap(), None);
        // Another generation does not accept these clusters.
        let mut r3 = Records::new(12, area(), 8, true, 1 << 20);
        assert_eq!(r3.get(&s, 1).unwrap(), None);
    }

    #[test]
    fn an_evicted_dirty_cluster_waits_for_its_writer_and_loads_from_memory_meanwhile() {
        let s = MemStorage::new();
        let big = Area {
            offset: 4096 * 10,
            clusters: 10,
        };
        let mut r = Records::new(12, big, 7, false, 4 * 4096);
        let (h, h2) = ([9u8; 32], [5u8; 32]);
        // Five index clusters' worth of records (127 each) in a cache of four: the first one
        // is evicted dirty, and nothing is written under the lock.
        for gc in 0..(5 * 127) {
            r.set(&s, gc, Some(&h), true).unwrap();
        }
        assert_eq!(r.writes, 0);
        let batch = r.take_evicted(16);
        assert_eq!(batch.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0]);
        assert!(!r.has_evicted(), "taken by its writer");
        // Before the write lands, the cluster loads from its evicted bytes, not the area.
        let reads = r.reads;
        assert_eq!(r.get(&s, 3).unwrap(), Some((h, true)));
        assert_eq!(r.reads, reads);
        // Changed again while its write is out: it is not evicted a second time meanwhile.
        r.set(&s, 3, Some(&h2), true).unwrap();
        for gc in (5 * 127)..(9 * 127) {
            r.set(&s, gc, Some(&h), true).unwrap();
        }
        assert_eq!(r.get(&s, 3).unwrap(), Some((h2, true)), "still cached");
        assert!(r.take_evicted(16).iter().all(|b| b.0 != 0));
        let (k, off, bytes) = &batch[0];
        s.write_at(bytes, *off).unwrap();
        r.evicted_written(*k, true);
        r.write_all(&s).unwrap();
        let mut r2 = Records::new(12, big, 7, true, 1 << 20);
        assert_eq!(r2.get(&s, 3).unwrap(), Some((h2, false)));
        assert_eq!(r2.get(&s, 9 * 127 - 1).unwrap(), Some((h, false)));
    }

    #[test]
    fn an_index_cluster_read_outside_the_lock_yields_to_a_load_under_it() {
        let s = MemStorage::new();
        let h = [9u8; 32];
        let mut r = Records::new(12, area(), 7, false, 1 << 20);
        r.set(&s, 5, Some(&h), true).unwrap();
        r.write_all(&s).unwrap();
        let mut r = Records::new(12, area(), 7, true, 1 << 20);
        let (k, off, len, ticket) = r.record_to_load(5).unwrap();
        assert!(r.record_to_load(6).is_none(), "one read per index cluster");
        let mut fresh = vec![0u8; len];
        s.read_at(&mut fresh, off).unwrap();
        // A load under the lock comes first; the copy read outside is then dropped.
        assert_eq!(r.get(&s, 5).unwrap(), Some((h, false)));
        r.set(&s, 5, None, false).unwrap();
        r.loaded(&s, k, ticket, Some(&fresh)).unwrap();
        assert_eq!(
            r.get(&s, 5).unwrap(),
            None,
            "the older copy did not replace the cache"
        );
        // Without one, the copy read outside is cached.
        let mut r = Records::new(12, area(), 7, true, 1 << 20);
        let (k, _, _, ticket) = r.record_to_load(5).unwrap();
        r.loaded(&s, k, ticket, Some(&fresh)).unwrap();
        let reads = r.reads;
        assert_eq!(r.get(&s, 5).unwrap(), Some((h, false)));
        assert_eq!(r.reads, reads, "no read under the lock");
    }

    #[test]
    fn write_all_fills_the_area() {
        let s = MemStorage::new();
        let mut r = Records::new(12, area(), 1, false, 1 << 20);
        r.set(&s, 130, Some(&[1u8; 32]), true).unwrap();
        s.write_at(&[7u8; 5 * 4096], area().offset).unwrap();
        r.write_all(&s).unwrap();
        assert_eq!(r.writes, 3, "cluster 1, then the runs 0 and 2..5 zeroed");
        let mut buf = vec![0u8; 4096];
        for k in 0..5 {
            s.read_at(&mut buf, area().offset + k * 4096).unwrap();
            if k == 1 {
                let ic = IndexCluster::decode(&buf, 12, 1, k).unwrap();
                assert!(ic.get(130 - 127).is_some());
            } else {
                assert!(buf.iter().all(|&b| b == 0), "cluster {k} zeroed");
            }
        }
        // Loaded again: the zeroed clusters are empty, not lost.
        let mut r2 = Records::new(12, area(), 1, true, 1 << 20);
        assert_eq!(r2.get(&s, 0).unwrap(), None);
        assert_eq!(r2.get(&s, 130).unwrap(), Some(([1u8; 32], false)));
        assert!(bit(&r2.on_disk, 0), "a zeroed cluster is not a lost one");
    }
}
