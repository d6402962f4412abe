//! Inline deduplication in the write path.
//!
//! Each whole cluster a guest writes is hashed (SHA-256). The index maps hashes to guest
//! clusters that held that content when it was indexed; it is only a hint. A hint is used only
//! after the candidate cluster has been read back and compared byte for byte with the new data,
//! while nothing can change it:
//!
//! 1. under the lock: the candidate host cluster is pinned (its frees wait), COPIED is cleared on
//!    the candidate's entry (so no new write goes to it in place), and if it had COPIED we wait
//!    until every data I/O planned before that moment has finished;
//! 2. outside the lock: the candidate is read and compared;
//! 3. under the lock: refcount + 1, the new entry without COPIED, the old entry released.
//!
//! So a false dedup is impossible whatever the index says.
//! All-zero clusters become zero clusters. Partial-cluster writes read the rest of the cluster
//! first. Sharing stops below half the refcount maximum (room for snapshots).
//!
//! A guest cluster rewritten with the content it already has is found the same way (its own
//! hint) and costs one read and no write. Skipping the read too would need the full hash of every
//! cluster's current content in RAM: a hint alone can be stale, since a rewritten cluster's old
//! hash stays in the index until a lookup finds it stale.

use super::meta::Meta;
use super::{iov, Qcow2};
use crate::qcow2::dedup::persist::{DedupExtension, DedupMode, EXT_DEDUP};
use crate::qcow2::dedup::{hash_cluster, is_zero, DedupIndex};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::Header;
use crate::qcow2::format::{L1Entry, L2Entry};
use crate::qcow2::offsets::HostOffset;
use crate::storage::Storage;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};

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
}

/// The hint index: hash -> guest clusters that held that content, in the compact index of
/// `qcow2::dedup` (under 8 bytes per entry). It stores guest cluster + 1 (0 marks a free slot).
#[derive(Default)]
pub(crate) struct HintIndex {
    inner: DedupIndex,
}

impl HintIndex {
    fn lookup(&self, h: &[u8; 32]) -> Vec<u64> {
        self.inner.lookup(h).into_iter().map(|c| c - 1).collect()
    }
    fn insert(&mut self, h: &[u8; 32], gc: u64) {
        if !self.inner.contains(h, gc + 1) {
            // A guest cluster past the index's reach is simply not indexed (written unshared).
            let _ = self.inner.insert(h, gc + 1);
        }
    }
    fn remove(&mut self, h: &[u8; 32], gc: u64) {
        self.inner.remove(h, gc + 1);
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn ram_bytes(&self) -> u64 {
        self.inner.ram_bytes()
    }
}

/// Hints kept per content (see the link step).
const MAX_HINTS: usize = 4;

/// Dedup state, kept under the metadata lock.
pub(crate) struct Dedup {
    index: HintIndex,
    pub stats: DedupStats,
    /// Largest refcount a dedup link may produce.
    cap: u64,
    /// The image's recorded setting and counters (our header extension), as found at open.
    pub recorded: Option<DedupExtension>,
}

impl Dedup {
    pub(crate) fn new(max_refcount: u64) -> Dedup {
        Dedup {
            index: HintIndex::default(),
            recorded: None,
            stats: DedupStats::default(),
            cap: (max_refcount / 2).max(1),
        }
    }
    pub(crate) fn snapshot_stats(&self) -> DedupStats {
        let mut s = self.stats;
        s.index_entries = self.index.len();
        s.index_ram_bytes = self.index.ram_bytes();
        s
    }
}

/// At open: find the clusters shared by more than one active entry (when such a refcount falls
/// back to 1 the survivor must get COPIED back), and index the content of every data cluster.
/// With `hash_data` this reads all allocated data once.
pub(crate) fn rebuild(s: &dyn Storage, m: &mut Meta, hash_data: bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    let cs = m.g.cluster_size();
    let per_table = 1u64 << m.g.l2_bits;
    let guest_clusters = m.g.size.div_ceil(cs);
    let mut hashes: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut buf = vec![0u8; cs as usize];
    let mut d = m.dedup.take().ok_or(Qcow2Error::DedupOff)?;
    for i in 0..m.l1.len() as u64 {
        if L1Entry::decode(m.l1[i as usize]).l2_offset.is_none() {
            continue;
        }
        for gc in i * per_table..((i + 1) * per_table).min(guest_clusters) {
            let L2Entry::Normal { host, copied } = m.entry(s, gc)? else {
                continue;
            };
            let hc = host.0 / cs;
            if !copied && m.rc.get(s, hc)? >= 2 {
                m.shared.entry(hc).or_default().push(gc);
            }
            if !hash_data {
                continue;
            }
            let h = match hashes.get(&hc) {
                Some(h) => *h,
                None => {
                    s.read_at(&mut buf, host.0)?;
                    let h = hash(&buf);
                    hashes.insert(hc, h);
                    h
                }
            };
            d.index.insert(&h, gc);
        }
    }
    log::info!(
        "dedup index rebuilt from {} data clusters in {:.2?}",
        hashes.len(),
        t0.elapsed()
    );
    m.dedup = Some(d);
    Ok(())
}

/// At a clean close: record dedup as the image's setting, with the counters of every session so
/// far, in our header extension (an extension QEMU keeps but does not read; no feature bit).
/// An extension of the same size is rewritten in place; a new one rewrites cluster 0 as QEMU does.
pub(crate) fn record(s: &dyn Storage, d: &Dedup, cluster_bits: u32) -> Result<()> {
    let cap = d.cap.min(u32::MAX as u64) as u32;
    let mut ext = d
        .recorded
        .clone()
        .unwrap_or_else(|| DedupExtension::new(DedupMode::Inline, cluster_bits, cap));
    ext.mode = DedupMode::Inline;
    let st = d.snapshot_stats();
    let c = &mut ext.counters;
    c.deduplicated += st.clusters_deduplicated;
    c.written_unique += st.clusters_unique;
    c.zero_detected += st.zero_clusters;
    c.bytes_saved += st.bytes_saved;
    c.partial_reads += st.partial_cluster_reads;
    c.cap_hits += st.refcount_cap_hits;
    c.stale_rejected += st.stale_hints_rejected;
    let data = ext.encode();
    let mut c0 = vec![0u8; 1usize << cluster_bits];
    s.read_at(&mut c0, 0)?;
    let header = crate::qcow2::format::Header::decode(&c0)?;
    match Header::extension_offset(&c0, EXT_DEDUP) {
        Some(off) if header.extension(EXT_DEDUP).map(<[u8]>::len) == Some(data.len()) => {
            s.write_at(&data, off as u64)?;
        }
        _ => {
            let mut h = header;
            h.set_extension(EXT_DEDUP, Some(data));
            s.write_at(&h.encode()?, 0)?;
        }
    }
    s.flush()?;
    Ok(())
}

/// Holds guest cluster `gc` for one writer; released (with a wake-up) on drop.
struct ClusterGuard<'a> {
    q: &'a Qcow2,
    gc: u64,
}

