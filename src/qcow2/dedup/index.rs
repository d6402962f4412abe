//! The in-RAM deduplication index: SHA-256 fingerprint -> host cluster index, at under 8 bytes per
//! unique cluster.
//!
//! Layout. The first 32 bits of the SHA-256 are the fingerprint. Its top [`SHARD_BITS`] bits pick
//! one of [`SHARDS`] shards; the remaining [`TAG_BITS`] bits are the tag stored in the slot and
//! also choose the slot's home position in the shard (`tag * capacity >> TAG_BITS`). A slot is 7
//! bytes (56 bits): the tag in the top 20 bits, the host cluster index in the low 36 bits. Cluster
//! index 0 (the image header, never a data cluster) marks an empty slot.
//!
//! Each shard is an open-addressing table with linear probing in Robin Hood order (entries sorted
//! cyclically by home, so a lookup stops at the first entry whose home lies after its own) and
//! backward-shift deletion (no tombstones). Shards grow one at a time: when a shard passes
//! [`MAX_LOAD`] it is rehashed to a capacity giving [`GROW_TO_LOAD`], so the whole index stays
//! between those loads and no growth ever doubles the RAM of the whole index.
//!
//! Cap: host cluster indices of at most 36 bits (2^36 clusters: 4 PiB at 64 KiB clusters, 256 TiB
//! at 4 KiB clusters). A larger index is refused with [`IndexError::ClusterTooLarge`]: that cluster
//! is simply not deduplicated.
//!
//! A match is only a hint: 32 bits of fingerprint select candidates, and the engine must prove a
//! candidate still holds the same bytes (read it and compare) before linking a write to it. A false
//! positive therefore costs one read; its rate is about (entries in the shard) / 2^20 per lookup,
//! i.e. 0.001 at 1M entries (4096 shards of ~250 entries: 250 / 2^20 = 0.0002).

use std::mem::size_of;

/// Bits of the fingerprint that select the shard.
pub const SHARD_BITS: u32 = 12;
/// Number of shards.
pub const SHARDS: usize = 1 << SHARD_BITS;
/// Bits of the fingerprint stored in a slot.
pub const TAG_BITS: u32 = 20;
/// Bits of the host cluster index stored in a slot.
pub const CLUSTER_BITS: u32 = 36;
/// Largest host cluster index the index can hold.
pub const MAX_CLUSTER: u64 = (1 << CLUSTER_BITS) - 1;
/// Bytes per slot.
pub const SLOT_BYTES: usize = 7;
/// A shard is rehashed when an insert would take it above this load.
pub const MAX_LOAD: f64 = 0.95;
/// Load of a shard right after it is rehashed.
pub const GROW_TO_LOAD: f64 = 0.90;
/// Smallest non-empty shard capacity (slots).
const MIN_CAPACITY: usize = 8;

const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// Errors of the RAM index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("host cluster {0} cannot be indexed (0 or above the 36-bit cap)")]
    ClusterTooLarge(u64),
}

/// The fingerprint of a SHA-256: (shard, tag).
fn fingerprint(hash: &[u8; 32]) -> (usize, u64) {
    let f = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]);
    ((f >> TAG_BITS) as usize, u64::from(f) & TAG_MASK)
}

fn pack(tag: u64, cluster: u64) -> u64 {
    (tag << CLUSTER_BITS) | cluster
}

fn slot_tag(slot: u64) -> u64 {
    slot >> CLUSTER_BITS
}

fn slot_cluster(slot: u64) -> u64 {
    slot & MAX_CLUSTER
}

/// One shard: `cap` slots of [`SLOT_BYTES`] bytes each.
#[derive(Default)]
struct Shard {
    slots: Box<[u8]>,
    len: u32,
}

impl Shard {
    fn cap(&self) -> usize {
        self.slots.len() / SLOT_BYTES
    }

    fn get(&self, i: usize) -> u64 {
        let o = i * SLOT_BYTES;
        let mut b = [0u8; 8];
        b[..SLOT_BYTES].copy_from_slice(&self.slots[o..o + SLOT_BYTES]);
        u64::from_le_bytes(b)
    }

