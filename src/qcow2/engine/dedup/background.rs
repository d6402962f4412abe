//! Background deduplication: in background mode guest writes complete as plain writes and their
//! guest clusters are recorded as pending (a bit in RAM, the `PENDING` record in the index area, so
//! a clean restart loses no work; after a crash the rebuild marks every duplicate it finds as
//! pending). A worker thread takes one pending cluster at a time: it holds that guest cluster
//! (a guest write to it waits for one cluster's work at most), reads and hashes it, and links it
//! to a proven identical cluster or indexes it where it is. Pause stops it before the next
//! cluster. The worker yields to the guest: it works while the guest does not write.

use super::{forget, ClusterGuard};
use crate::qcow2::engine::state::State;
use crate::qcow2::engine::Qcow2;
use crate::qcow2::error::Result;
use crate::qcow2::format::L2Entry;
use crate::qcow2::hashindex::{hash_cluster, is_zero};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    fn take(&mut self) -> Option<u64> {
        let gc = self
            .first_from(self.cursor)
            .or_else(|| self.first_from(0))?;
        self.remove(gc);
        self.cursor = gc + 1;
        Some(gc)
    }
}

/// Mark guest cluster `gc` pending (its data was just written plain in background mode).
/// Returns true when nothing was pending before.
pub(crate) fn mark_pending(m: &mut State, s: &dyn Storage, gc: u64) -> Result<bool> {
    let Some(d) = m.dedup.as_mut() else {
        return Ok(false);
    };
    let old = match d.records.as_mut() {
        Some(r) => r.set_pending(s, gc)?,
        None => None,
    };
    if let Some(old) = old {
        d.index.remove(&old, gc);
    }
    let first = d.pending.len() == 0;
    d.pending.insert(gc);
    Ok(first)
}

impl Qcow2 {
    /// Clusters waiting for the background worker.
    pub fn dedup_pending(&self) -> u64 {
        self.lock().dedup.as_ref().map_or(0, |d| d.pending.len())
    }

    /// True while the worker has work it may do (pending clusters, not paused, not off, open).
    fn worker_may_run(&self, m: &State) -> bool {
        !self.closed.load(Ordering::SeqCst)
            && !self.worker_stop.load(Ordering::SeqCst)
            && !self.dedup_paused()
            && self.dedup_mode() != crate::qcow2::format::dedup::DedupMode::Off
            && m.dedup.as_ref().is_some_and(|d| d.pending.len() > 0)
    }

    /// True when the background worker is working now (or would be, with work).
    pub fn dedup_worker_running(&self) -> bool {
        let m = self.lock();
        m.dedup.as_ref().is_some_and(|d| d.worker_busy) || self.worker_may_run(&m)
    }

    /// Wake the worker (new work, resume, mode change, stop).
    pub(crate) fn wake_worker(&self) {
        self.work_cond.notify_all();
    }

    /// Process one pending cluster, if the worker may run. Returns false when there was none.
    pub fn dedup_step(&self) -> Result<bool> {
        let gc = {
            let mut m = self.lock();
            if !self.worker_may_run(&m) {
                return Ok(false);
            }
            let Some(d) = m.dedup.as_mut() else {
                return Ok(false);
            };
            let Some(gc) = d.pending.take() else {
                return Ok(false);
            };
            d.worker_busy = true;
            gc
        };
        let r = self.dedup_existing_cluster(gc);
        let mut m = self.lock();
        if let Some(d) = m.dedup.as_mut() {
            d.worker_busy = false;
            if r.is_err() {
                // Try again later; the error is logged by the caller.
                d.pending.insert(gc);
            } else {
                d.stats.background_processed += 1;
            }
        }
        drop(m);
        self.cond.notify_all();
        r.map(|_| true)
    }

