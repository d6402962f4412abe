//! The vhost-user-blk backend: `&self` with interior mutability, one worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::aio::{AioMode, Pool};
use crate::virtio::{self, BlkConfig, DeviceCtx, QueueExec};

pub(crate) type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
pub(crate) type Vring = VringRwLock<GuestMem>;
type MemGuard = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// How long stopping a queue waits for its requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection's backend. A fresh one is built for every VMM connection; the device context
/// (block device, limits, writeback flag) is shared across connections.
pub struct BlkBackend {
    ctx: Arc<DeviceCtx>,
    mem: GuestMem,
    event_idx: AtomicBool,
    queue_size: usize,
    /// One executor per queue (its in-flight table, its ring).
    execs: Vec<Mutex<QueueExec<MemGuard>>>,
}

impl BlkBackend {
    pub(crate) fn new(
        ctx: Arc<DeviceCtx>,
        mem: GuestMem,
        queue_size: usize,
        pool: Arc<Pool>,
        aio: AioMode,
    ) -> io::Result<Self> {
        let queues = usize::from(ctx.limits.num_queues).max(1);
        let mut execs = Vec::with_capacity(queues);
        for q in 0..queues {
            let e = QueueExec::new(
                ctx.clone(),
                pool.clone(),
                q,
                queue_size,
                aio == AioMode::IoUring,
            )?;
            execs.push(Mutex::new(e));
        }
        Ok(BlkBackend {
            ctx,
            mem,
            event_idx: AtomicBool::new(false),
            queue_size,
            execs,
        })
    }

    fn exec(&self, queue: usize) -> Option<MutexGuard<'_, QueueExec<MemGuard>>> {
        self.execs
            .get(queue)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The completion eventfd of each queue, with the epoll data its worker thread must
    /// register it under (past the queue and exit events vhost-user-backend reserves).
    pub(crate) fn completion_events(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        let n = self.execs.len() as u64;
        (0..self.execs.len())
            .filter_map(|q| {
                self.exec(q)
                    .map(|e| (thread_of(q), e.event_fd(), n + 1 + q as u64))
            })
            .collect()
    }

    /// True when at least one queue runs its reads and writes on an io_uring.
    pub(crate) fn uses_io_uring(&self) -> bool {
        (0..self.execs.len()).any(|q| self.exec(q).is_some_and(|e| e.has_ring()))
    }

    /// Wait until queue `queue` (every queue when None) has nothing in flight; the worker
    /// threads complete what finishes meanwhile. Gives up after `timeout` (logged).
    pub(crate) fn drain(&self, queue: Option<usize>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let busy = |q: usize| self.exec(q).is_some_and(|e| e.in_flight() > 0);
        loop {
            let left: Vec<usize> = match queue {
                Some(q) => vec![q],
                None => (0..self.execs.len()).collect(),
            }
            .into_iter()
            .filter(|&q| busy(q))
            .collect();
            if left.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                warn!("queues {left:?}: requests still in flight after {timeout:?}");
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Put every finished request of `queue` in its used ring and signal the guest if it
    /// wants to know.
    fn complete_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let mut done = Vec::new();
        if let Some(mut e) = self.exec(queue) {
            e.reap(&mut done);
        }
        if done.is_empty() {
            return Ok(());
        }
        publish(&mut vring.get_mut(), queue, done, None)
    }

    /// Serve every available chain of one queue; with EVENT_IDX, loop until no new chain
    /// arrived while notifications were off. Signals the guest once per batch when needed.
    fn process_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        self.process_queue_from(queue, vring, self.mem.memory())
    }

    /// `process_queue` starting from the memory map `mem`, which may be out of date by the time
    /// a chain is taken: a driver can add a memory region and at once post a request into it.
    fn process_queue_from(
        &self,
        queue: usize,
        vring: &Vring,
        mut mem: GuestMemoryLoadGuard<GuestMemoryMmap<()>>,
    ) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let Some(mut exec) = self.exec(queue) else {
            return Err(io::Error::other(format!("no executor for queue {queue}")));
        };
        let mut state = vring.get_mut();
        // The first error ends the pass, but what was completed before it still reaches the
        // guest below: a guest left waiting for a completion it will never see is a hung disk.
        let mut failed: Option<String> = None;
        'pass: loop {
            if event_idx {
                if let Err(e) = state.disable_notification() {
                    failed = Some(format!("cannot disable notifications: {e}"));
                    break;
                }
            }
            let mut popped = 0usize;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                // Taking the chain read the available index, so a map loaded now holds every
                // region the driver added (and had acknowledged) before posting this chain. If
                // the map changed since `mem` was loaded, take the chain again under the new one.
                let now = self.mem.memory();
                if !std::ptr::eq(&*now, &*mem) {
                    state.get_queue_mut().go_to_previous_position();
                    mem = now;
                    continue;
                }
                let head = chain.head_index();
                popped += 1;
                // Most requests finish later (`complete_queue`); some at once.
                let Some(used) = exec.submit(mem.clone(), head, chain) else {
                    continue;
                };
                if let Err(e) = state.add_used(head, used) {
                    failed = Some(format!("cannot complete request {head}: {e}"));
                    break 'pass;
                }
            }
            if !event_idx {
                break;
            }
            match state.enable_notification() {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    failed = Some(format!("cannot enable notifications: {e}"));
                    break;
                }
            }
            // More is announced but nothing could be taken: a guest that set the available
            // index more than a queue ahead. Looping would spin forever holding the vring.
            if popped == 0 {
                if let Err(e) = state.get_queue_mut().iter(mem.clone()) {
                    failed = Some(format!("broken available ring ({e}); no longer served"));
                    break;
                }
            }
        }
        exec.flush_submissions();
        // What already finished goes out with this pass's notification.
        let mut done = Vec::new();
        exec.reap(&mut done);
        drop(exec);
        publish(&mut state, queue, done, failed)
    }
}

