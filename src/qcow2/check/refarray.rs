//! The computed ("expected") refcount of every host cluster, as the checker counts references.
//!
//! Two bytes per cluster, in chunks of `CHUNK` clusters allocated when a cluster in them is first
//! counted: the RAM follows what the image references, not the length of the file (a small image
//! inside a sparse file of terabytes costs a few chunks). The rare counts that do not fit in 16
//! bits live in a side map. Counts saturate at the image's refcount maximum, as QEMU's in-memory
//! array does.

use std::collections::{BTreeMap, HashMap};

const SPILL: u16 = u16::MAX;

/// Clusters per chunk (8 KiB of counts).
pub(crate) const CHUNK: u64 = 4096;

/// Computed refcounts, indexed by host cluster.
#[derive(Debug, Default, Clone)]
pub(crate) struct RefArray {
    /// Clusters covered (counts past it read as 0).
    len: u64,
    chunks: BTreeMap<u64, Box<[u16]>>,
    big: HashMap<u64, u64>,
}

impl RefArray {
    /// An array of `len` zero counts (nothing allocated yet).
    pub fn new(len: u64) -> RefArray {
        RefArray {
            len,
            chunks: BTreeMap::new(),
            big: HashMap::new(),
        }
    }

    /// Number of clusters covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Grow (never shrink) to cover `len` clusters.
    pub fn ensure(&mut self, len: u64) {
        self.len = self.len.max(len);
    }

    /// The count of cluster `i` (0 past the end).
    pub fn get(&self, i: u64) -> u64 {
        if i >= self.len {
            return 0;
        }
        match self
            .chunks
            .get(&(i / CHUNK))
            .map(|c| c[(i % CHUNK) as usize])
        {
            None => 0,
            Some(SPILL) => self.big.get(&i).copied().unwrap_or(SPILL as u64),
            Some(v) => v as u64,
        }
    }

    /// Set the count of cluster `i`, growing the array when needed.
    pub fn set(&mut self, i: u64, v: u64) {
        self.ensure(i.saturating_add(1));
        if v == 0 && !self.chunks.contains_key(&(i / CHUNK)) {
            return;
        }
        let c = self
            .chunks
            .entry(i / CHUNK)
            .or_insert_with(|| vec![0u16; CHUNK as usize].into_boxed_slice());
        if v >= SPILL as u64 {
            c[(i % CHUNK) as usize] = SPILL;
            self.big.insert(i, v);
        } else {
            c[(i % CHUNK) as usize] = v as u16;
            self.big.remove(&i);
        }
    }

    /// The ranges `[first, end)` of clusters that may have a nonzero count, in order (whole
    /// chunks, cut at `len`). Every cluster outside them counts 0.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let len = self.len;
        self.chunks
            .keys()
            .map(move |&ci| {
                (
                    ci * CHUNK,
                    (ci.saturating_add(1).saturating_mul(CHUNK)).min(len),
                )
            })
            .filter(|(a, b)| a < b)
    }

    /// Chunks allocated now.
    #[cfg(test)]
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

/// Merge sorted-or-not ranges `[a, b)` into sorted, disjoint ones.
pub(crate) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|(a, b)| a < b);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_big_counts() {
        let mut a = RefArray::new(4);
        assert_eq!(a.len(), 4);
        a.set(1, 3);
        a.set(2, 70_000);
        a.set(3, u64::MAX);
        assert_eq!(a.get(0), 0);
        assert_eq!(a.get(1), 3);
        assert_eq!(a.get(2), 70_000);
        assert_eq!(a.get(3), u64::MAX);
        a.set(2, 5);
        assert_eq!(a.get(2), 5);
        assert_eq!(a.get(100), 0);
        a.set(9, 1);
        assert_eq!(a.len(), 10);
        assert_eq!(a.get(9), 1);
    }

    #[test]
    fn sparse_over_a_huge_file() {
        // 2^40 clusters (64 PiB at 64 KiB clusters): only what is counted takes RAM.
        let n = 1u64 << 40;
        let mut a = RefArray::new(n);
        assert_eq!(a.chunks(), 0);
        a.set(0, 1);
        a.set(5, 2);
        a.set(n - 1, 1);
        a.set(1 << 30, 0);
        assert_eq!(a.chunks(), 2, "a zero count allocates nothing");
        assert_eq!(a.get(n - 1), 1);
        assert_eq!(a.get(n - 2), 0);
        assert_eq!(a.get(1 << 30), 0);
        let r: Vec<_> = a.ranges().collect();
        assert_eq!(r, vec![(0, CHUNK), (n - CHUNK, n)]);
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 40), (35, 36)]),
            vec![(0, 8), (10, 30), (35, 36)]
        );
    }
}
