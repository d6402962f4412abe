//! Hash maps and sets keyed by cluster numbers, for the engine's hot paths.
//!
//! std's default SipHash costs about as much per lookup as the rest of a cached L2 lookup, and a
//! dedup write does a dozen lookups (held, published, inflight, record cache, L2 cache, refcount
//! blocks). Cluster numbers need no cryptographic hash: two multiplies by fixed odd constants,
//! each folded to 64 bits (high half XOR low half), mix every key bit into the bits hashbrown uses
//! (the low bits pick the bucket, the top 7 are its tag). The key is XORed with a per-map random
//! seed first, so a guest choosing its cluster numbers cannot aim collisions (and could only slow
//! its own disk if it could). The multipliers are fixed because a random multiplier can be a
//! poor one (an earlier version seeded the multiplier and some seeds, 1 among them, sent
//! sequential keys to a handful of buckets).

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
        ClusterHash::with_seed(std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64))
    }
}

impl ClusterHash {
    fn with_seed(seed: u64) -> Self {
        ClusterHash { seed }
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

/// Two folded 64x64->128 multiplies of the seeded key (keys are written as one u64).
pub(crate) struct FoldHasher {
    seed: u64,
    h: u64,
}

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0x2d35_8dcc_aa6c_78a5;

fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u64 keys; correct for anything else.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.h = folded_multiply(folded_multiply(x ^ self.h ^ self.seed, K1), K2);
    }

    fn finish(&self) -> u64 {
        self.h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_works() {
        let mut m: ClusterMap<u64> = ClusterMap::default();
        for k in 0..10_000u64 {
            m.insert(k * 16, k);
        }
        assert!((0..10_000u64).all(|k| m.get(&(k * 16)) == Some(&k)));
        assert!(!m.contains_key(&1));
    }

    /// For any seed, sequential keys and keys a table apart must spread over the bucket bits and
    /// hashbrown's 7-bit tag as a random function would (1000 keys into 1024 buckets: about 638
    /// distinct). Fixed seeds, so this cannot pass or fail by luck: the special ones, the seed
    /// that broke the earlier multiplier-seeded version, and 64 more from a xorshift.
    #[test]
    fn keys_spread_for_every_seed() {
        let mut seeds = vec![
            0,
            1,
            3,
            u64::MAX,
            0x5555_5555_5555_5555,
            1 << 63,
            5446435742390450235,
        ];
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seeds.push(x);
        }
        for seed in seeds {
            let b = ClusterHash::with_seed(seed);
            for stride in [1u64, 8192] {
                let h: Vec<u64> = (0..1000u64).map(|k| b.hash_one(k * stride)).collect();
                let tags: ClusterSet = h.iter().map(|v| v >> 57).collect();
                assert!(
                    tags.len() > 100,
                    "seed {seed}, stride {stride}: {} tags",
                    tags.len()
                );
                let low: ClusterSet = h.iter().map(|v| v & 1023).collect();
                assert!(
                    low.len() > 550,
                    "seed {seed}, stride {stride}: {} buckets",
                    low.len()
                );
            }
        }
    }
}