/// Put the finished requests `done` in the used ring and signal the guest if it wants to
/// know (when unsure, signal: a spurious interrupt is harmless). `failed`: what already went
/// wrong in this pass; the first failure is the error returned.
fn publish(
    state: &mut vhost_user_backend::VringState<GuestMem>,
    queue: usize,
    done: Vec<(u16, u32)>,
    mut failed: Option<String>,
) -> io::Result<()> {
    for (head, used) in done {
        if let Err(e) = state.add_used(head, used) {
            failed.get_or_insert(format!("cannot complete request {head}: {e}"));
        }
    }
    if state.needs_notification().unwrap_or(true) {
        if let Err(e) = state.signal_used_queue() {
            failed.get_or_insert(format!("cannot signal the guest: {e}"));
        }
    }
    match failed {
        Some(what) => Err(io::Error::other(format!("queue {queue}: {what}"))),
        None => Ok(()),
    }
}

/// The queues worker thread `thread` serves, one bit each: thread i serves queue i alone.
fn thread_queues(thread: usize) -> u64 {
    u32::try_from(thread)
        .ok()
        .and_then(|t| 1u64.checked_shl(t))
        .unwrap_or(0)
}

/// The worker thread that serves queue `queue`.
fn thread_of(queue: usize) -> usize {
    queue
}

/// The device queue behind event `device_event` of a worker thread serving the queues in `mask`:
/// its `device_event`-th queue (vhost-user-backend numbers a thread's vrings from 0, whichever
/// queues they are).
fn queue_of(mask: u64, device_event: u16) -> Option<usize> {
    (0..64usize)
        .filter(|q| mask >> q & 1 == 1)
        .nth(usize::from(device_event))
}

