//! One virtqueue as the vhost-user transport keeps it: the ring addresses and indices
//! (virtio-queue's `Queue`), the eventfds the frontend handed over, whether the ring is
//! started and enabled, and its part of the inflight region.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::inflight_fd::InflightQueue;

/// The transport's state of one queue. Shared by the request handler (configuration) and the
/// queue's worker thread (requests), behind a mutex.
pub(crate) struct Vring {
    pub queue: Queue,
    pub kick: Option<EventFd>,
    pub call: Option<EventFd>,
    pub err: Option<EventFd>,
    /// SET_VRING_ENABLE's last word (or on from the start without protocol features).
    pub enabled: bool,
    /// The ring addresses were set since the last stop.
    pub addressed: bool,
    /// This queue's part of the inflight region, when the frontend gave one.
    pub inflight: Option<InflightQueue>,
    /// The order number the next request taken gets (kept in the inflight region).
    pub counter: u64,
    /// Requests a dead predecessor had taken and not completed, oldest first: run before
    /// anything new is taken.
    pub resubmit: Vec<u16>,
}

impl Vring {
    pub fn new(max_size: u16) -> Result<Self, virtio_queue::Error> {
        Ok(Vring {
            queue: Queue::new(max_size)?,
            kick: None,
            call: None,
            err: None,
            enabled: false,
            addressed: false,
            inflight: None,
            counter: 0,
            resubmit: Vec::new(),
        })
    }

    /// Started: the frontend gave the ring's addresses and its kick eventfd.
    pub fn started(&self) -> bool {
        self.queue.ready()
    }

    /// Requests are served only on a ring both started and enabled.
    pub fn active(&self) -> bool {
        self.started() && self.enabled
    }

    pub fn kick_fd(&self) -> Option<RawFd> {
        self.kick.as_ref().map(|k| k.as_raw_fd())
    }

    /// Tell the guest that the used ring moved (no-op without a call eventfd).
    pub fn signal(&self) -> io::Result<()> {
        match &self.call {
            Some(c) => c.write(1),
            None => Ok(()),
        }
    }

    /// Record that the request at `head` was taken from the available ring.
    pub fn taken(&mut self, head: u16) {
        if let Some(i) = &self.inflight {
            i.taken(head, self.counter);
        }
        self.counter = self.counter.wrapping_add(1);
    }

    /// Put a finished request in the used ring, recording it in the inflight region around
    /// the ring update.
    pub fn put_used<M: GuestMemory>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        if let Some(i) = &self.inflight {
            i.before_used(head);
        }
        self.queue.add_used(mem, head, len)?;
        if let Some(i) = &self.inflight {
            i.after_used(head, self.queue.next_used());
        }
        Ok(())
    }
}

/// An eventfd from a file the frontend sent.
pub(crate) fn eventfd_of(file: File) -> EventFd {
    // SAFETY: the file is owned and its descriptor is handed over whole to the EventFd, which
    // becomes its only owner (it closes it on drop).
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}
