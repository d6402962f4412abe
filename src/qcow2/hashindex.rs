//! The content-hash index of deduplication, a pure data structure: SHA-256 fingerprint ->
//! cluster numbers (the engine stores guest cluster + 1), at under 8 bytes per entry; and the
//! hash itself.
//!
//! Layout. The first 32 bits of the SHA-256 are the fingerprint. Its top [`SHARD_BITS`] bits pick
//! one of [`SHARDS`] shards; the remaining [`TAG_BITS`] bits are the tag stored in the slot and
//! also choose the slot's home position in the shard (`tag * capacity >> TAG_BITS`). A slot is 7
//! bytes (56 bits): the tag in the top 20 bits, the cluster number in the low 36 bits. Cluster
//! number 0 marks an empty slot (the engine stores guest cluster + 1).
//!
//! Each shard is an open-addressing table with linear probing in Robin Hood order (entries sorted
//! cyclically by home, so a lookup stops at the first entry whose home lies after its own) and
//! backward-shift deletion (no tombstones). Shards grow one at a time: when a shard passes
//! [`MAX_LOAD`] it is rehashed to a capacity giving [`GROW_TO_LOAD`], so the whole index stays
//! between those loads and no growth ever doubles the RAM of the whole index.
//!
//! Cap: cluster numbers of at most 36 bits (2^36 clusters: 4 PiB at 64 KiB clusters, 256 TiB
//! at 4 KiB clusters). A larger index is refused with [`IndexError::ClusterTooLarge`]: that cluster
//! is simply not deduplicated.
//!
//! A match is only a hint: 32 bits of fingerprint select candidates, and the engine must prove a
//! candidate still holds the same bytes (read it and compare) before linking a write to it. A false
//! positive therefore costs one read; its rate is about (entries in the shard) / 2^20 per lookup,
//! i.e. 0.001 at 1M entries (4096 shards of ~250 entries: 250 / 2^20 = 0.0002).

use sha2::{Digest, Sha256};
use std::mem::size_of;

/// SHA-256 of a cluster's bytes.
pub fn hash_cluster(data: &[u8]) -> [u8; 32] {
    let d = Sha256::digest(data);
    let mut h = [0u8; 32];
    h.copy_from_slice(&d);
    h
}