    fn set(&mut self, i: usize, v: u64) {
        let o = i * SLOT_BYTES;
        self.slots[o..o + SLOT_BYTES].copy_from_slice(&v.to_le_bytes()[..SLOT_BYTES]);
    }

    fn home(&self, tag: u64) -> usize {
        ((tag * self.cap() as u64) >> TAG_BITS) as usize
    }

    /// Distance from `home` forward (cyclically) to `pos`.
    fn dist(&self, home: usize, pos: usize) -> usize {
        if pos >= home {
            pos - home
        } else {
            pos + self.cap() - home
        }
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.cap() {
            0
        } else {
            i + 1
        }
    }

    /// Calls `f` with the cluster of every slot whose tag is `tag`, in probe order, until `f`
    /// returns false.
    fn scan(&self, tag: u64, mut f: impl FnMut(usize, u64) -> bool) {
        let cap = self.cap();
        if cap == 0 {
            return;
        }
        let home = self.home(tag);
        let mut pos = home;
        for d in 0..cap {
            let s = self.get(pos);
            if slot_cluster(s) == 0 {
                return;
            }
            let st = slot_tag(s);
            if st == tag {
                if !f(pos, slot_cluster(s)) {
                    return;
                }
            } else if self.dist(self.home(st), pos) < d {
                // Robin Hood order: this entry's home is after ours, so ours cannot follow.
                return;
            }
            pos = self.next(pos);
        }
    }

    /// Inserts into a shard that has room for at least one more entry.
    fn insert_slot(&mut self, v: u64) -> bool {
        let cap = self.cap();
        let mut pos = self.home(slot_tag(v));
        let mut cur = v;
        let mut d = 0;
        // Robin Hood: take the slot of the first entry that is closer to its home than we are,
        // and carry that entry on.
        for _ in 0..cap {
            let s = self.get(pos);
            if slot_cluster(s) == 0 {
                self.set(pos, cur);
                self.len += 1;
                return true;
            }
            let sd = self.dist(self.home(slot_tag(s)), pos);
            if sd < d {
                self.set(pos, cur);
                cur = s;
                d = sd;
            }
            pos = self.next(pos);
            d += 1;
        }
        // Unreachable with load < 1 (the caller grows the shard first); losing a hint is harmless.
        log::error!("dedup index shard full: entry dropped");
        false
    }

    /// Removes the slot at `pos` and shifts the following run back.
    fn remove_at(&mut self, mut pos: usize) {
        loop {
            let n = self.next(pos);
            let s = self.get(n);
            if slot_cluster(s) == 0 || self.home(slot_tag(s)) == n {
                self.set(pos, 0);
                break;
            }
            self.set(pos, s);
            pos = n;
        }
        self.len -= 1;
    }

    fn rehash(&mut self, cap: usize) {
        let old = std::mem::replace(
            self,
            Shard {
                slots: vec![0u8; cap * SLOT_BYTES].into_boxed_slice(),
                len: 0,
            },
        );
        for i in 0..old.cap() {
            let s = old.get(i);
            if slot_cluster(s) != 0 {
                self.insert_slot(s);
            }
        }
    }

    fn needs_growth(&self) -> bool {
        let cap = self.cap();
        cap == 0 || (self.len as f64 + 1.0) > cap as f64 * MAX_LOAD
    }

    fn grow(&mut self) {
        let want = ((self.len as f64 + 1.0) / GROW_TO_LOAD).ceil() as usize;
        let cap = want.max(self.cap() + 1).max(MIN_CAPACITY);
        self.rehash(cap);
    }
}

/// The in-RAM index. Not synchronised: the engine keeps it under its own lock.
pub struct DedupIndex {
    shards: Vec<Shard>,
    len: u64,
}

impl Default for DedupIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl DedupIndex {
    /// An empty index (fixed cost: one 24-byte header per shard, 96 KiB).
    pub fn new() -> Self {
        let mut shards = Vec::with_capacity(SHARDS);
        shards.resize_with(SHARDS, Shard::default);
        DedupIndex { shards, len: 0 }
    }

    /// An empty index sized for `entries` unique clusters without growing (for example, the number
    /// of data clusters in the image at open).
    pub fn with_capacity(entries: u64) -> Self {
        let mut idx = Self::new();
        let per = entries.div_ceil(SHARDS as u64) as f64;
        let cap = ((per / GROW_TO_LOAD).ceil() as usize).max(MIN_CAPACITY);
        if entries > 0 {
            for s in &mut idx.shards {
                s.rehash(cap);
            }
        }
        idx
    }

