//! The computed ("expected") refcount of every host cluster, as the checker counts references.
//!
//! Two bytes per cluster up to the file end; the rare counts that do not fit in 16 bits live in a
//! side map. Counts saturate at the image's refcount maximum, as QEMU's in-memory array does.

use std::collections::HashMap;

const SPILL: u16 = u16::MAX;

/// Computed refcounts, indexed by host cluster.
#[derive(Debug, Default, Clone)]
pub(crate) struct RefArray {
    small: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl RefArray {
    /// An array of `len` zero counts.
    pub fn new(len: u64) -> RefArray {
        RefArray {
            small: vec![0; len as usize],
            big: HashMap::new(),
        }
    }

    /// Number of clusters covered.
    pub fn len(&self) -> u64 {
        self.small.len() as u64
    }

    /// Grow (never shrink) to cover `len` clusters.
    pub fn ensure(&mut self, len: u64) {
        if len > self.len() {
            self.small.resize(len as usize, 0);
        }
    }

    /// The count of cluster `i` (0 past the end).
    pub fn get(&self, i: u64) -> u64 {
        match self.small.get(i as usize) {
            None => 0,
            Some(&SPILL) => self.big.get(&i).copied().unwrap_or(SPILL as u64),
            Some(&v) => v as u64,
        }
    }

    /// Set the count of cluster `i`, growing the array when needed.
    pub fn set(&mut self, i: u64, v: u64) {
        self.ensure(i + 1);
        if v >= SPILL as u64 {
            self.small[i as usize] = SPILL;
            self.big.insert(i, v);
        } else {
            self.small[i as usize] = v as u16;
            self.big.remove(&i);
        }
    }
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
}
