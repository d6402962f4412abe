//! Registrations a request makes under the metadata lock and must undo whatever ends it: a data
//! I/O in flight (frees and dedup barriers wait for it) and the guest clusters a write is
//! allocating (other writers of them wait). Each is a guard: the normal path ends it under a
//! lock it takes anyway; an early return or a panic that skips that ends it on drop, so no
//! registration can outlive its request and leave other queues waiting for ever.
//!
//! A guard's drop takes the lock: never let one drop while this thread holds it. (On a panic
//! under the lock, the lock guard is declared later and so dropped first.)

use super::image::Qcow2;
use super::meta::Meta;

/// A data I/O registered with `Meta::begin_io`.
pub(crate) struct IoTicket<'a> {
    q: &'a Qcow2,
    seq: u64,
    armed: bool,
}

impl IoTicket<'_> {
    /// End the I/O under the lock the caller holds. Returns whether threads wait for older I/O:
    /// the caller must then notify the engine's condvar (after the lock).
    #[must_use = "when true, notify the engine's condvar: a barrier waiter may wait for this I/O"]
    pub(crate) fn end(mut self, m: &mut Meta) -> bool {
        self.armed = false;
        m.end_io(self.seq)
    }
}

impl Drop for IoTicket<'_> {
    fn drop(&mut self) {
        if self.armed {
            let wake = self.q.lock().end_io(self.seq);
            if wake {
                self.q.cond.notify_all();
            }
        }
    }
}

/// Guest clusters a write registered in `Meta::inflight`, with the new host clusters it took
/// for them (refcount 1, not linked yet). Dropped armed, it gives the clusters back and
/// removes the registrations; once `linking` started, the new clusters are left alone (they may
/// be linked already: an unlinked one only leaks).
pub(crate) struct AllocGuard<'a> {
    q: &'a Qcow2,
    /// (guest cluster, new host offset or None when the cluster is reused in place).
    clusters: Vec<(u64, Option<u64>)>,
    armed: bool,
    linking: bool,
}

impl<'a> AllocGuard<'a> {
    pub(crate) fn new(q: &'a Qcow2, clusters: Vec<(u64, Option<u64>)>) -> Self {
        AllocGuard {
            q,
            clusters,
            armed: true,
            linking: false,
        }
    }

    /// The link step begins: from now on the new clusters belong to the caller.
    pub(crate) fn linking(&mut self) {
        self.linking = true;
    }

    /// The write is linked (or undone) and its clusters unregistered by the caller.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AllocGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut m = self.q.lock();
        let s = self.q.storage.as_ref();
        for &(gc, host) in &self.clusters {
            if let (Some(host), false) = (host, self.linking) {
                m.unalloc_data(s, host, 1);
            }
            let _ = m.end_alloc(gc);
        }
        let wake = m.cluster_waiters();
        drop(m);
        if wake {
            self.q.cond.notify_all();
        }
    }
}

impl Qcow2 {
    /// Register a data I/O planned now (under the lock `m`); see `IoTicket`.
    pub(crate) fn begin_io<'a>(&'a self, m: &mut Meta) -> IoTicket<'a> {
        IoTicket {
            q: self,
            seq: m.begin_io(),
            armed: true,
        }
    }
}
