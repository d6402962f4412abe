//! Free clusters known to read as zeros on disk, durably: their holes were punched and a sync
//! followed. A write into one needs no sync of its data before the table entry that points at
//! it, as for a cluster past the old end of the file: if the data write is lost in a host
//! crash, the cluster reads as the zeros the guest saw before, never as another cluster's old
//! data. Kept as disjoint ranges of cluster indexes, so a discard of a large range costs one
//! entry, not one per cluster.

use std::collections::BTreeMap;

#[derive(Default)]
pub(crate) struct Holes {
    /// First cluster -> one past the last, disjoint.
    runs: BTreeMap<u64, u64>,
}

impl Holes {
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Clusters `first..first + n` are holes (punched, then synced).
    pub(crate) fn insert(&mut self, first: u64, n: u64) {
        if n == 0 {
            return;
        }
        let (mut lo, mut hi) = (first, first.saturating_add(n));
        // Merge with every run that touches or overlaps lo..hi.
        if let Some((&s, &e)) = self.runs.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        let inside: Vec<(u64, u64)> = self.runs.range(lo..=hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.runs.remove(&s);
            hi = hi.max(e);
        }
        self.runs.insert(lo, hi);
    }

    /// True when all of `first..first + n` are holes.
    pub(crate) fn covers(&self, first: u64, n: u64) -> bool {
        self.runs
            .range(..=first)
            .next_back()
            .is_some_and(|(_, &e)| first.saturating_add(n) <= e)
    }

    /// Cluster `c` is in use again (its refcount left 0): no longer a hole.
    pub(crate) fn remove(&mut self, c: u64) {
        let Some((&s, &e)) = self.runs.range(..=c).next_back() else {
            return;
        };
        if c >= e {
            return;
        }
        self.runs.remove(&s);
        if s < c {
            self.runs.insert(s, c);
        }
        if c + 1 < e {
            self.runs.insert(c + 1, e);
        }
    }

    /// Clusters `first..first + n` are written without a refcount (the dedup index area):
    /// none of them is a hole any more.
    pub(crate) fn remove_range(&mut self, first: u64, n: u64) {
        if n == 0 {
            return;
        }
        let end = first.saturating_add(n);
        let overlapping: Vec<(u64, u64)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > first)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.runs.remove(&s);
            if s < first {
                self.runs.insert(s, first);
            }
            if end < e {
                self.runs.insert(end, e);
            }
        }
    }

    /// Ranges held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Holes;

    #[test]
    fn runs_merge_split_and_cover_exactly() {
        let mut h = Holes::default();
        assert!(!h.covers(0, 1));
        h.insert(10, 5); // 10..15
        h.insert(15, 5); // touches: 10..20
        h.insert(30, 2); // 30..32
        assert_eq!(h.len(), 2);
        assert!(h.covers(10, 10));
        assert!(!h.covers(9, 2));
        assert!(!h.covers(19, 2));
        assert!(!h.covers(20, 1));
        h.insert(12, 20); // overlaps both: 10..32
        assert_eq!(h.len(), 1);
        assert!(h.covers(10, 22));
        h.remove(15);
        assert!(h.covers(10, 5));
        assert!(!h.covers(14, 2));
        assert!(h.covers(16, 16));
        h.remove(10);
        h.remove(31);
        h.remove(40); // not a hole: nothing happens
        assert!(!h.covers(10, 1));
        assert!(h.covers(11, 4));
        assert!(h.covers(16, 15));
        assert!(!h.covers(31, 1));
        assert_eq!(h.len(), 2);
        h.insert(0, 0);
        assert_eq!(h.len(), 2);
        // 11..15, 16..31 left; a range across both, and one inside a run.
        h.remove_range(13, 5);
        assert!(h.covers(11, 2) && !h.covers(13, 1) && !h.covers(17, 1));
        assert!(h.covers(18, 13));
        h.remove_range(20, 2);
        assert!(h.covers(18, 2) && !h.covers(20, 1) && !h.covers(21, 1) && h.covers(22, 9));
        h.remove_range(0, 100);
        assert!(h.is_empty());
    }
}
