//! Read and write paths: plan under the metadata lock, move data outside it, link under it.

use super::dedup::ClusterGuard;
use super::guard::{AllocGuard, IoTicket};
use super::image::Qcow2;
use super::meta::frees::MAX_BLOCK_LOADS;
use super::meta::Meta;
use super::state::State;
use super::{compress, iov};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::L2Entry;
use crate::storage::Storage;
use std::io::{IoSlice, IoSliceMut};
use std::sync::MutexGuard;

/// Where a piece of a read comes from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Src {
    Data(u64),
    Zero,
    Backing(u64),
    Compressed { host: u64, size: u64, in_off: u64 },
}

/// Where the bytes of a partially written new cluster come from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cow {
    Zero,
    Backing,
    Host(u64),
    Compressed { host: u64, size: u64 },
}

/// Bytes written before and after the guest's data in a new cluster.
type Pads = (Option<Vec<u8>>, Option<Vec<u8>>);

#[derive(Debug)]
enum WKind {
    /// In place, into a cluster with refcount 1.
    Direct(u64),
    /// A whole new cluster (or a preallocated zero cluster, `reuse`), then linked. `fresh`: the
    /// cluster lies past the old end of the file and already reads as zeros.
    Alloc {
        host: u64,
        cow: Cow,
        reuse: bool,
        fresh: bool,
    },
}

#[derive(Debug)]
struct WChunk {
    gc: u64,
    in_off: u64,
    buf_off: usize,
    len: usize,
    kind: WKind,
}

impl WChunk {
    /// True when the rest of the cluster must be written around the guest's data.
    fn padded(&self) -> bool {
        matches!(self.kind, WKind::Alloc { cow, fresh, .. } if !(fresh && matches!(cow, Cow::Zero)))
    }

    /// The host byte range this chunk writes.
    fn host_range(&self, cs: u64) -> (u64, u64) {
        match self.kind {
            WKind::Alloc { host, .. } if self.padded() => (host, host + cs),
            WKind::Direct(h) | WKind::Alloc { host: h, .. } => {
                (h + self.in_off, h + self.in_off + self.len as u64)
            }
        }
    }
}

/// Give back the new clusters a plan took (those it assigned one; a host offset is never 0).
fn give_back(m: &mut Meta, s: &dyn Storage, chunks: &[WChunk]) {
    for c in chunks {
        if let WKind::Alloc {
            host, reuse: false, ..
        } = c.kind
        {
            if host != 0 {
                m.unalloc_data(s, host, 1);
            }
        }
    }
}