impl Drop for ClusterGuard<'_> {
    fn drop(&mut self) {
        self.q.lock().inflight.remove(&self.gc);
        self.q.cond.notify_all();
    }
}

fn hash(buf: &[u8]) -> [u8; 32] {
    hash_cluster(buf)
}

impl Qcow2 {
    /// True when inline dedup is on (and not paused).
    pub fn dedup_enabled(&self) -> bool {
        // No lock: every write asks.
        self.dedup_on && !self.dedup_paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when the image is served with dedup (paused or not).
    pub fn dedup_available(&self) -> bool {
        self.dedup_on
    }

    /// True when dedup was paused (writes then go the plain way; shared clusters stay right).
    pub fn dedup_paused(&self) -> bool {
        self.dedup_paused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Pause or resume inline dedup. An error when the image is not served with dedup.
    pub fn set_dedup_paused(&self, paused: bool) -> Result<()> {
        if !self.dedup_on {
            return Err(Qcow2Error::DedupOff);
        }
        self.dedup_paused
            .store(paused, std::sync::atomic::Ordering::Relaxed);
        log::info!("inline dedup {}", if paused { "paused" } else { "resumed" });
        Ok(())
    }

    /// Dedup counters, when dedup is on.
    pub fn dedup_stats(&self) -> Option<DedupStats> {
        self.lock().dedup.as_ref().map(Dedup::snapshot_stats)
    }

    fn hold_cluster(&self, gc: u64) -> ClusterGuard<'_> {
        let mut m = self.lock();
        while m.inflight.contains(&gc) {
            m = self.wait(m);
        }
        m.inflight.insert(gc);
        ClusterGuard { q: self, gc }
    }

    /// The write path with dedup on: cluster by cluster.
    pub(crate) fn write_dedup(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let cs = self.g.cluster_size();
        let len = iov::len(bufs);
        // One cluster buffer for the request: a full cluster overwrites all of it, a partial
        // one reads the whole cluster first.
        let mut buf = vec![0u8; cs as usize];
        for iov::Chunk {
            gc,
            in_off,
            n,
            buf_off,
        } in iov::chunks(offset, len, self.g.cluster_bits)
        {
            let pos = offset + buf_off as u64;
            let sub = iov::slice(bufs, buf_off, n as usize);
            if (gc + 1) * cs > self.g.size {
                // The last cluster of a disk whose size is not a cluster multiple.
                self.write_plain(pos, &sub)?;
            } else {
                let guard = self.hold_cluster(gc);
                if n < cs {
                    self.read(gc * cs, &mut [IoSliceMut::new(&mut buf)])?;
                    if let Some(d) = self.lock().dedup.as_mut() {
                        d.stats.partial_cluster_reads += 1;
                    }
                }
                let mut p = in_off as usize;
                for b in &sub {
                    buf[p..p + b.len()].copy_from_slice(b);
                    p += b.len();
                }
                self.dedup_cluster(gc, &buf)?;
                drop(guard);
            }
        }
        Ok(())
    }

    /// Write one whole cluster `buf` to guest cluster `gc` (held by the caller).
    fn dedup_cluster(&self, gc: u64, buf: &[u8]) -> Result<()> {
        if is_zero(buf) {
            return self.make_zero_cluster(gc);
        }
        self.link_or_write(gc, buf, &hash(buf))
    }

    /// Turn guest cluster `gc` (held by the caller) into a zero cluster.
    fn make_zero_cluster(&self, gc: u64) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        {
            let mut m = self.lock();
            let old = m.entry(s, gc)?;
            if !matches!(old, L2Entry::Zero { host: None, .. }) {
                m.set_entry(
                    s,
                    gc,
                    L2Entry::Zero {
                        host: None,
                        copied: false,
                    },
                )?;
                m.release(s, gc, old)?;
            }
            if let Some(d) = m.dedup.as_mut() {
                d.stats.zero_clusters += 1;
                d.stats.bytes_saved += cs;
            }
        }
        Ok(())
    }

