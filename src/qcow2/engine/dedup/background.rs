//! Background deduplication: in background mode guest writes complete as plain writes and their
//! guest clusters are recorded as pending (a bit in RAM, the `PENDING` record in the index area, so
//! a clean restart loses no work; after a crash the rebuild marks every duplicate it finds as
//! pending). A worker thread takes one pending cluster at a time: it holds that guest cluster
//! (a guest write to it waits for one cluster's work at most), reads and hashes it, and links it
//! to a proven identical cluster or indexes it where it is. Pause stops it before the next
//! cluster. The worker yields to the guest: it works while the guest does not write.

use super::{forget, ClusterGuard};
use crate::qcow2::engine::image::Qcow2;
use crate::qcow2::engine::state::State;
use crate::qcow2::error::Result;
use crate::qcow2::format::L2Entry;
use crate::qcow2::hashindex::{hash_cluster, is_zero};
use crate::signals::with_signals_blocked;
use std::io::IoSliceMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    /// True when the background worker is working now (or would be, with work): pending
    /// clusters, or the rebuild of the index.
    pub fn dedup_worker_running(&self) -> bool {
        let m = self.lock();
        m.dedup.as_ref().is_some_and(|d| d.worker_busy)
            || self.worker_may_run(&m)
            || self.rebuild_wanted(&m)
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
        if (gc + 1) * cs > self.size() {
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
        // The rebuild of the index first, at full speed: it holds the lock only for short
        // sections and reads the data without it, so the guest does not wait for it.
        while !q.worker_stop.load(Ordering::SeqCst) {
            match q.dedup_rebuild_step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    log::error!(
                        "dedup index rebuild: {e}; stopped for this session (clusters not \
                         hashed yet are not found as duplicates; the next open goes on)"
                    );
                    q.stop_rebuild();
                    break;
                }
            }
        }
        {
            let mut m = q.lock();
            loop {
                if q.worker_stop.load(Ordering::SeqCst) || q.closed.load(Ordering::SeqCst) {
                    log::debug!("dedup worker stopped");
                    return;
                }
                if q.rebuild_may_run(&m) {
                    break;
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
            if q.rebuild_may_run(&m) {
                continue;
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