impl Qcow2 {
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size() => Ok(()),
            _ => Err(Qcow2Error::OutOfRange {
                offset,
                len,
                capacity: self.size(),
            }),
        }
    }

    /// Read `bufs.len()` bytes at guest `offset`.
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov::len_mut(bufs);
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (segs, io) = {
            let mut m = self.load_tables(self.lock(), offset, len)?;
            let segs = self.map_read(&mut m, offset, len)?;
            (segs, self.begin_io(&mut m))
        };
        let r = self.read_segments(bufs, &segs);
        let mut m = self.lock();
        if io.end(&mut m) {
            drop(m);
            self.cond.notify_all();
        }
        r
    }

    /// Read the L2 tables of `offset..offset+len` that are not cached, without the lock (the
    /// lock is dropped and taken again around each read): a miss then stalls only this request,
    /// not every queue's planning. A table that cannot be read is left to `entry`, which reads
    /// it under the lock and reports the error.
    pub(super) fn load_tables<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        offset: u64,
        len: u64,
    ) -> Result<MutexGuard<'a, State>> {
        let s = self.storage.as_ref();
        let per_table = self.g.cluster_size() << self.g.l2_bits;
        let mut at = offset / per_table * per_table;
        while at < offset.saturating_add(len) {
            let gc = at >> self.g.cluster_bits;
            if let Some((off, cs, ticket)) = m.l2_to_load(s, gc)? {
                drop(m);
                let mut buf = vec![0u8; cs as usize];
                let r = s.read_at(&mut buf, off);
                m = self.lock();
                m.l2_loaded(s, off, ticket, r.is_ok().then_some(&buf[..]))?;
            }
            at = at.saturating_add(per_table);
        }
        Ok(m)
    }

    /// Read the refcount blocks of `Meta::refcounts_to_load` without the lock (dropped and
    /// taken again around the reads), so that a refcount-block miss in an allocation or in a
    /// flush's frees stalls only this request. A block that cannot be read is left to the
    /// locked path, which reports the error.
    pub(super) fn load_refcounts<'a>(
        &'a self,
        m: MutexGuard<'a, State>,
        want: Vec<(u64, u64, u64)>,
    ) -> MutexGuard<'a, State> {
        self.read_refcounts(m, want).0
    }

    /// `load_refcounts`, also telling whether every read succeeded.
    fn read_refcounts<'a>(
        &'a self,
        m: MutexGuard<'a, State>,
        want: Vec<(u64, u64, u64)>,
    ) -> (MutexGuard<'a, State>, bool) {
        if want.is_empty() {
            return (m, true);
        }
        drop(m);
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size() as usize;
        let got: Vec<(u64, u64, Option<Vec<u8>>)> = want
            .into_iter()
            .map(|(b, off, ticket)| {
                let mut buf = vec![0u8; cs];
                (b, ticket, s.read_at(&mut buf, off).ok().map(|()| buf))
            })
            .collect();
        let mut m = self.lock();
        let mut all = true;
        for (b, ticket, d) in got {
            all &= d.is_some();
            m.rc.block_loaded(b, ticket, d);
        }
        (m, all)
    }

    /// Every refcount block a flush's frees (`unlinked`, and those waiting for I/O) need,
    /// read without the lock in rounds of `MAX_BLOCK_LOADS`: a large discard's frees spread
    /// over many blocks (a dedup image's shared clusters, small clusters) no longer read the
    /// rest under the lock when the frees are applied. At most half the clean cache in all,
    /// so that the last rounds do not evict what the first ones read; the rounds stop at the
    /// first failed read (the locked path reports it).
    pub(super) fn load_free_refcounts<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        unlinked: &[u64],
    ) -> MutexGuard<'a, State> {
        let mut budget = m.rc.clean_capacity() / 2;
        loop {
            let want = m.refcounts_to_load(unlinked);
            let n = want.len();
            if n == 0 {
                return m;
            }
            let (g, all) = self.read_refcounts(m, want);
            m = g;
            budget = budget.saturating_sub(n);
            if !all || budget == 0 {
                return m;
            }
        }
    }

    /// The L2 tables a flush's frees may look up (`Meta::free_tables_to_load`: the sharers
    /// of freed dedup clusters), read without the lock before the frees are applied; at most
    /// half the cache. A table whose read fails is left to the locked lookup.
    pub(super) fn load_free_tables<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        unlinked: &[u64],
    ) -> MutexGuard<'a, State> {
        let cs = self.g.cluster_size();
        for g in m.free_tables_to_load(unlinked) {
            m = match self.load_tables(m, g * cs, cs) {
                Ok(m) => m,
                Err(_) => self.lock(),
            };
        }
        m
    }

    /// Before an allocation of `n` clusters: move the allocator's search start past the
    /// clusters in use and find a run of `n` free ones (`Refcounts::skip_allocated`),
    /// reading the refcount blocks that takes without the lock. After an open the search
    /// starts at cluster 0, so the first allocation in a full image goes through every block
    /// up to the first free cluster; read under the lock, those reads stalled every queue. A
    /// round reads one block, then twice as many as the last (up to `MAX_BLOCK_LOADS`) while
    /// the blocks read are full; a block another request is reading is waited for. The rounds
    /// stop at the first failed read (the locked path reports it).
    pub(super) fn load_alloc_refcounts<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
        n: u64,
    ) -> MutexGuard<'a, State> {
        let mut ahead = 1usize;
        let n = n.clamp(1, m.rc.max_run());
        while let Some(b) = m.rc.skip_allocated(n) {
            let want = m.rc.blocks_to_load_from(b, ahead);
            if want.is_empty() {
                // Block b is being read by another request, which wakes the waiters when
                // done; the timeout covers a load under the lock that took it over.
                m = self
                    .cond
                    .wait_timeout(m, std::time::Duration::from_millis(5))
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
                continue;
            }
            let (g, all) = self.read_refcounts(m, want);
            m = g;
            self.cond.notify_all();
            if !all {
                break;
            }
            ahead = (ahead * 2).min(MAX_BLOCK_LOADS);
        }
        m
    }

    /// Create the refcount block the allocator will need soon (`Refcounts::block_to_create`),
    /// its writes and syncs without the lock, so that they stall only this request. The file
    /// is grown over it first, under the lock, so that no concurrent growth cuts it off. A
    /// failure is logged and left to the locked path, which creates the block when it needs
    /// it and reports the error.
    pub(super) fn create_refcount_block<'a>(
        &'a self,
        mut m: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        if self.read_only || m.is_corrupt() {
            return m;
        }
        let Some(nb) = m.rc.block_to_create() else {
            return self.grow_refcount_table(m);
        };
        let s = self.storage.as_ref();
        let cs = self.g.cluster_size();
        let r = match m.grow_file(s, nb.end(cs)) {
            Ok(()) => {
                drop(m);
                let r = nb.write(s, cs);
                m = self.lock();
                r
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        if let Err(e) = &r {
            log::warn!("creating a refcount block without the lock failed: {e}");
        }
        if let Err(e) = m.rc.block_created(s, nb, r.is_ok()) {
            log::warn!("freeing the refcount table a growth replaced failed: {e}");
        }
        m
    }

    /// Grow the refcount table before the allocator needs it (`Refcounts::table_to_grow`):
    /// its writes and syncs, and the header switch, without the lock. A failure is logged and
    /// left to the locked path, which grows the table when it must and reports the error.
    fn grow_refcount_table<'a>(&'a self, mut m: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let Some(mut step) = m.rc.table_to_grow() else {
            return m;
        };
        let s = self.storage.as_ref();
        loop {
            // Only the first step writes past what the file holds (the header step needs 0).
            let grown = if step.end() > 0 {
                m.grow_file(s, step.end())
            } else {
                Ok(())
            };
            let r = match grown {
                Ok(()) => {
                    drop(m);
                    let r = step.run(s);
                    m = self.lock();
                    r
                }
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            if let Err(e) = &r {
                log::warn!("a step of a refcount table growth without the lock failed: {e}");
            }
            match m.rc.table_step_done(s, step, r.is_ok()) {
                Ok(Some(next)) => step = next,
                Ok(None) => return m,
                Err(e) => {
                    log::warn!("freeing the refcount table a growth replaced failed: {e}");
                    return m;
                }
            }
        }
    }

    /// Where each piece of the guest range `offset..offset+len` comes from, host-contiguous
    /// pieces merged: (offset in the caller's buffers, length, source).
    pub(super) fn map_read(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(usize, usize, Src)>> {
        let cb = self.g.cluster_bits;
        let s = self.storage.as_ref();
        let mut segs: Vec<(usize, usize, Src)> = Vec::new();
        for iov::Chunk {
            gc,
            in_off,
            n,
            buf_off,
        } in iov::chunks(offset, len, cb)
        {
            let pos = offset + buf_off as u64;
            let src = match m.entry(s, gc)? {
                L2Entry::Normal { host, .. } => Src::Data(host.0 + in_off),
                L2Entry::Zero { .. } => Src::Zero,
                L2Entry::Unallocated if self.backing.is_some() => Src::Backing(pos),
                L2Entry::Unallocated => Src::Zero,
                L2Entry::Compressed { host, size } => Src::Compressed { host, size, in_off },
                L2Entry::Invalid(raw) => {
                    return Err(Qcow2Error::corrupt(format!("invalid L2 entry {raw:#x}")))
                }
            };
            match (segs.last_mut(), src) {
                (Some((_, l, Src::Data(h))), Src::Data(h2)) if *h + *l as u64 == h2 => {
                    *l += n as usize
                }
                (Some((_, l, Src::Zero)), Src::Zero) => *l += n as usize,
                (Some((_, l, Src::Backing(g))), Src::Backing(g2)) if *g + *l as u64 == g2 => {
                    *l += n as usize
                }
                _ => segs.push((buf_off, n as usize, src)),
            }
        }
        Ok(segs)
    }

    fn read_segments(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        segs: &[(usize, usize, Src)],
    ) -> Result<()> {
        for &(buf_off, len, src) in segs {
            let mut sub = iov::slice_mut(bufs, buf_off, len);
            match src {
                Src::Data(h) => self.storage.readv_at(&mut sub, h)?,
                Src::Zero => iov::fill_zero(&mut sub),
                Src::Backing(g) => self.read_backing(g, &mut sub)?,
                Src::Compressed { host, size, in_off } => {
                    let cluster = self.decompress(host, size)?;
                    iov::copy_into(&mut sub, &cluster[in_off as usize..in_off as usize + len]);
                }
            }
        }
        Ok(())
    }

    /// Read from the backing file; what lies past its end reads as zeros.
    fn read_backing(&self, guest: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov::len_mut(bufs);
        let Some(b) = &self.backing else {
            iov::fill_zero(bufs);
            return Ok(());
        };
        let cap = b.capacity();
        let inside = cap.saturating_sub(guest).min(len) as usize;
        if inside > 0 {
            let mut sub = iov::slice_mut(bufs, 0, inside);
            b.read_vectored(guest, &mut sub)
                .map_err(|e| Qcow2Error::Backing {
                    path: "backing file".into(),
                    source: Box::new(Qcow2Error::Io(std::io::Error::other(e.to_string()))),
                })?;
        }
        if (inside as u64) < len {
            let mut rest = iov::slice_mut(bufs, inside, len as usize - inside);
            iov::fill_zero(&mut rest);
        }
        Ok(())
    }

    fn decompress(&self, host: u64, size: u64) -> Result<Vec<u8>> {
        let cs = self.g.cluster_size();
        if size > 2 * cs + 512 {
            return Err(Qcow2Error::corrupt(format!(
                "compressed cluster of {size} bytes"
            )));
        }
        let mut input = vec![0u8; size as usize];
        self.storage.read_at(&mut input, host)?;
        let mut out = vec![0u8; cs as usize];
        compress::decompress(self.header.compression_type, &input, &mut out)?;
        Ok(out)
    }

    /// The bytes `range` of guest cluster `gc` as they were before a write replaces it.
    fn cow_bytes(&self, cow: Cow, gc: u64, lo: u64, hi: u64) -> Result<Vec<u8>> {
        let cs = self.g.cluster_size();
        let mut buf = vec![0u8; (hi - lo) as usize];
        match cow {
            Cow::Zero => {}
            Cow::Host(h) => self.storage.read_at(&mut buf, h + lo)?,
            Cow::Backing => self.read_backing(gc * cs + lo, &mut [IoSliceMut::new(&mut buf)])?,
            Cow::Compressed { host, size } => {
                let c = self.decompress(host, size)?;
                buf.copy_from_slice(&c[lo as usize..hi as usize]);
            }
        }
        Ok(buf)
    }

    /// Write `bufs` at guest `offset`. When it returns Ok, whatever the write depends on is in
    /// the image file (persist before ack, unless `AckDurability::Memory`).
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        self.check_range(offset, iov::len(bufs))?;
        let r = if self.dedup_on {
            // Every change of a dedup write that succeeds is counted for the next flush where
            // it is made (set_entry, the data of a unique cluster, write_plain); after a failure
            // whatever landed before it is counted here.
            let r = self.write_dedup(offset, bufs);
            if r.is_err() {
                self.lock().note_change();
            }
            r
        } else {
            self.write_plain(offset, bufs)
        };
        let r = r.and_then(|need| self.persist(need));
        self.note_error(r)
    }

    /// The write path without dedup. Returns the table change it depends on that is not in the
    /// file yet (see `Meta::ack_need`; the caller persists it before it returns).
    pub(crate) fn write_plain(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<u64> {
        self.write_plain_held(offset, bufs, None)
    }

    /// `write_plain` for a dedup writer holding the guest cluster: the hold is released in the
    /// lock section that ends the write (one lock round trip less per write).
    pub(crate) fn write_plain_held(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
        hold: Option<ClusterGuard<'_>>,
    ) -> Result<u64> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        let len = iov::len(bufs);
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        let (chunks, mut alloc, io) = self.plan_write(offset, len)?;
        let r = self.write_chunks(bufs, &chunks);
        let mut m = self.lock();
        alloc.linking();
        let s = self.storage.as_ref();
        let mut result = r;
        for c in &chunks {
            if let WKind::Alloc { host, reuse, .. } = c.kind {
                if result.is_ok() {
                    if c.padded() {
                        m.data_first();
                    } else if m.dedup.is_some() {
                        // No sync for its own entry; a dedup link to it needs one.
                        m.note_unsynced(host / self.g.cluster_size());
                    }
                    let linked = m.entry(s, c.gc).and_then(|old| {
                        m.set_entry(
                            s,
                            c.gc,
                            L2Entry::Normal {
                                host: crate::qcow2::offsets::HostOffset(host),
                                copied: true,
                            },
                        )?;
                        if !reuse {
                            if !matches!(
                                old,
                                L2Entry::Unallocated | L2Entry::Zero { host: None, .. }
                            ) {
                                m.stats.cow_clusters += 1;
                            }
                            m.release(s, c.gc, old)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = linked {
                        result = Err(e);
                    }
                } else if !reuse {
                    m.unalloc_data(s, host, 1);
                }
                let _ = m.end_alloc(c.gc);
            }
        }
        alloc.disarm();
        let barrier = io.end(&mut m);
        // The data is in the file (or failed): the next flush must sync it.
        m.note_change();
        // The entries it went through (linked just now, or written in place through an entry
        // another writer linked and has not persisted yet).
        let cb = self.g.cluster_bits;
        let need = m.ack_need(offset >> cb, (offset + len - 1) >> cb);
        let released = hold.is_some_and(|h| h.release(&mut m));
        // Waiters: writers of a guest cluster this request held or allocated, and dedup
        // verifiers waiting for older I/O; one wake-up for all of them, none without any.
        let allocated = chunks.iter().any(|c| matches!(c.kind, WKind::Alloc { .. }));
        let wake = barrier || released || (allocated && m.cluster_waiters());
        drop(m);
        if wake {
            self.cond.notify_all();
        }
        result.map(|()| need)
    }

    /// Map every cluster of the write; reserve new clusters for those that need one. Waits while
    /// another request allocates one of the same guest clusters. The reservations and the I/O
    /// are registered in guards: the caller's link step ends them, or their drop does.
    fn plan_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<WChunk>, AllocGuard<'_>, IoTicket<'_>)> {
        let cb = self.g.cluster_bits;
        let cs = self.g.cluster_size();
        let s = self.storage.as_ref();
        let m = self.load_tables(self.lock(), offset, len)?;
        // The data's clusters in one run (the tables they may need come first, one each).
        let m = self.load_alloc_refcounts(m, len.div_ceil(cs));
        let mut m = self.create_refcount_block(m);
        'retry: loop {
            // Checked again after every wait: the image may have been marked meanwhile.
            if m.is_corrupt() {
                return Err(Qcow2Error::MarkedCorrupt);
            }
            let mut chunks = Vec::new();
            let mut need = 0u64;
            for iov::Chunk {
                gc,
                in_off,
                n,
                buf_off,
            } in iov::chunks(offset, len, cb)
            {
                let e = m.entry(s, gc)?;
                let kind = match e {
                    L2Entry::Normal { host, copied: true } => WKind::Direct(host.0),
                    _ if m.allocating(gc) => {
                        m = self.wait_cluster(m);
                        continue 'retry;
                    }
                    L2Entry::Zero {
                        host: Some(h),
                        copied: true,
                    } => WKind::Alloc {
                        host: h.0,
                        cow: Cow::Zero,
                        reuse: true,
                        fresh: false,
                    },
                    other => {
                        need += 1;
                        let cow = match other {
                            L2Entry::Unallocated if self.backing.is_some() => Cow::Backing,
                            L2Entry::Unallocated | L2Entry::Zero { .. } => Cow::Zero,
                            L2Entry::Normal { host, .. } => Cow::Host(host.0),
                            L2Entry::Compressed { host, size } => Cow::Compressed { host, size },
                            L2Entry::Invalid(raw) => {
                                return Err(Qcow2Error::corrupt(format!(
                                    "invalid L2 entry {raw:#x}"
                                )))
                            }
                        };
                        WKind::Alloc {
                            host: 0,
                            cow,
                            reuse: false,
                            fresh: false,
                        }
                    }
                };
                chunks.push(WChunk {
                    gc,
                    in_off,
                    buf_off,
                    len: n as usize,
                    kind,
                });
            }
            if need > 0 {
                // New clusters come in runs of at most `max_run`: fresh space has no longer
                // run (each new refcount block takes the first cluster of the range it covers),
                // so asking for more would never succeed. Runs need not follow each other.
                let max_run = m.rc.max_run();
                let (mut next, mut past_eof, mut left, mut remaining) = (0, false, 0, need);
                let mut failed = None;
                for c in chunks.iter_mut() {
                    if let WKind::Alloc {
                        host,
                        reuse: false,
                        fresh,
                        ..
                    } = &mut c.kind
                    {
                        if left == 0 {
                            let k = remaining.min(max_run);
                            match m.alloc_data(s, k) {
                                Ok(r) => (next, past_eof) = r,
                                Err(e) => {
                                    failed = Some(e);
                                    break;
                                }
                            }
                            (left, remaining) = (k, remaining - k);
                        }
                        *host = next;
                        *fresh = past_eof;
                        next += cs;
                        left -= 1;
                    }
                }
                if let Some(e) = failed {
                    // Give back the runs taken before the one that failed.
                    give_back(&mut m, s, &chunks);
                    return Err(e);
                }
            }
            // Overlap checks: no data write may land on metadata.
            for c in &chunks {
                let (lo, hi) = c.host_range(cs);
                if let Err(e) = m.rc.guard(lo, hi - lo, 0) {
                    give_back(&mut m, s, &chunks);
                    return Err(e);
                }
            }
            let mut registered = Vec::new();
            for c in &chunks {
                if let WKind::Alloc { host, reuse, .. } = c.kind {
                    m.begin_alloc(c.gc);
                    registered.push((c.gc, (!reuse).then_some(host)));
                }
            }
            let io = self.begin_io(&mut m);
            drop(m);
            return Ok((chunks, AllocGuard::new(self, registered), io));
        }
    }

    /// Write the planned chunks; host-contiguous chunks go out in one vectored write.
    fn write_chunks(&self, bufs: &[IoSlice<'_>], chunks: &[WChunk]) -> Result<()> {
        let cs = self.g.cluster_size();
        // COW pieces for partial clusters, read before anything is written.
        let mut pads: Vec<Pads> = Vec::with_capacity(chunks.len());
        for c in chunks {
            let pad = match c.kind {
                WKind::Alloc { cow, .. } if c.padded() => {
                    let head_end = c.in_off;
                    let tail_start = c.in_off + c.len as u64;
                    let head = (head_end > 0)
                        .then(|| self.cow_bytes(cow, c.gc, 0, head_end))
                        .transpose()?;
                    let tail = (tail_start < cs)
                        .then(|| self.cow_bytes(cow, c.gc, tail_start, cs))
                        .transpose()?;
                    (head, tail)
                }
                _ => (None, None),
            };
            pads.push(pad);
        }
        let mut i = 0;
        while i < chunks.len() {
            let start = chunks[i].host_range(cs).0;
            let mut j = i;
            while j + 1 < chunks.len()
                && chunks[j].host_range(cs).1 == chunks[j + 1].host_range(cs).0
            {
                j += 1;
            }
            let mut iovs: Vec<IoSlice<'_>> = Vec::new();
            for k in i..=j {
                if let Some(h) = &pads[k].0 {
                    iovs.push(IoSlice::new(h));
                }
                iovs.extend(iov::slice(bufs, chunks[k].buf_off, chunks[k].len));
                if let Some(t) = &pads[k].1 {
                    iovs.push(IoSlice::new(t));
                }
            }
            self.storage.writev_at(&iovs, start)?;
            i = j + 1;
        }
        Ok(())
    }
}
