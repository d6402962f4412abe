//! Hash maps and sets keyed by cluster numbers, for the engine's hot paths.
//!
//! std's default SipHash costs about as much per lookup as the rest of a cached L2 lookup, and a
//! dedup write does a dozen lookups (held, published, inflight, record cache, L2 cache, refcount
//! blocks). Cluster numbers need no cryptographic hash: one multiply folded to 64 bits mixes every
//! key bit into the bits hashbrown uses. The multiplier is seeded per map from std's random
//! state, so a guest choosing its cluster numbers cannot aim collisions (and could only slow its
//! own disk if it could).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};

/// A map keyed by cluster numbers.
pub(crate) type ClusterMap<V> = HashMap<u64, V, ClusterHash>;
/// A set of cluster numbers.
pub(crate) type ClusterSet = HashSet<u64, ClusterHash>;

/// Builds `FoldHasher`s with a per-map random seed.
#[derive(Clone)]
pub(crate) struct ClusterHash {
    seed: u64,
}

impl Default for ClusterHash {
    fn default() -> Self {
        ClusterHash {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl BuildHasher for ClusterHash {
    type Hasher = FoldHasher;
    fn build_hasher(&self) -> FoldHasher {
        FoldHasher {
            seed: self.seed,
            h: 0,
        }
    }
}

/// Folded 64x64->128 multiply of the key with the seed (keys are written as one u64).
pub(crate) struct FoldHasher {
    seed: u64,
    h: u64,
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; correct for anything else.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let p = u128::from(x ^ self.h ^ K) * u128::from(self.seed);
        self.h = (p as u64) ^ ((p >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_works_and_sequential_keys_spread() {
        let mut m: ClusterMap<u64> = ClusterMap::default();
        for k in 0..10_000u64 {
            m.insert(k * 16, k);
        }
        assert!((0..10_000u64).all(|k| m.get(&(k * 16)) == Some(&k)));
        assert!(!m.contains_key(&1));
        // Sequential keys must differ in the top 7 bits (hashbrown's tag) as well as the low ones.
        let b = ClusterHash::default();
        let tags: ClusterSet = (0..1000u64).map(|k| b.hash_one(k) >> 57).collect();
        assert!(tags.len() > 100, "{} distinct tags", tags.len());
        let low: ClusterSet = (0..1000u64).map(|k| b.hash_one(k) & 1023).collect();
        assert!(low.len() > 500, "{} distinct low bits", low.len());
    }
}
