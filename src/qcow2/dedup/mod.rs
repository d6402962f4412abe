//! Deduplication index: hashing, the in-RAM index (under 8 bytes per unique cluster) and the
//! persistent index in the image (codecs only). The engine does the I/O and must verify every hint
//! (byte compare of the candidate cluster) before linking a write to it. See docs/dedup.md.

pub mod index;
pub mod persist;

#[cfg(test)]
mod tests;

pub use index::{DedupIndex, IndexError, MAX_CLUSTER};
pub use persist::{
    DedupCounters, DedupExtension, DedupMode, IndexCluster, PersistError, SealInput, Trust,
    AUTOCLEAR_DEDUP, EXT_DEDUP,
};

use sha2::{Digest, Sha256};

/// Errors of the dedup module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DedupError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cluster data of {got} bytes, expected {want}")]
    BadClusterLen { got: usize, want: usize },
    #[error("host cluster {0} listed twice or out of order")]
    OutOfOrder(u64),
}

/// SHA-256 of a cluster's bytes.
pub fn hash_cluster(data: &[u8]) -> [u8; 32] {
    let d = Sha256::digest(data);
    let mut h = [0u8; 32];
    h.copy_from_slice(&d);
    h
}

/// SHA-256 of a cluster given as several pieces (for example guest iovecs).
pub fn hash_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut s = Sha256::new();
    for p in pieces {
        s.update(p);
    }
    let d = s.finalize();
    let mut h = [0u8; 32];
    h.copy_from_slice(&d);
    h
}

/// Whether a cluster is all zeros (it becomes a zero cluster and is never indexed).
pub fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// The persistent index as cluster-sized buffers, in index cluster order.
pub struct EncodedIndex {
    pub clusters: Vec<Vec<u8>>,
}

/// What a load found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Entries put into the RAM index.
    pub entries: u64,
    /// Index clusters that failed to decode (checksum, magic, generation): their host clusters have
    /// no hints; the engine may rehash just those ranges.
    pub bad_clusters: Vec<u64>,
    /// Records whose host cluster could not be indexed (above the cap).
    pub not_indexable: u64,
}

/// Builds the RAM index from the persistent index clusters (index cluster `k` is `clusters[k]`).
/// Bad clusters are skipped and reported, never fatal: the index is a hint. `capacity_hint` (an
/// upper bound on the entries, such as the number of host clusters) presizes the RAM index; it is
/// shrunk to its working load at the end.
pub fn load<'a>(
    clusters: impl IntoIterator<Item = &'a [u8]>,
    cluster_bits: u32,
    generation: u64,
    capacity_hint: u64,
) -> (DedupIndex, LoadReport) {
    let mut idx = DedupIndex::with_capacity(capacity_hint);
    let mut rep = LoadReport::default();
    for (k, b) in clusters.into_iter().enumerate() {
        let k = k as u64;
        match IndexCluster::decode(b, cluster_bits, generation, k) {
            Ok(ic) => {
                for (i, r) in ic.records.iter().enumerate() {
                    if *r == [0u8; 32] {
                        continue;
                    }
                    match idx.insert(r, ic.first + i as u64) {
                        Ok(_) => rep.entries += 1,
                        Err(_) => rep.not_indexable += 1,
                    }
                }
            }
            Err(e) => {
                log::warn!("dedup index cluster {k} ignored: {e}");
                rep.bad_clusters.push(k);
            }
        }
    }
    idx.shrink_to_fit();
    (idx, rep)
}

/// Encodes records given as (host cluster, hash), in any order, into `index_clusters` clusters.
/// Host clusters beyond what those clusters cover are dropped (counted in the return value).
pub fn encode_records(
    records: impl IntoIterator<Item = (u64, [u8; 32])>,
    cluster_bits: u32,
    generation: u64,
    index_clusters: u64,
) -> (EncodedIndex, u64) {
    let mut ics: Vec<IndexCluster> = (0..index_clusters)
        .map(|k| IndexCluster::empty(cluster_bits, generation, k))
        .collect();
    let mut dropped = 0;
    for (c, h) in records {
        let (k, i) = persist::locate(cluster_bits, c);
        match usize::try_from(k).ok().and_then(|k| ics.get_mut(k)) {
            Some(ic) => {
                ic.set(i, Some(&h));
            }
            None => dropped += 1,
        }
    }
    let clusters = ics.iter().map(|ic| ic.encode(cluster_bits)).collect();
    (EncodedIndex { clusters }, dropped)
}

