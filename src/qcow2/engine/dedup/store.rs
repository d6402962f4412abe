//! The dedup state kept beside the metadata under the engine's lock (`engine::state::State`):
//! the hint index, the persistent records, the pending set, the counters; and what the index's
//! open found. Plain data: the code that changes it is in the sibling files.

use super::pending::Pending;
use super::rebuild_state::Rebuild;
use super::records;
use crate::qcow2::engine::clustermap::ClusterSet;
use crate::qcow2::format::dedup::DedupExtension;
use crate::qcow2::hashindex::DedupIndex;

/// Default RAM for cached index clusters (`OpenOptions::dedup_cache_bytes`): the whole index
/// area of an 8 GiB disk with 4 KiB clusters, or of a 128 GiB one with 64 KiB clusters. Random
/// writes over an area larger than the cache load and write back an index cluster for most
/// writes, under the metadata lock (`./run bench`, 8 GiB with 4 KiB clusters: inline dedup of
/// unique data ran at 39% of the dedup-off IOPS with a 32 MiB cache, at 64% with this one).
pub const DEFAULT_RECORD_CACHE_BYTES: u64 = 64 << 20;
/// What the open found (logged, and kept for `query-dedup`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct IndexOpenReport {
    /// "loaded", "rebuilt" or "empty" (offline dedup builds it as it goes).
    pub how: String,
    /// Why the index was rebuilt, when it was.
    pub reason: Option<String>,
    /// Hints put into the RAM index.
    pub hints: u64,
    /// Data clusters read and hashed.
    pub clusters_hashed: u64,
    /// Index clusters that failed to load (their ranges were hashed again).
    pub bad_index_clusters: u64,
    /// Duplicates found by a rebuild, left to the background worker.
    pub pending: u64,
    /// Time the whole step took, in milliseconds.
    pub millis: u64,
    /// The data is hashed in the background after the open (`hints`, `clusters_hashed` and
    /// `pending` grow by what that finds when it is done).
    pub background: bool,
    /// How long the background rebuild took, in milliseconds, once it is done.
    pub background_millis: Option<u64>,
}

/// Counters of the dedup layer.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DedupStats {
    /// Clusters written as a reference to an existing cluster.
    pub clusters_deduplicated: u64,
    /// Clusters written as new, unique data.
    pub clusters_unique: u64,
    /// All-zero clusters turned into zero clusters.
    pub zero_clusters: u64,
    /// Rewrites of a cluster with the content it already had (no I/O).
    pub identical_rewrites: u64,
    /// Space saved: clusters linked plus zero clusters detected, in bytes.
    pub bytes_saved: u64,
    /// Partial-cluster writes that read the rest of their cluster first.
    pub partial_cluster_reads: u64,
    /// Hashes in the index.
    pub index_entries: u64,
    /// RAM used by the index.
    pub index_ram_bytes: u64,
    /// Links not made because the cluster was shared to the cap.
    pub refcount_cap_hits: u64,
    /// Index hints found stale (content differed, or the cluster moved on).
    pub stale_hints_rejected: u64,
    /// Links made on a verified record, without reading the candidate back.
    pub links_without_read: u64,
    /// RAM of the cached index clusters (the persistent records), bounded.
    pub record_cache_bytes: u64,
    /// Clusters waiting for the background worker.
    pub pending_clusters: u64,
    /// Clusters the background worker has processed.
    pub background_processed: u64,
    /// The index is being rebuilt from the data in the background (`rebuild.rs`).
    pub rebuild_running: bool,
    /// Guest clusters the rebuild has passed, of `rebuild_clusters_total`.
    pub rebuild_clusters_done: u64,
    pub rebuild_clusters_total: u64,
    /// Data clusters the rebuild has read and hashed.
    pub rebuild_clusters_hashed: u64,
}

/// The hint index: hash -> guest clusters that held that content, in the compact index of
/// `qcow2::hashindex` (under 8 bytes per entry). It stores guest cluster + 1 (0 marks a free slot).
#[derive(Default)]
pub(crate) struct HintIndex {
    pub(super) inner: DedupIndex,
}

impl HintIndex {
    pub(super) fn lookup(&self, h: &[u8; 32]) -> Vec<u64> {
        self.inner.lookup(h).into_iter().map(|c| c - 1).collect()
    }
    pub(super) fn insert(&mut self, h: &[u8; 32], gc: u64) {
        if !self.inner.contains(h, gc + 1) {
            // A guest cluster past the index's reach is simply not indexed (written unshared).
            let _ = self.inner.insert(h, gc + 1);
        }
    }
    /// Insert unless the content already has `MAX_HINTS` hints (counted by fingerprint).
    pub(super) fn insert_limited(&mut self, h: &[u8; 32], gc: u64) {
        let mut n = 0;
        self.inner.for_each_candidate(h, |_| {
            n += 1;
            n < MAX_HINTS
        });
        if n < MAX_HINTS {
            self.insert(h, gc);
        }
    }
    pub(super) fn remove(&mut self, h: &[u8; 32], gc: u64) {
        self.inner.remove(h, gc + 1);
    }
    pub(super) fn len(&self) -> u64 {
        self.inner.len()
    }
    pub(super) fn ram_bytes(&self) -> u64 {
        self.inner.ram_bytes()
    }
}

/// Hints kept per content (see the link step).
pub(super) const MAX_HINTS: usize = 4;

/// Dedup state, kept under the metadata lock.
pub(crate) struct Dedup {
    pub(super) index: HintIndex,
    pub(super) stats: DedupStats,
    /// Largest refcount a dedup link may produce.
    pub(super) cap: u64,
    /// The image's recorded setting and counters (our header extension), as found at open.
    pub(crate) recorded: Option<DedupExtension>,
    /// The persistent records (None for a disk smaller than one cluster).
    pub(super) records: Option<records::Records>,
    /// How the index came to be at open.
    pub(super) open_report: IndexOpenReport,
    /// Guest clusters waiting for the background worker.
    pub(super) pending: Pending,
    /// The worker holds a cluster now.
    pub(crate) worker_busy: bool,
    /// Held guest clusters whose writer has recorded their new content and waits for nothing
    /// more before it releases them. A dedup writer waits only for these: a writer still
    /// choosing a candidate holds its cluster too, and two of those waiting for each other's
    /// cluster would wait for ever.
    pub(super) published: ClusterSet,
    /// The rebuild of the index from the data, while it is not done.
    pub(super) rebuild: Option<Rebuild>,
}

impl Dedup {
    pub(crate) fn new(max_refcount: u64) -> Dedup {
        Dedup {
            index: HintIndex::default(),
            recorded: None,
            records: None,
            open_report: IndexOpenReport::default(),
            pending: Pending::default(),
            worker_busy: false,
            published: ClusterSet::default(),
            rebuild: None,
            stats: DedupStats::default(),
            cap: (max_refcount / 2).max(1),
        }
    }
    pub(crate) fn snapshot_stats(&self) -> DedupStats {
        let mut s = self.stats;
        s.index_entries = self.index.len();
        s.index_ram_bytes = self.index.ram_bytes();
        s.record_cache_bytes = self.records.as_ref().map_or(0, records::Records::ram_bytes);
        s.pending_clusters = self.pending.len();
        if let Some(r) = &self.rebuild {
            s.rebuild_running = r.runnable();
            s.rebuild_clusters_done = r.done;
            s.rebuild_clusters_total = r.total;
            s.rebuild_clusters_hashed = r.hashed;
        }
        s
    }
}
