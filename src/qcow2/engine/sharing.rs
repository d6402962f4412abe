//! Which active guest clusters share a host cluster (refcount > 1), so that when the refcount
//! falls back to 1 the one entry still pointing at it gets COPIED again (`qemu-img check` and
//! QEMU's write path both rely on COPIED being set exactly when the refcount is 1). Only
//! clusters some link made shared are tracked; a cluster shared only with an internal snapshot
//! has no active sharer to fix.

use super::clustermap::{ClusterMap, ClusterSet};

#[derive(Default)]
pub(crate) struct Sharing {
    by_host: ClusterMap<ClusterSet>,
}

impl Sharing {
    /// Guest cluster `gc` points at shared host cluster `hc`.
    pub(crate) fn add(&mut self, hc: u64, gc: u64) {
        self.by_host.entry(hc).or_default().insert(gc);
    }

    /// Guest cluster `gc` no longer points at host cluster `hc`.
    pub(crate) fn remove(&mut self, hc: u64, gc: u64) {
        if let Some(list) = self.by_host.get_mut(&hc) {
            list.remove(&gc);
        }
    }

    /// No host cluster is noted as shared (an image without dedup links).
    pub(crate) fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }

    /// The guest clusters noted as pointing at shared host cluster `hc`.
    pub(crate) fn sharers(&self, hc: u64) -> impl Iterator<Item = u64> + '_ {
        self.by_host.get(&hc).into_iter().flatten().copied()
    }

    /// Host cluster `hc` is no longer shared (its refcount fell to 1 or 0): the guest clusters
    /// that were noted as pointing at it (some may have moved on since).
    pub(crate) fn take(&mut self, hc: u64) -> Option<ClusterSet> {
        self.by_host.remove(&hc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_take() {
        let mut s = Sharing::default();
        s.add(7, 1);
        s.add(7, 2);
        s.add(9, 3);
        s.remove(7, 1);
        s.remove(8, 1);
        let left: Vec<u64> = s
            .take(7)
            .map(|l| l.into_iter().collect())
            .unwrap_or_default();
        assert_eq!(left, vec![2]);
        assert!(s.take(7).is_none());
        assert!(s.take(9).is_some_and(|l| l.contains(&3)));
    }
}