    /// Write whole cluster `buf` with hash `h` to guest cluster `gc` (held by the caller): a link
    /// to an identical cluster if one is proven, else unique data.
    fn link_or_write(&self, gc: u64, buf: &[u8], h: &[u8; 32]) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let h = *h;
        let mut m = self.lock();
        'candidates: loop {
            let Some(d) = m.dedup.as_ref() else {
                return Err(Qcow2Error::DedupOff);
            };
            // The most shared copy first, our own cluster last: linking to it frees ours if it
            // held a separate copy, and separate copies of one content converge on one cluster.
            let mut cands: Vec<(bool, u64, u64)> = Vec::new();
            for c in d.index.lookup(&h) {
                let rc = match m.entry(s, c)? {
                    L2Entry::Normal { host, .. } => m.rc.get(s, host.0 / cs)?,
                    _ => 0,
                };
                cands.push((c == gc, u64::MAX - rc, c));
            }
            cands.sort_unstable();
            let n_cands = cands.len();
            let cands: Vec<u64> = cands.into_iter().map(|(_, _, c)| c).collect();
            for cand in cands {
                if cand != gc && m.inflight.contains(&cand) {
                    // Its writer is linking it right now: wait, then look again.
                    m = self.wait(m);
                    continue 'candidates;
                }
                let (host, copied) = match m.entry(s, cand)? {
                    L2Entry::Normal { host, copied } => (host.0, copied),
                    _ => {
                        self.drop_hint(&mut m, &h, cand);
                        continue;
                    }
                };
                let hc = host / cs;
                let cap = m.dedup.as_ref().map_or(0, |d| d.cap);
                if m.rc.get(s, hc)? >= cap {
                    if let Some(d) = m.dedup.as_mut() {
                        d.stats.refcount_cap_hits += 1;
                    }
                    continue;
                }
                // 1. Freeze the candidate: pinned, no COPIED, older I/O finished.
                m.pinned.insert(hc);
                // (Our own cluster keeps COPIED: we hold it.)
                let copied_flag = copied;
                let copied = copied && cand != gc;
                if copied {
                    m.set_copied(s, cand, hc, false)?;
                }
                if copied_flag {
                    // Writes planned while the entry still had COPIED may be writing into the
                    // cluster in place: let them finish. A cluster without COPIED has had none
                    // since the link that cleared it waited here.
                    let barrier = m.next_io();
                    m.barrier_waiters += 1;
                    while m.oldest_io() < barrier {
                        m = self.wait(m);
                    }
                    m.barrier_waiters -= 1;
                }
                let seq = m.begin_io();
                drop(m);
                // 2. Compare.
                let mut theirs = vec![0u8; cs as usize];
                let read = s.read_at(&mut theirs, host);
                m = self.lock();
                m.end_io(seq);
                m.pinned.remove(&hc);
                read?;
                let same = theirs == buf && m.rc.get(s, hc)? >= 1;
                if !same {
                    if copied && m.rc.get(s, hc)? == 1 {
                        m.set_copied(s, cand, hc, true)?;
                    }
                    self.drop_hint(&mut m, &h, cand);
                    continue 'candidates;
                }
                // 3. Link.
                let cur = m.entry(s, gc)?;
                let cand_alive = matches!(m.entry(s, cand)?,
                    L2Entry::Normal { host: h2, .. } if h2.0 == host);
                let identical = cur.host_cluster().map(|o| o.0) == Some(host);
                if !identical {
                    m.rc.add(s, hc, 1)?;
                    m.set_entry(
                        s,
                        gc,
                        L2Entry::Normal {
                            host: HostOffset(host),
                            copied: false,
                        },
                    )?;
                    m.release(s, gc, cur)?;
                    let list = m.shared.entry(hc).or_default();
                    if cand_alive && !list.contains(&cand) {
                        list.push(cand);
                    }
                    list.push(gc);
                }
                if let Some(d) = m.dedup.as_mut() {
                    // Both hold the content now: either can serve as the hint later. A few
                    // hints per content are enough to survive rewrites of the first ones; more
                    // would only make every lookup of a popular content longer.
                    if n_cands < MAX_HINTS {
                        d.index.insert(&h, gc);
                    }
                    // Space saved counts links only: an identical rewrite saves a write, not space.
                    if identical {
                        d.stats.identical_rewrites += 1;
                    } else {
                        d.stats.clusters_deduplicated += 1;
                        d.stats.bytes_saved += cs;
                    }
                }
                return Ok(());
            }
            break;
        }
        // Unique data: in place when the cluster is ours alone, else a new cluster.
        let cur = m.entry(s, gc)?;
        let (host, fresh_alloc) = match cur {
            L2Entry::Normal { host, copied: true } => (host.0, false),
            _ => (m.alloc_data(s, 1)?.0, true),
        };
        if let Err(e) = m.rc.guard(host, cs, 0) {
            if fresh_alloc {
                m.unalloc_data(s, host, 1)?;
            }
            return Err(e);
        }
        if let Some(d) = m.dedup.as_mut() {
            // Indexed before the data lands, so a concurrent writer of the same content waits
            // for this one and links to it instead of writing a second copy.
            d.index.insert(&h, gc);
        }
        let seq = m.begin_io();
        drop(m);
        let w = s.write_at(buf, host);
        let mut m = self.lock();
        m.end_io(seq);
        if let Err(e) = w {
            if fresh_alloc {
                m.unalloc_data(s, host, 1)?;
            }
            if let Some(d) = m.dedup.as_mut() {
                d.index.remove(&h, gc);
            }
            return Err(e.into());
        }
        if fresh_alloc {
            m.set_entry(
                s,
                gc,
                L2Entry::Normal {
                    host: HostOffset(host),
                    copied: true,
                },
            )?;
            m.release(s, gc, cur)?;
            m.data_before_l2 = true;
        }
        if let Some(d) = m.dedup.as_mut() {
            d.stats.clusters_unique += 1;
        }
        Ok(())
    }

    /// Deduplicate the data already in the image (offline): each allocated cluster is read and
    /// hashed once; the first copy of a content is indexed where it is, later copies go through
    /// the link path. Open with `dedup_index_at_open: false`: this pass builds the index.
    /// `progress(done, total, bytes_saved)`.
    pub fn dedup_existing(&self, progress: &mut dyn FnMut(u64, u64, u64)) -> Result<DedupStats> {
        let cs = self.g.cluster_size();
        let total = self.g.size / cs;
        let s = self.storage.as_ref();
        let mut buf = vec![0u8; cs as usize];
        for gc in 0..total {
            let guard = self.hold_cluster(gc);
            let entry = self.lock().entry(s, gc)?;
            if let L2Entry::Normal { .. } | L2Entry::Compressed { .. } = entry {
                self.read(gc * cs, &mut [IoSliceMut::new(&mut buf)])?;
                if is_zero(&buf) {
                    self.make_zero_cluster(gc)?;
                } else {
                    let h = hash(&buf);
                    let first = {
                        let mut m = self.lock();
                        let d = m.dedup.as_mut().ok_or(Qcow2Error::DedupOff)?;
                        let first = d.index.lookup(&h).is_empty();
                        if first {
                            // The first copy of this content stays where it is.
                            d.index.insert(&h, gc);
                        }
                        first
                    };
                    if !first {
                        self.link_or_write(gc, &buf, &h)?;
                    }
                }
            }
            drop(guard);
            if gc % 256 == 0 || gc + 1 == total {
                let saved = self.dedup_stats().map_or(0, |d| d.bytes_saved);
                progress(gc + 1, total, saved);
            }
        }
        self.flush_all()?;
        self.dedup_stats().ok_or(Qcow2Error::DedupOff)
    }

    fn drop_hint(&self, m: &mut Meta, h: &[u8; 32], cand: u64) {
        if let Some(d) = m.dedup.as_mut() {
            d.index.remove(h, cand);
            d.stats.stale_hints_rejected += 1;
        }
    }
}