/// Whether a cluster is all zeros (it becomes a zero cluster and is never indexed).
pub fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Bits of the fingerprint that select the shard.
pub const SHARD_BITS: u32 = 12;
/// Number of shards.
pub const SHARDS: usize = 1 << SHARD_BITS;
/// Bits of the fingerprint stored in a slot.
pub const TAG_BITS: u32 = 20;
/// Bits of the cluster number stored in a slot.
pub const CLUSTER_BITS: u32 = 36;
/// Largest cluster number the index can hold.
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
    #[error("cluster number {0} cannot be indexed (0 or above the 36-bit cap)")]
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
    #[cfg(test)]
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};
    use std::collections::{HashMap, HashSet};
    use std::time::Instant;

    fn h(n: u64) -> [u8; 32] {
        hash_cluster(&n.to_le_bytes())
    }

    /// A hash with a chosen 32-bit fingerprint and distinct remaining bytes.
    fn h_fp(fp: u32, n: u64) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[0..4].copy_from_slice(&fp.to_be_bytes());
        x[4..12].copy_from_slice(&n.to_le_bytes());
        x
    }

    #[test]
    fn insert_lookup_remove() {
        let mut idx = DedupIndex::new();
        assert!(idx.lookup(&h(1)).is_empty());
        assert_eq!(idx.insert(&h(1), 10), Ok(true));
        assert_eq!(idx.insert(&h(1), 10), Ok(false));
        assert_eq!(idx.insert(&h(2), 20), Ok(true));
        assert_eq!(idx.lookup(&h(1)), vec![10]);
        assert_eq!(idx.lookup(&h(2)), vec![20]);
        assert_eq!(idx.len(), 2);
        assert!(!idx.remove(&h(1), 11));
        assert!(idx.remove(&h(1), 10));
        assert!(idx.lookup(&h(1)).is_empty());
        assert_eq!(idx.lookup(&h(2)), vec![20]);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn cluster_cap() {
        let mut idx = DedupIndex::new();
        assert_eq!(idx.insert(&h(1), 0), Err(IndexError::ClusterTooLarge(0)));
        assert_eq!(
            idx.insert(&h(1), MAX_CLUSTER + 1),
            Err(IndexError::ClusterTooLarge(MAX_CLUSTER + 1))
        );
        assert_eq!(idx.insert(&h(1), MAX_CLUSTER), Ok(true));
        assert_eq!(idx.lookup(&h(1)), vec![MAX_CLUSTER]);
    }

    #[test]
    fn tag_collisions_are_all_candidates() {
        // Same 32-bit fingerprint, different hashes: all are candidates (hints), removal is exact.
        let mut idx = DedupIndex::new();
        for n in 1..=50u64 {
            idx.insert(&h_fp(0xabcd_1234, n), n).unwrap();
        }
        // Neighbours in the same shard with nearby tags.
        for n in 1..=50u64 {
            idx.insert(&h_fp(0xabcd_1235, n), 1000 + n).unwrap();
            idx.insert(&h_fp(0xabcd_1233, n), 2000 + n).unwrap();
        }
        let mut c = idx.lookup(&h_fp(0xabcd_1234, 999));
        c.sort();
        assert_eq!(c, (1..=50).collect::<Vec<_>>());
        for n in (1..=50u64).step_by(2) {
            assert!(idx.remove(&h_fp(0xabcd_1234, 0), n));
        }
        let mut c = idx.lookup(&h_fp(0xabcd_1234, 0));
        c.sort();
        assert_eq!(c, (2..=50).step_by(2).collect::<Vec<_>>());
        assert_eq!(idx.lookup(&h_fp(0xabcd_1235, 0)).len(), 50);
        assert_eq!(idx.lookup(&h_fp(0xabcd_1233, 0)).len(), 50);
        assert!(idx.remove(&h_fp(0xabcd_1235, 7), 1001));
        assert_eq!(idx.lookup(&h_fp(0xabcd_1235, 0)).len(), 49);
    }

    #[test]
    fn growth_keeps_everything() {
        let mut idx = DedupIndex::new();
        for n in 1..=100_000u64 {
            idx.insert(&h(n), n).unwrap();
        }
        assert_eq!(idx.len(), 100_000);
        for n in 1..=100_000u64 {
            assert!(idx.contains(&h(n), n), "{n}");
        }
        let load = idx.len() as f64 / idx.slots() as f64;
        assert!(load > 0.85 && load <= MAX_LOAD, "load {load}");
    }

    #[test]
    fn random_ops_match_model() {
        for seed in 0..4u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut idx = DedupIndex::new();
            let mut model: HashMap<[u8; 4], HashSet<u64>> = HashMap::new();
            // Four shards; tags over the whole range, including the last home of a shard (wrap).
            let mut fps: Vec<u32> = (0..62).map(|_| rng.random::<u32>() & 0x003f_ffff).collect();
            fps.extend([0x000f_ffff, 0x000f_fffe]);
            let hashes: Vec<[u8; 32]> = (0..400)
                .map(|i| h_fp(fps[rng.random_range(0..fps.len())], i))
                .collect();
            let fp = |x: &[u8; 32]| [x[0], x[1], x[2], x[3]];
            for _ in 0..10_000 {
                let hh = hashes[rng.random_range(0..hashes.len())];
                let c = rng.random_range(1..300u64);
                match rng.random_range(0..10) {
                    0..=5 => {
                        let new = model.entry(fp(&hh)).or_default().insert(c);
                        assert_eq!(idx.insert(&hh, c).unwrap(), new, "seed {seed}");
                    }
                    6..=8 => {
                        let had = model.get_mut(&fp(&hh)).is_some_and(|s| s.remove(&c));
                        assert_eq!(idx.remove(&hh, c), had, "seed {seed}");
                    }
                    _ => {
                        let mut cands = idx.lookup(&hh);
                        cands.sort();
                        let mut want: Vec<u64> =
                            model.get(&fp(&hh)).into_iter().flatten().copied().collect();
                        want.sort();
                        assert_eq!(cands, want, "seed {seed}");
                    }
                }
            }
            let total: usize = model.values().map(|s| s.len()).sum();
            assert_eq!(idx.len(), total as u64);
            for (k, set) in &model {
                let mut x = [0u8; 32];
                x[..4].copy_from_slice(k);
                let mut cands = idx.lookup(&x);
                cands.sort();
                let mut want: Vec<u64> = set.iter().copied().collect();
                want.sort();
                assert_eq!(cands, want);
            }
        }
    }

    #[test]
    fn random_ops_exact_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut idx = DedupIndex::new();
        let mut model: HashMap<u64, u64> = HashMap::new(); // key n -> cluster
        for _ in 0..200_000 {
            let n = rng.random_range(0..5_000u64);
            let c = rng.random_range(1..1_000_000u64);
            if rng.random_bool(0.6) {
                if let Some(old) = model.insert(n, c) {
                    assert!(idx.remove(&h(n), old));
                }
                idx.insert(&h(n), c).unwrap();
            } else if let Some(old) = model.remove(&n) {
                assert!(idx.remove(&h(n), old));
            }
            assert_eq!(idx.len(), model.len() as u64);
        }
        for (n, c) in &model {
            assert_eq!(idx.lookup(&h(*n)), vec![*c]);
        }
    }

    #[test]
    fn ram_per_entry_1m() {
        let n = 1_000_000u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let hashes: Vec<[u8; 32]> = (0..n)
            .map(|_| {
                let mut x = [0u8; 32];
                rng.fill_bytes(&mut x);
                x
            })
            .collect();
        let t = Instant::now();
        let mut idx = DedupIndex::new();
        for (i, x) in hashes.iter().enumerate() {
            idx.insert(x, i as u64 + 1).unwrap();
        }
        let insert_s = t.elapsed().as_secs_f64();
        let per = idx.ram_bytes() as f64 / n as f64;
        let load = idx.len() as f64 / idx.slots() as f64;
        let t = Instant::now();
        let mut fp = 0u64;
        for x in &hashes {
            fp += idx.lookup(x).len() as u64 - 1;
        }
        let lookup_s = t.elapsed().as_secs_f64();
        println!(
            "dedup index 1M entries (grown): {} bytes, {per:.3} B/entry, load {load:.3}, \
             insert {insert_s:.3}s, lookup {lookup_s:.3}s, extra candidates {fp}",
            idx.ram_bytes()
        );
        assert!(per <= 8.0, "{per} bytes per entry");
        // Removals keep every other entry.
        for (i, x) in hashes.iter().enumerate().step_by(2) {
            assert!(idx.remove(x, i as u64 + 1));
        }
        for (i, x) in hashes.iter().enumerate() {
            assert_eq!(idx.contains(x, i as u64 + 1), i % 2 == 1);
        }
    }

    #[test]
    fn hash_throughput() {
        let buf = vec![0x5au8; 64 * 1024];
        let n = 512;
        let t = Instant::now();
        let mut acc = 0u8;
        for i in 0..n {
            let mut b = buf.clone();
            b[0] = i as u8;
            acc ^= hash_cluster(&b)[0];
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "sha256 64 KiB clusters: {:.0} MB/s on one core (xor {acc})",
            (n * buf.len()) as f64 / s / 1e6
        );
        let small = vec![0x5au8; 4096];
        let t = Instant::now();
        for _ in 0..8192 {
            acc ^= hash_cluster(&small)[1];
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "sha256 4 KiB clusters: {:.0} MB/s on one core (xor {acc})",
            (8192 * 4096) as f64 / s / 1e6
        );
    }
}