    /// Deduplicate the data guest cluster `gc` already holds: hold it, read it, and link it to a
    /// proven identical cluster or index it where it is.
    pub(crate) fn dedup_existing_cluster(&self, gc: u64) -> Result<()> {
        let cs = self.g.cluster_size();
        if (gc + 1) * cs > self.g.size {
            return Ok(());
        }
        let s = self.storage.as_ref();
        let guard: ClusterGuard<'_> = self.hold_cluster(gc);
        let entry = self.lock().entry(s, gc)?;
        if !matches!(entry, L2Entry::Normal { .. } | L2Entry::Compressed { .. }) {
            forget(&mut self.lock(), s, gc)?;
            drop(guard);
            return Ok(());
        }
        let mut buf = vec![0u8; cs as usize];
        self.read(gc * cs, &mut [IoSliceMut::new(&mut buf)])?;
        let h = (!is_zero(&buf)).then(|| hash_cluster(&buf));
        let mut m = self.settle_cluster(self.lock(), gc, &buf, h.as_ref(), true)?;
        let wake = guard.release(&mut m);
        drop(m);
        if wake {
            self.cond.notify_all();
        }
        Ok(())
    }

    /// Start the background worker thread (it sleeps while there is nothing to do).
    pub fn start_dedup_worker(self: &Arc<Self>) -> Option<DedupWorker> {
        if !self.dedup_available() {
            return None;
        }
        self.worker_stop.store(false, Ordering::SeqCst);
        let q = Arc::clone(self);
        let h = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("dedup-worker".into())
                .spawn(move || worker_loop(&q))
        })
        .ok()?;
        Some(DedupWorker {
            q: Arc::clone(self),
            thread: Some(h),
        })
    }
}

/// Run `f` with every signal blocked in this thread, then restore the mask. A thread spawned in
/// `f` inherits the full mask: the worker never handles signals (a daemon takes them through a
/// signalfd on its main thread, which only works if no other thread leaves them unblocked).
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigfillset initializes a set we own; pthread_sigmask only changes this thread's
    // signal mask, reading the set we pass and writing the old mask into `old`, which we own.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    let r = f();
    // SAFETY: restores the mask saved above; reads only `old`.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    r
}

/// The worker yields to the guest: it works while no guest write came for `IDLE`, and otherwise
/// takes one cluster per `TRICKLE`, so a guest that never stops writing still sees its pending
/// work shrink, at a cost too small to measure. (A lower scheduling class would do the same on
/// paper, but a thread that is descheduled while it holds the metadata lock stalls every queue.)
const IDLE: Duration = Duration::from_millis(20);
const TRICKLE: Duration = Duration::from_millis(50);

fn worker_loop(q: &Qcow2) {
    log::debug!("dedup worker started");
    let mut last_step = Instant::now();
    loop {
        {
            let mut m = q.lock();
            loop {
                if q.worker_stop.load(Ordering::SeqCst) || q.closed.load(Ordering::SeqCst) {
                    log::debug!("dedup worker stopped");
                    return;
                }
                if !q.worker_may_run(&m) {
                    m = q.work_cond.wait(m).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                let writes = q.guest_writes.load(Ordering::Relaxed);
                let (g, _) = q
                    .work_cond
                    .wait_timeout(m, IDLE)
                    .unwrap_or_else(|e| e.into_inner());
                m = g;
                let idle = q.guest_writes.load(Ordering::Relaxed) == writes;
                if idle || last_step.elapsed() >= TRICKLE {
                    break;
                }
            }
        }
        // While the guest is idle, work in runs (re-checking between clusters).
        let writes = q.guest_writes.load(Ordering::Relaxed);
        loop {
            last_step = Instant::now();
            match q.dedup_step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    log::error!("background dedup: {e}; pausing the worker");
                    q.dedup_paused.store(true, Ordering::SeqCst);
                    break;
                }
            }
            if q.guest_writes.load(Ordering::Relaxed) != writes {
                break;
            }
        }
    }
}

/// The running worker; stopped and joined on drop.
pub struct DedupWorker {
    q: Arc<Qcow2>,
    thread: Option<JoinHandle<()>>,
}

impl DedupWorker {
    /// Stop after the cluster in hand and wait for the thread.
    pub fn stop(&mut self) {
        self.q.worker_stop.store(true, Ordering::SeqCst);
        {
            let _m = self.q.lock();
            self.q.wake_worker();
        }
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Drop for DedupWorker {
    fn drop(&mut self) {
        self.stop();
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