/// The virtio feature bits this device offers.
pub fn device_features(read_only: bool) -> u64 {
    use virtio::*;
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut f = bits.iter().fold(0u64, |acc, b| acc | (1u64 << b));
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.ctx.limits.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        device_features(self.ctx.dev.read_only())
    }

    fn acked_features(&self, features: u64) {
        debug!("driver acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg: BlkConfig = self.ctx.limits.clone();
        cfg.writeback = u8::from(self.ctx.writeback.load(Ordering::Relaxed));
        cfg.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (CONFIG_WCE).
        match (offset, buf) {
            (BlkConfig::WRITEBACK_OFFSET, [wce]) => {
                debug!("driver set writeback cache to {wce}");
                self.ctx.writeback.store(*wce != 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read-only config field",
            )),
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend takes the ring back when this returns: finish what is in flight first
        // (the worker thread keeps completing it), or its completions would land in a ring
        // that is no longer ours.
        if let Ok(q) = usize::try_from(queue_index) {
            self.drain(Some(q), DRAIN_TIMEOUT);
        }
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMem) -> io::Result<()> {
        // `self.mem` is the daemon's GuestMemoryAtomic itself: the update is already visible.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(thread_queues).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("thread {thread_id}: unexpected event set {evset:?}");
            return Ok(());
        }
        let mask = thread_queues(thread_id);
        let nq = self.execs.len();
        if usize::from(device_event) > nq {
            // A queue's completion event.
            let queue = usize::from(device_event) - nq - 1;
            let vring = (0..64usize)
                .filter(|q| mask >> q & 1 == 1)
                .position(|q| q == queue)
                .and_then(|i| vrings.get(i));
            if let Some(vring) = vring {
                if let Err(e) = self.complete_queue(queue, vring) {
                    warn!("{e}");
                }
            }
            return Ok(());
        }
        // `device_event` counts the thread's own vrings (`vrings`), not the device's queues.
        let (Some(vring), Some(queue)) = (
            vrings.get(usize::from(device_event)),
            queue_of(thread_queues(thread_id), device_event),
        ) else {
            warn!("thread {thread_id}: event for unknown vring {device_event}");
            return Ok(());
        };
        // An error here is a broken ring (bad addresses from the driver). Returning it would end
        // the worker thread for good; log it and keep the thread for the next kick instead.
        if let Err(e) = self.process_queue(queue, vring) {
            warn!("queue {queue}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A 16-entry vring over `q`'s rings, ready to serve.
    fn ready_vring(
        mem: &GuestMem,
        q: &MockSplitQueue<GuestMemoryMmap<()>>,
        event_idx: bool,
    ) -> Vring {
        let vring = Vring::new(mem.clone(), 16).unwrap();
        vring
            .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        vring.set_queue_size(16);
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring
    }

    fn test_backend(ctx: DeviceCtx, mem: GuestMem) -> BlkBackend {
        let pool = Pool::new(2, "test").unwrap();
        BlkBackend::new(Arc::new(ctx), mem, 16, pool, AioMode::IoUring).unwrap()
    }

    /// Complete queue 0 until nothing is in flight (a worker thread does this on events).
    fn wait_idle(b: &BlkBackend, vring: &Vring) {
        for _ in 0..10_000 {
            b.complete_queue(0, vring).unwrap();
            if b.exec(0).unwrap().in_flight() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("requests still in flight");
    }

    /// Each worker thread serves its own queue; the event number counts the thread's vrings.
    #[test]
    fn events_map_to_the_threads_queues() {
        for t in 0..3 {
            assert_eq!(queue_of(thread_queues(t), 0), Some(t));
            assert_eq!(queue_of(thread_queues(t), 1), None);
        }
        assert_eq!(thread_queues(64), 0);
        assert_eq!(queue_of(thread_queues(64), 0), None);
        assert_eq!(queue_of(0b1010, 1), Some(3));
    }

    /// A guest that moves the available index more than a queue ahead must not make the worker
    /// spin (it would hold the vring forever): the pass ends with an error.
    #[test]
    fn available_index_past_the_queue_ends_the_pass() {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap.clone());
        let q = MockSplitQueue::new(&mmap, 16);
        let vring = ready_vring(&mem, &q, true);
        // avail.idx lives 2 bytes into the available ring.
        mmap.write_obj(40u16, GuestAddress(q.avail_addr().0 + 2))
            .unwrap();
        let disk = Arc::new(MemDisk::new(1 << 20, false));
        let ctx = DeviceCtx::new(disk, BlkConfig::new(1 << 20, 1, 16, 4096, true), "s");
        let b = test_backend(ctx, mem);
        b.event_idx.store(true, Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _ = tx.send(b.process_queue(0, &vring).is_err());
        });
        let r = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(r, Ok(true), "the pass must end with an error, not spin");
        t.join().unwrap();
    }

    /// A driver adds a memory region (acknowledged) and posts a request into it while the worker
    /// still holds the map it loaded before the add: the request must be served, not failed as
    /// pointing outside guest memory. (libblkio maps its buffers right after starting the queues.)
    #[test]
    fn a_chain_posted_after_a_region_add_is_read_under_the_new_map() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use vm_memory::GuestRegionMmap;
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let (hdr, status, data) = (0x8_0000u64, 0x8_1000u64, 0x10_0000u64);
        let first = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(first);
        let stale = atomic.memory();
        let region = GuestRegionMmap::from_range(GuestAddress(data), 0x1000, None).unwrap();
        let full = stale.insert_region(Arc::new(region)).unwrap();
        atomic.lock().unwrap().replace(full.clone());

        let q = MockSplitQueue::new(&full, 16);
        let vring = ready_vring(&atomic, &q, false);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&crate::virtio::VIRTIO_BLK_T_OUT.to_le_bytes());
        full.write_slice(&h, GuestAddress(hdr)).unwrap();
        full.write_slice(&[0xa5; 512], GuestAddress(data)).unwrap();
        full.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let descs: Vec<RawDescriptor> = [
            (hdr, 16, NEXT, 1),
            (data, 512, NEXT, 2),
            (status, 1, WRITE, 0),
        ]
        .iter()
        .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
        .collect();
        q.add_desc_chains(&descs, 0).unwrap();

        let disk = Arc::new(MemDisk::new(1 << 20, false));
        let ctx = DeviceCtx::new(
            disk.clone(),
            BlkConfig::new(1 << 20, 1, 16, 4096, true),
            "s",
        );
        let b = test_backend(ctx, atomic);
        b.process_queue_from(0, &vring, stale).unwrap();
        wait_idle(&b, &vring);
        let st: u8 = full.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(st, crate::virtio::VIRTIO_BLK_S_OK);
        assert_eq!(&disk.contents()[..512], &[0xa5; 512][..]);
    }
}
