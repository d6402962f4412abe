//! Settling one whole cluster of new content: an identical rewrite (no I/O), a link to a proven
//! copy, or unique data. Each step runs under the metadata lock but the candidate's compare
//! read and the unique data write, which run outside it.

use super::{forget_after_error, record, set_record, RecordGuard, MAX_HINTS};
use crate::qcow2::engine::image::Qcow2;
use crate::qcow2::engine::state::State;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::L2Entry;
use crate::qcow2::offsets::HostOffset;
use std::sync::MutexGuard;

/// What trying one candidate came to.
enum Tried<'a> {
    /// Linked: done.
    Linked(MutexGuard<'a, State>),
    /// Not usable: try the next one.
    Next(MutexGuard<'a, State>),
    /// The candidates changed (a wait, a stale hint): look them up again.
    Again(MutexGuard<'a, State>),
}

/// A candidate the index named, as its entry is now.
#[derive(Clone, Copy)]
struct Candidate {
    gc: u64,
    /// Host offset of its cluster.
    host: u64,
    /// Its entry has COPIED.
    copied: bool,
}

/// Candidates' index clusters `load_candidates` reads ahead at most (a content has one or two
/// hints; the rest of a long list is read under the lock if it is ever tried). At most half
/// the record cache too, so the first ones read are not evicted by the last.
const MAX_CANDIDATE_RECORDS: usize = 8;

impl Qcow2 {
    /// Write whole cluster `buf` with hash `h` to guest cluster `gc` (held by the caller): a link
    /// to an identical cluster if one is proven, else unique data.
    /// With `have`, `gc` already holds `buf`: nothing is written, a unique cluster is only
    /// recorded and indexed where it is.
    /// Takes the lock (taken by the caller, who holds `gc`) and gives it back at the end, so the
    /// caller releases `gc` without taking it again.
    pub(super) fn link_or_write<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gc: u64,
        buf: &[u8],
        h: &[u8; 32],
        have: bool,
    ) -> Result<MutexGuard<'a, State>> {
        if self.identical_rewrite(&mut m, gc, h)? {
            return Ok(m);
        }
        'lookup: loop {
            m = self.load_candidates(m, h);
            let cands = self.ranked_candidates(&mut m, gc, h)?;
            let n_cands = cands.len();
            for cand in cands {
                match self.try_candidate(m, gc, cand, buf, h, n_cands)? {
                    Tried::Linked(done) => return Ok(done),
                    Tried::Next(next) => m = next,
                    Tried::Again(again) => {
                        m = again;
                        continue 'lookup;
                    }
                }
            }
            break;
        }
        if have {
            let s = self.storage.as_ref();
            set_record(&mut m, s, gc, h)?;
            // Indexed unless a hint already leads to the same host cluster: on a second pass
            // over clusters that share a copy at the refcount cap, a hint per cluster would
            // make every later lookup of the content (and the index's probe chain) longer,
            // quadratic over the pass.
            if !self.hinted_host(&mut m, gc, h)? {
                if let Some(d) = m.dedup.as_mut() {
                    d.index.insert(h, gc);
                }
            }
            return Ok(m);
        }
        self.write_unique(m, gc, buf, h)
    }

    /// Read what the lookups of `h`'s candidates need and the caches lack (their L2 tables,
    /// then the refcount blocks of their clusters, then the index clusters of their records,
    /// `MAX_CANDIDATE_RECORDS` at most) without the lock, which is dropped and taken again
    /// around the reads (the caller's cluster stays held), as `load_tables` does for a
    /// request's own range. A table, block or record that cannot be read is left to the
    /// lookup under the lock, which reports the error.
    fn load_candidates<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        h: &[u8; 32],
    ) -> MutexGuard<'a, State> {
        let s = self.storage.as_ref();
        let hints = m
            .dedup
            .as_ref()
            .map(|d| d.index.lookup(h))
            .unwrap_or_default();
        for &c in &hints {
            let Ok(Some((off, cs, ticket))) = m.l2_to_load(s, c) else {
                continue;
            };
            drop(m);
            let mut buf = vec![0u8; cs as usize];
            let r = s.read_at(&mut buf, off);
            m = self.lock();
            if let Err(e) = m.l2_loaded(s, off, ticket, r.is_ok().then_some(&buf[..])) {
                log::debug!("dedup candidate {c}: table at {off:#x}: {e}");
            }
        }
        let cs = self.g.cluster_size();
        let mut want = Vec::new();
        for &c in &hints {
            if let Some(off) = m.l2_cached_host(c) {
                let b = m.rc.block_of(off / cs);
                if let Some((at, ticket)) = m.rc.block_to_load(b) {
                    want.push((b, at, ticket));
                }
            }
        }
        let mut m = self.load_refcounts(m, want);
        // And their records: the lookup reads a candidate's record, and a compare that proves
        // the candidate updates it.
        let records = match m.dedup.as_mut().and_then(|d| d.records.as_mut()) {
            Some(r) => r.records_of_to_load(hints.iter().copied(), MAX_CANDIDATE_RECORDS),
            None => Vec::new(),
        };
        self.read_records(m, records)
    }

    /// True when `gc` or another guest cluster on the same host cluster is a hint for `h`.
    fn hinted_host(&self, m: &mut State, gc: u64, h: &[u8; 32]) -> Result<bool> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let host_of = |m: &mut State, c: u64| -> Result<Option<u64>> {
            Ok(match m.entry(s, c)? {
                L2Entry::Normal { host, .. } => Some(host.0 / cs),
                _ => None,
            })
        };
        let Some(own) = host_of(m, gc)? else {
            return Ok(false);
        };
        let hints = m
            .dedup
            .as_ref()
            .map(|d| d.index.lookup(h))
            .unwrap_or_default();
        for c in hints {
            if c == gc || host_of(m, c)? == Some(own) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The guest rewrites the content its cluster holds (a verified record says so): counted,
    /// nothing to do.
    fn identical_rewrite(&self, m: &mut State, gc: u64, h: &[u8; 32]) -> Result<bool> {
        let s = self.storage.as_ref();
        if let (Some((rh, true)), L2Entry::Normal { .. }) = (record(m, s, gc)?, m.entry(s, gc)?) {
            if rh == *h {
                if let Some(d) = m.dedup.as_mut() {
                    d.stats.identical_rewrites += 1;
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The guest clusters the index names for `h`, the most shared copy first and our own
    /// cluster last: linking to it frees ours if it held a separate copy, and separate copies
    /// of one content converge on one cluster.
    fn ranked_candidates(&self, m: &mut State, gc: u64, h: &[u8; 32]) -> Result<Vec<u64>> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let Some(d) = m.dedup.as_ref() else {
            return Err(Qcow2Error::DedupOff);
        };
        let mut cands: Vec<(bool, u64, u64)> = Vec::new();
        for c in d.index.lookup(h) {
            let rc = match m.entry(s, c)? {
                L2Entry::Normal { host, .. } => m.rc.get(s, host.0 / cs)?,
                _ => 0,
            };
            cands.push((c == gc, u64::MAX - rc, c));
        }
        cands.sort_unstable();
        Ok(cands.into_iter().map(|(_, _, c)| c).collect())
    }

    /// Try to link `gc` to candidate `cand`: skip it if another writer replaces it, wait for a
    /// writer publishing this content there, drop a stale hint, respect the refcount cap, then
    /// prove the content (a verified record, or a compare) and link.
    fn try_candidate<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gc: u64,
        cand: u64,
        buf: &[u8],
        h: &[u8; 32],
        n_cands: usize,
    ) -> Result<Tried<'a>> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        if cand != gc && m.is_held(cand) {
            if m.dedup
                .as_ref()
                .is_some_and(|d| d.published.contains(&cand))
            {
                // Its writer is writing this content there right now: wait, then look again
                // (so two writers of one content end with one cluster).
                return Ok(Tried::Again(self.wait_cluster(m)));
            }
            // Its writer is replacing the content the hint names (and may itself be waiting
            // for the cluster we hold): not a candidate.
            return Ok(Tried::Next(m));
        }
        let c = match m.entry(s, cand)? {
            L2Entry::Normal { host, copied } => Candidate {
                gc: cand,
                host: host.0,
                copied,
            },
            _ => {
                self.drop_hint(&mut m, h, cand)?;
                return Ok(Tried::Next(m));
            }
        };
        let hc = c.host / cs;
        let cap = m.dedup.as_ref().map_or(0, |d| d.cap);
        if m.rc.get(s, hc)? >= cap {
            if let Some(d) = m.dedup.as_mut() {
                d.stats.refcount_cap_hits += 1;
            }
            return Ok(Tried::Next(m));
        }
        // A verified record of the candidate proves its content (full SHA-256, kept current
        // under this lock by every write since it was computed; no writer holds the
        // candidate): link without reading it back.
        let proven = matches!(record(&mut m, s, cand)?, Some((rh, true)) if rh == *h);
        if proven {
            if c.copied && cand != gc {
                m.set_copied(s, cand, hc, false)?;
            }
            if let Some(d) = m.dedup.as_mut() {
                d.stats.links_without_read += 1;
            }
        } else {
            let (mm, same) = self.compare(m, gc, c, buf)?;
            m = mm;
            if !same {
                self.drop_hint(&mut m, h, cand)?;
                return Ok(Tried::Again(m));
            }
            // The candidate's record is proven now.
            set_record(&mut m, s, cand, h)?;
        }
        self.link(&mut m, gc, c, h, n_cands)?;
        Ok(Tried::Linked(m))
    }

    /// Prove candidate `c` holds `buf` by reading it back:
    /// 1. freeze it: no COPIED (no new write goes to it in place), pinned (its frees wait), and
    ///    the data I/O planned while it had COPIED finished;
    /// 2. compare, outside the lock;
    /// 3. on a mismatch or a failed read, COPIED back if it is its cluster's only user.
    ///
    /// Returns the lock and whether the content is the same (and the cluster still in use).
    fn compare<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gc: u64,
        c: Candidate,
        buf: &[u8],
    ) -> Result<(MutexGuard<'a, State>, bool)> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let hc = c.host / cs;
        let copied = c.copied && c.gc != gc;
        if copied {
            m.set_copied(s, c.gc, hc, false)?;
        }
        m.pin(hc);
        if c.copied {
            // Writes planned while the entry still had COPIED may be writing into the cluster
            // in place: let them finish. A cluster without COPIED has had none since the link
            // that cleared it waited here.
            let barrier = m.next_io();
            m.barrier_wait(true);
            while m.oldest_io() < barrier {
                m = self.wait(m);
            }
            m.barrier_wait(false);
        }
        let io = self.begin_io(&mut m);
        drop(m);
        let mut theirs = vec![0u8; cs as usize];
        let read = s.read_at(&mut theirs, c.host);
        let mut m = self.lock();
        if io.end(&mut m) {
            self.cond.notify_all();
        }
        // What the lookups below and the link need and the caches dropped during the read,
        // read again without the lock (the candidate stays pinned meanwhile).
        let reloaded = self.reload_for_link(m, gc, c.gc, hc);
        let mut m = match reloaded {
            Ok(m) => m,
            Err(e) => {
                self.lock().unpin(hc);
                return Err(e);
            }
        };
        m.unpin(hc);
        let same = read.is_ok() && theirs == buf && m.rc.get(s, hc)? >= 1;
        if !same && copied && m.rc.get(s, hc)? == 1 {
            // Not linked after all: the candidate is its cluster's only user again.
            m.set_copied(s, c.gc, hc, true)?;
        }
        read?;
        Ok((m, same))
    }

    /// The L2 tables of `gc` and of the candidate `cand`, and the refcount block of its host
    /// cluster `hc`, read without the lock if the caches dropped them while a compare read
    /// the candidate (a cache smaller than the image, other requests meanwhile).
    fn reload_for_link<'a>(
        &'a self,
        m: MutexGuard<'a, State>,
        gc: u64,
        cand: u64,
        hc: u64,
    ) -> Result<MutexGuard<'a, State>> {
        let cs = self.g.cluster_size();
        let m = self.load_tables(m, gc * cs, cs)?;
        let mut m = self.load_tables(m, cand * cs, cs)?;
        let b = m.rc.block_of(hc);
        let want = m.rc.block_to_load(b).map(|(off, t)| (b, off, t));
        Ok(self.load_refcounts(m, want.into_iter().collect()))
    }

    /// Link `gc` to the proven candidate `c`: refcount + 1, the new entry without COPIED, the
    /// old entry released, both recorded as sharing the cluster; `gc` indexed while the content
    /// has few hints.
    fn link(
        &self,
        m: &mut State,
        gc: u64,
        c: Candidate,
        h: &[u8; 32],
        n_cands: usize,
    ) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let hc = c.host / cs;
        let cur = m.entry(s, gc)?;
        let cand_alive = matches!(m.entry(s, c.gc)?,
            L2Entry::Normal { host, .. } if host.0 == c.host);
        let identical = cur.host_cluster().map(|o| o.0) == Some(c.host);
        if !identical {
            // The cluster's data may not be durable yet (a new cluster that read as zeros
            // skipped its sync): this guest cluster had other content, so sync first.
            if m.link_needs_sync(hc) {
                m.data_first();
            }
            m.rc.add(s, hc, 1)?;
            m.set_entry(
                s,
                gc,
                L2Entry::Normal {
                    host: HostOffset(c.host),
                    copied: false,
                },
            )?;
            m.release(s, gc, cur)?;
            if cand_alive {
                m.sharing.add(hc, c.gc);
            }
            m.sharing.add(hc, gc);
        }
        set_record(m, s, gc, h)?;
        if let Some(d) = m.dedup.as_mut() {
            // Both hold the content now: either can serve as the hint later. A few hints per
            // content are enough to survive rewrites of the first ones; more would only make
            // every lookup of a popular content longer.
            if n_cands < MAX_HINTS {
                d.index.insert(h, gc);
            }
            // Space saved counts links only: an identical rewrite saves a write, not space.
            if identical {
                d.stats.identical_rewrites += 1;
            } else {
                d.stats.clusters_deduplicated += 1;
                d.stats.bytes_saved += cs;
            }
        }
        Ok(())
    }

    /// Unique data: in place when the cluster is ours alone, else a new cluster. Recorded and
    /// indexed before the data lands, so a concurrent writer of the same content waits for this
    /// one (we hold the cluster) and links to it instead of writing a copy.
    fn write_unique<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        gc: u64,
        buf: &[u8],
        h: &[u8; 32],
    ) -> Result<MutexGuard<'a, State>> {
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let cur = m.entry(s, gc)?;
        // `zeros`: a new cluster that reads as zeros on disk, for a guest cluster that read as
        // zeros: a lost data write then reads as before, so its data needs no sync before the
        // entry (as for plain writes, `WChunk::padded`).
        let (host, fresh_alloc, zeros) = match cur {
            L2Entry::Normal { host, copied: true } => (host.0, false, false),
            _ => {
                let (host, fresh) = m.alloc_data(s, 1)?;
                let read_zeros = match cur {
                    L2Entry::Zero { host: None, .. } => true,
                    L2Entry::Unallocated => self.backing.is_none(),
                    _ => false,
                };
                (host, true, fresh && read_zeros)
            }
        };
        let placed =
            m.rc.guard(host, cs, 0)
                .and_then(|()| set_record(&mut m, s, gc, h));
        if let Err(e) = placed {
            if fresh_alloc {
                m.unalloc_data(s, host, 1);
            }
            return Err(e);
        }
        if let Some(d) = m.dedup.as_mut() {
            d.index.insert(h, gc);
            d.published.insert(gc);
        }
        let io = self.begin_io(&mut m);
        // A panic before the data is in place must not leave a verified record that says it is.
        let record = RecordGuard { q: self, gc };
        drop(m);
        let w = s.write_at(buf, host);
        let mut m = self.lock();
        std::mem::forget(record);
        if io.end(&mut m) {
            // (Waking under the lock: the waiters look again once we release it.)
            self.cond.notify_all();
        }
        // The data is in the file (or failed): the next flush must sync it.
        m.note_change();
        // On any failure from here the record is false: forget it first, so that no link and no
        // "identical rewrite" ever trusts it.
        if let Err(e) = w {
            forget_after_error(&mut m, s, gc);
            if fresh_alloc {
                m.unalloc_data(s, host, 1);
            }
            return Err(e.into());
        }
        if fresh_alloc {
            let linked = m
                .set_entry(
                    s,
                    gc,
                    L2Entry::Normal {
                        host: HostOffset(host),
                        copied: true,
                    },
                )
                .and_then(|()| m.release(s, gc, cur));
            if let Err(e) = linked {
                forget_after_error(&mut m, s, gc);
                return Err(e);
            }
            if zeros {
                m.note_unsynced(host / cs);
            } else {
                m.data_first();
            }
        }
        if let Some(d) = m.dedup.as_mut() {
            d.stats.clusters_unique += 1;
        }
        Ok(m)
    }
}
