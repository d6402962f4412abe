//! Reads without the metadata lock: the cached things (L2 tables, refcount blocks, dedup index
//! clusters) a request reads from the file with the lock dropped, then inserts under it.
//!
//! Each read is registered with a ticket. A load of the same thing under the lock (which is at
//! least as new) ends the registration; the copy read outside is then dropped when it arrives,
//! even if somebody registered the same thing again meanwhile (that second read started later
//! and is the one to keep): only the copy whose ticket is current is inserted.

use super::clustermap::ClusterMap;

#[derive(Default)]
pub(crate) struct Loading {
    current: ClusterMap<u64>,
    next: u64,
}

impl Loading {
    /// A read of `k` is registered and not ended.
    pub(crate) fn contains(&self, k: u64) -> bool {
        self.current.contains_key(&k)
    }

    /// Register a read of `k`; returns its ticket.
    pub(crate) fn start(&mut self, k: u64) -> u64 {
        self.next += 1;
        self.current.insert(k, self.next);
        self.next
    }

    /// `k` was loaded under the lock (or changed): a read registered before is stale.
    pub(crate) fn cancel(&mut self, k: u64) {
        self.current.remove(&k);
    }

    /// The read with `ticket` arrived: true when it is still the current one for `k` (its
    /// copy may be inserted). Ends the registration either way if it is.
    pub(crate) fn finish(&mut self, k: u64, ticket: u64) -> bool {
        if self.current.get(&k) == Some(&ticket) {
            self.current.remove(&k);
            true
        } else {
            false
        }
    }

    /// Every read registered so far is stale (what they read moved).
    pub(crate) fn clear(&mut self) {
        self.current.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Loading;

    #[test]
    fn a_read_ended_by_a_load_under_the_lock_stays_stale_after_a_new_registration() {
        let mut l = Loading::default();
        let a = l.start(7);
        l.cancel(7); // loaded under the lock, then evicted...
        let c = l.start(7); // ...and registered again by another request
        assert!(!l.finish(7, a), "the older read is dropped");
        assert!(l.contains(7));
        assert!(l.finish(7, c), "the newer one is kept");
        assert!(!l.contains(7));
        assert!(!l.finish(7, c), "once");
    }
}