    /// Number of entries (hash, cluster) in the index.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of RAM the index holds: the shard vector plus every shard's slots (allocator
    /// bookkeeping not counted).
    pub fn ram_bytes(&self) -> u64 {
        let slots: usize = self.shards.iter().map(|s| s.slots.len()).sum();
        (size_of::<Self>() + self.shards.capacity() * size_of::<Shard>() + slots) as u64
    }

    /// Total slots (for load-factor reporting).
    pub fn slots(&self) -> u64 {
        self.shards.iter().map(|s| s.cap() as u64).sum()
    }

    /// Host clusters whose fingerprint matches `hash`: hints, to be verified by the caller.
    pub fn lookup(&self, hash: &[u8; 32]) -> Vec<u64> {
        let mut v = Vec::new();
        self.for_each_candidate(hash, |c| {
            v.push(c);
            true
        });
        v
    }

    /// Calls `f` with each candidate host cluster for `hash` until it returns false. No allocation.
    pub fn for_each_candidate(&self, hash: &[u8; 32], mut f: impl FnMut(u64) -> bool) {
        let (shard, tag) = fingerprint(hash);
        if let Some(s) = self.shards.get(shard) {
            s.scan(tag, |_, c| f(c));
        }
    }

    /// Whether exactly this (hash fingerprint, cluster) pair is indexed.
    pub fn contains(&self, hash: &[u8; 32], cluster: u64) -> bool {
        let mut found = false;
        self.for_each_candidate(hash, |c| {
            found = c == cluster;
            !found
        });
        found
    }

    /// Adds (hash, cluster). Returns false if that pair was already there. Several clusters may
    /// share one hash; the caller decides whether to remove the old one first.
    pub fn insert(&mut self, hash: &[u8; 32], cluster: u64) -> Result<bool, IndexError> {
        if cluster == 0 || cluster > MAX_CLUSTER {
            return Err(IndexError::ClusterTooLarge(cluster));
        }
        if self.contains(hash, cluster) {
            return Ok(false);
        }
        let (shard, tag) = fingerprint(hash);
        let Some(s) = self.shards.get_mut(shard) else {
            return Err(IndexError::ClusterTooLarge(cluster));
        };
        if s.needs_growth() {
            s.grow();
        }
        let inserted = s.insert_slot(pack(tag, cluster));
        if inserted {
            self.len += 1;
        }
        Ok(inserted)
    }

    /// Forgets (hash, cluster): its cluster was freed or rewritten. Returns whether it was there.
    pub fn remove(&mut self, hash: &[u8; 32], cluster: u64) -> bool {
        let (shard, tag) = fingerprint(hash);
        let Some(s) = self.shards.get_mut(shard) else {
            return false;
        };
        let mut at = None;
        s.scan(tag, |pos, c| {
            if c == cluster {
                at = Some(pos);
                false
            } else {
                true
            }
        });
        match at {
            Some(pos) => {
                s.remove_at(pos);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// Shrinks every shard loaded below [`GROW_TO_LOAD`] to that load, one shard at a time (for
    /// after a load into an index presized from an upper bound, or after many removals).
    pub fn shrink_to_fit(&mut self) {
        for s in &mut self.shards {
            let want = if s.len == 0 {
                0
            } else {
                ((s.len as f64 / GROW_TO_LOAD).ceil() as usize).max(MIN_CAPACITY)
            };
            if want < s.cap() {
                s.rehash(want);
            }
        }
    }

    /// Forgets every entry pointing at `cluster` when its hash is not known. O(entries): for
    /// rare bulk invalidation only.
    pub fn remove_cluster_slow(&mut self, cluster: u64) -> u64 {
        let mut removed = 0;
        for s in &mut self.shards {
            let mut i = 0;
            while i < s.cap() {
                let v = s.get(i);
                if slot_cluster(v) == cluster && cluster != 0 {
                    // Backward shift may move a not-yet-visited entry into `i`: look again.
                    s.remove_at(i);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
        }
        self.len -= removed;
        removed
    }
}
