//! The set of guest clusters waiting for the background dedup worker, sized by what is pending.

use std::collections::BTreeMap;

/// Bits per chunk of the pending set (4096 bits: 512 bytes).
const CHUNK_BITS: u64 = 4096;
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// Guest clusters pending background dedup: one bit each, in chunks of 4096 clusters allocated
/// when a cluster in them becomes pending and dropped when none is left, so the RAM follows
/// what is pending, not the virtual size (a 512 PiB disk has 2^38 clusters of 2 MiB).
#[derive(Default)]
pub(crate) struct Pending {
    chunks: BTreeMap<u64, Box<[u64; CHUNK_WORDS]>>,
    /// Clusters below this are the guest's; others are ignored.
    limit: u64,
    count: u64,
    /// Where the worker looks next (it sweeps upward and wraps).
    cursor: u64,
}

impl Pending {
    pub(crate) fn new(guest_clusters: u64) -> Pending {
        Pending {
            chunks: BTreeMap::new(),
            limit: guest_clusters,
            count: 0,
            cursor: 0,
        }
    }

    /// The disk grew to `guest_clusters` clusters.
    pub(crate) fn grow(&mut self, guest_clusters: u64) {
        self.limit = self.limit.max(guest_clusters);
    }

    pub(crate) fn insert(&mut self, gc: u64) {
        if gc >= self.limit {
            return;
        }
        let w = &mut self
            .chunks
            .entry(gc / CHUNK_BITS)
            .or_insert_with(|| Box::new([0; CHUNK_WORDS]))[((gc % CHUNK_BITS) / 64) as usize];
        let b = 1u64 << (gc % 64);
        if *w & b == 0 {
            *w |= b;
            self.count += 1;
        }
    }

    pub(crate) fn remove(&mut self, gc: u64) {
        let ci = gc / CHUNK_BITS;
        let Some(chunk) = self.chunks.get_mut(&ci) else {
            return;
        };
        let w = &mut chunk[((gc % CHUNK_BITS) / 64) as usize];
        let b = 1u64 << (gc % 64);
        if *w & b != 0 {
            *w &= !b;
            self.count -= 1;
            if chunk.iter().all(|&w| w == 0) {
                self.chunks.remove(&ci);
            }
        }
    }

    pub(crate) fn contains(&self, gc: u64) -> bool {
        self.chunks
            .get(&(gc / CHUNK_BITS))
            .is_some_and(|c| c[((gc % CHUNK_BITS) / 64) as usize] & (1u64 << (gc % 64)) != 0)
    }

    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    /// Chunks allocated now (for tests of the RAM bound).
    #[cfg(test)]
    fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// The first pending cluster at or after `from`, if any.
    fn first_from(&self, from: u64) -> Option<u64> {
        for (&ci, chunk) in self.chunks.range(from / CHUNK_BITS..) {
            let base = ci * CHUNK_BITS;
            let lo = from.saturating_sub(base);
            for (wi, &w) in chunk.iter().enumerate().skip((lo / 64) as usize) {
                let mut w = w;
                if wi as u64 == lo / 64 {
                    w &= !0u64 << (lo % 64);
                }
                if w != 0 {
                    return Some(base + wi as u64 * 64 + w.trailing_zeros() as u64);
                }
            }
        }
        None
    }

    /// Takes the next pending cluster at or after the cursor (wrapping).
    pub(crate) fn take(&mut self) -> Option<u64> {
        let gc = self
            .first_from(self.cursor)
            .or_else(|| self.first_from(0))?;
        self.remove(gc);
        self.cursor = gc + 1;
        Some(gc)
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn pending_takes_each_once_and_wraps() {
        let mut p = Pending::new(200);
        for gc in [5, 70, 199, 3] {
            p.insert(gc);
        }
        p.insert(70);
        assert_eq!(p.len(), 4);
        assert_eq!(p.take(), Some(3));
        p.insert(1);
        assert_eq!(p.take(), Some(5));
        assert_eq!(p.take(), Some(70));
        assert_eq!(p.take(), Some(199));
        assert_eq!(p.take(), Some(1), "wrapped");
        assert_eq!(p.take(), None);
        p.insert(500);
        assert_eq!(p.len(), 0, "out of range ignored");
    }

    #[test]
    fn pending_ram_follows_what_is_pending() {
        // 512 PiB at 2 MiB clusters: 2^38 guest clusters, no bitmap over all of them.
        let n = 1u64 << 38;
        let mut p = Pending::new(n);
        assert_eq!(p.chunks(), 0);
        for gc in [n - 1, 0, 1 << 30, 4095, 4096, n - 4097] {
            p.insert(gc);
        }
        assert_eq!(p.len(), 6);
        assert_eq!(p.chunks(), 5);
        p.cursor = 1 << 29;
        assert_eq!(p.take(), Some(1 << 30));
        assert_eq!(p.take(), Some(n - 4097));
        assert_eq!(p.take(), Some(n - 1));
        assert_eq!(p.take(), Some(0), "wrapped");
        assert_eq!(p.take(), Some(4095));
        assert_eq!(p.take(), Some(4096));
        assert_eq!(p.take(), None);
        assert_eq!(p.chunks(), 0, "empty chunks are dropped");
        p.insert(n);
        assert_eq!(p.len(), 0, "out of range ignored");
    }
}