/// Streaming rebuild: feed (host cluster, bytes) in increasing host cluster order; each call
/// returns the index clusters that are complete, as (index cluster number, encoded bytes), so the
/// engine can write them as it goes. RAM: the growing [`DedupIndex`] plus one index cluster.
pub struct IndexBuilder {
    idx: DedupIndex,
    cluster_bits: u32,
    generation: u64,
    /// Index clusters to produce in all (covering `host_clusters`).
    total: u64,
    host_clusters: u64,
    cur: IndexCluster,
    cur_no: u64,
    last: Option<u64>,
}

impl IndexBuilder {
    /// `host_clusters`: how many host clusters the index covers (clusters beyond are not indexed).
    /// `capacity_hint`: an upper bound on unique clusters, to presize the RAM index.
    pub fn new(cluster_bits: u32, generation: u64, host_clusters: u64, capacity_hint: u64) -> Self {
        IndexBuilder {
            idx: DedupIndex::with_capacity(capacity_hint),
            cluster_bits,
            generation,
            total: persist::index_clusters_for(cluster_bits, host_clusters),
            host_clusters,
            cur: IndexCluster::empty(cluster_bits, generation, 0),
            cur_no: 0,
            last: None,
        }
    }

    /// Completes the current index cluster and any empty ones up to (not including) `upto`.
    fn advance(&mut self, upto: u64, out: &mut Vec<(u64, Vec<u8>)>) {
        while self.cur_no < upto.min(self.total) {
            out.push((self.cur_no, self.cur.encode(self.cluster_bits)));
            self.cur_no += 1;
            self.cur = IndexCluster::empty(self.cluster_bits, self.generation, self.cur_no);
        }
    }

    /// Adds one data cluster (all-zero clusters are skipped).
    pub fn push(
        &mut self,
        host_cluster: u64,
        data: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, DedupError> {
        let want = 1usize << self.cluster_bits.clamp(9, 21);
        if data.len() != want {
            return Err(DedupError::BadClusterLen {
                got: data.len(),
                want,
            });
        }
        if self.last.is_some_and(|l| host_cluster <= l) {
            return Err(DedupError::OutOfOrder(host_cluster));
        }
        self.last = Some(host_cluster);
        let mut out = Vec::new();
        if host_cluster >= self.host_clusters || is_zero(data) {
            return Ok(out);
        }
        let (k, i) = persist::locate(self.cluster_bits, host_cluster);
        self.advance(k, &mut out);
        let h = hash_cluster(data);
        if self.idx.insert(&h, host_cluster).is_ok() {
            self.cur.set(i, Some(&h));
        }
        Ok(out)
    }

    /// Ends the rebuild: the RAM index (shrunk to its working load) and the remaining index
    /// clusters.
    pub fn finish(mut self) -> (DedupIndex, Vec<(u64, Vec<u8>)>) {
        let mut out = Vec::new();
        self.advance(self.total, &mut out);
        self.idx.shrink_to_fit();
        (self.idx, out)
    }
}

/// Rebuilds the index from data: `data` yields (host cluster, its bytes) for every data cluster
/// the engine wants indexed (refcount >= 1, below the share cap), in increasing host cluster
/// order. All-zero clusters are skipped. Returns the RAM index and the persistent index covering
/// `host_clusters` host clusters. Keeps every encoded index cluster in memory: for big images use
/// [`IndexBuilder`] and write the clusters as they come.
pub fn rebuild<'a>(
    data: impl IntoIterator<Item = (u64, &'a [u8])>,
    cluster_bits: u32,
    generation: u64,
    host_clusters: u64,
) -> Result<(DedupIndex, EncodedIndex), DedupError> {
    let mut b = IndexBuilder::new(cluster_bits, generation, host_clusters, 0);
    let mut clusters = Vec::new();
    for (c, bytes) in data {
        clusters.extend(b.push(c, bytes)?.into_iter().map(|(_, v)| v));
    }
    let (idx, rest) = b.finish();
    clusters.extend(rest.into_iter().map(|(_, v)| v));
    Ok((idx, EncodedIndex { clusters }))
}
