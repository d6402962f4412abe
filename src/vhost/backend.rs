//! The vhost-user-blk device behind the transport: its queues' state (`Vring`) and request
//! executors, serving a queue when it is kicked and completing what finished.
//!
//! Lock order: a queue's executor before its vring; the request handler takes a vring alone.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::dirty_log::{DirtyLog, LogBitmap};
use super::vring::Vring;
use crate::aio::{AioMode, Pool};
use crate::virtio::{self, chain_at, BlkConfig, DeviceCtx, QueueExec};

/// The daemon's view of guest memory: every region carries the dirty-log bitmap.
pub(crate) type GuestMap = GuestMemoryMmap<LogBitmap>;
pub(crate) type GuestMem = GuestMemoryAtomic<GuestMap>;
type MemGuard = GuestMemoryLoadGuard<GuestMap>;

/// How long stopping a queue waits for its requests in flight.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection's device. A fresh one is built for every VMM connection; the device context
/// (block device, limits, writeback flag) is shared across connections.
pub struct BlkBackend {
    pub(crate) ctx: Arc<DeviceCtx>,
    pub(crate) mem: GuestMem,
    pub(crate) event_idx: AtomicBool,
    pub(crate) queue_size: u16,
    /// Dirty-page logging for migration (off until the driver sets LOG_ALL).
    pub(crate) log: Arc<DirtyLog>,
    vrings: Vec<Mutex<Vring>>,
    /// One executor per queue (its in-flight table, its ring), made when the queue first
    /// starts: a frontend uses only some of the queues offered.
    execs: Vec<Mutex<Option<QueueExec<MemGuard>>>>,
    pool: Arc<Pool>,
    aio: AioMode,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlkBackend {
    pub(crate) fn new(
        ctx: Arc<DeviceCtx>,
        mem: GuestMem,
        queue_size: u16,
        pool: Arc<Pool>,
        aio: AioMode,
    ) -> io::Result<Self> {
        let queues = usize::from(ctx.limits.num_queues).max(1);
        let mut execs = Vec::with_capacity(queues);
        let mut vrings = Vec::with_capacity(queues);
        for _ in 0..queues {
            execs.push(Mutex::new(None));
            vrings.push(Mutex::new(
                Vring::new(queue_size).map_err(io::Error::other)?,
            ));
        }
        Ok(BlkBackend {
            ctx,
            mem,
            event_idx: AtomicBool::new(false),
            queue_size,
            log: DirtyLog::new(),
            vrings,
            execs,
            pool,
            aio,
        })
    }

    pub(crate) fn num_queues(&self) -> usize {
        self.vrings.len()
    }

    pub(crate) fn vring(&self, queue: usize) -> Option<MutexGuard<'_, Vring>> {
        self.vrings.get(queue).map(lock)
    }

    /// Queue `queue`'s executor slot (empty until the queue first starts).
    fn exec(&self, queue: usize) -> Option<MutexGuard<'_, Option<QueueExec<MemGuard>>>> {
        self.execs.get(queue).map(lock)
    }

    /// Make queue `queue`'s executor if it has none yet; returns its completion eventfd.
    pub(crate) fn ensure_exec(&self, queue: usize) -> io::Result<std::os::fd::RawFd> {
        let slot = self
            .execs
            .get(queue)
            .ok_or_else(|| io::Error::other(format!("no queue {queue}")))?;
        let mut g = lock(slot);
        if let Some(e) = g.as_ref() {
            return Ok(e.event_fd());
        }
        let e = QueueExec::new(
            self.ctx.clone(),
            self.pool.clone(),
            queue,
            usize::from(self.queue_size),
            self.aio == AioMode::IoUring,
        )?;
        log::debug!(
            "queue {queue}: data I/O on {}, blocking requests on the pool",
            if e.has_ring() {
                "its io_uring"
            } else {
                "the pool"
            }
        );
        let fd = e.event_fd();
        *g = Some(e);
        Ok(fd)
    }

    /// The completion eventfd of queue `queue`, once it has started.
    pub(crate) fn completion_fd(&self, queue: usize) -> Option<std::os::fd::RawFd> {
        self.exec(queue)?.as_ref().map(|e| e.event_fd())
    }

    /// Requests in flight on queue `queue`; None when it never started on this connection.
    pub(crate) fn in_flight(&self, queue: usize) -> Option<usize> {
        self.exec(queue)?.as_ref().map(|e| e.in_flight())
    }

    /// Wait until queue `queue` (every queue when None) has nothing in flight; the worker
    /// threads complete what finishes meanwhile. Gives up after `timeout` (logged).
    pub(crate) fn drain(&self, queue: Option<usize>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let busy = |q: usize| {
            self.exec(q)
                .is_some_and(|e| e.as_ref().is_some_and(|e| e.in_flight() > 0))
        };
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
    pub(crate) fn complete_queue(&self, queue: usize) -> io::Result<()> {
        let mut done = Vec::new();
        if let Some(e) = self.exec(queue).as_mut().and_then(|g| g.as_mut()) {
            e.reap(&mut done);
        }
        if done.is_empty() {
            return Ok(());
        }
        let Some(mut vring) = self.vring(queue) else {
            return Ok(());
        };
        let mem = self.mem.memory();
        publish(&mut vring, &mem, queue, done, None)
    }

    /// Serve every available chain of one queue; with EVENT_IDX, loop until no new chain
    /// arrived while notifications were off. Signals the guest once per batch when needed.
    pub(crate) fn process_queue(&self, queue: usize) -> io::Result<()> {
        self.process_queue_from(queue, self.mem.memory())
    }

    /// `process_queue` starting from the memory map `mem`, which may be out of date by the time
    /// a chain is taken: a driver can add a memory region and at once post a request into it.
    fn process_queue_from(&self, queue: usize, mut mem: MemGuard) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let Some(mut slot) = self.exec(queue) else {
            return Err(io::Error::other(format!("no executor for queue {queue}")));
        };
        let Some(exec) = slot.as_mut() else {
            // Not started yet.
            return Ok(());
        };
        let Some(mut vring) = self.vring(queue) else {
            return Err(io::Error::other(format!("no vring for queue {queue}")));
        };
        // Take the kick (non-blocking: the handler sets O_NONBLOCK on it); whatever is posted
        // after this read kicks again.
        if let Some(k) = &vring.kick {
            let _ = k.read();
        }
        if !vring.active() {
            return Ok(());
        }
        // The first error ends the pass, but what was completed before it still reaches the
        // guest below: a guest left waiting for a completion it will never see is a hung disk.
        let mut failed: Option<String> = None;
        resubmit(&mut vring, exec, &mem, queue, &mut failed);
        'pass: loop {
            if event_idx {
                if let Err(e) = vring.queue.disable_notification(&*mem) {
                    failed = Some(format!("cannot disable notifications: {e}"));
                    break;
                }
            }
            let mut popped = 0usize;
            while let Some(chain) = vring.queue.pop_descriptor_chain(mem.clone()) {
                // Taking the chain read the available index, so a map loaded now holds every
                // region the driver added (and had acknowledged) before posting this chain. If
                // the map changed since `mem` was loaded, take the chain again under the new one.
                let now = self.mem.memory();
                if !std::ptr::eq(&*now, &*mem) {
                    vring.queue.go_to_previous_position();
                    mem = now;
                    continue;
                }
                let head = chain.head_index();
                popped += 1;
                vring.taken(head);
                // Most requests finish later (`complete_queue`); some at once.
                let Some(used) = exec.submit(mem.clone(), head, chain) else {
                    continue;
                };
                if let Err(e) = vring.put_used(&*mem, head, used) {
                    failed = Some(format!("cannot complete request {head}: {e}"));
                    break 'pass;
                }
            }
            if !event_idx {
                break;
            }
            match vring.queue.enable_notification(&*mem) {
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
                if let Err(e) = vring.queue.iter(mem.clone()) {
                    failed = Some(format!("broken available ring ({e}); no longer served"));
                    break;
                }
            }
        }
        exec.flush_submissions();
        // What already finished goes out with this pass's notification.
        let mut done = Vec::new();
        exec.reap(&mut done);
        drop(slot);
        publish(&mut vring, &mem, queue, done, failed)
    }

    /// Queue `queue` starts (addresses and kick fd known): take the used index from the ring,
    /// and with an inflight region, find what a predecessor left in flight (run again before
    /// anything new) and continue the available ring after everything it had taken. Then the
    /// guest is signalled once: a predecessor may have died after moving the used index and
    /// before signalling, and a lost interrupt hangs the guest.
    pub(crate) fn start_queue(&self, queue: usize) -> io::Result<()> {
        self.ensure_exec(queue)?;
        if let Some(s) = self.ctx.stats.get(queue) {
            s.mark_started();
        }
        let mem = self.mem.memory();
        let Some(mut vring) = self.vring(queue) else {
            return Ok(());
        };
        // A used ring outside guest memory leaves the ring stopped, not served from garbage.
        let used = vring
            .queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| io::Error::other(format!("queue {queue}: unreadable used ring: {e}")))?;
        vring.queue.set_ready(true);
        vring.queue.set_next_used(used.0);
        if let Some(region) = vring.inflight.clone() {
            let rec = region.recover(used.0);
            let taken = u16::try_from(rec.heads.len()).unwrap_or(u16::MAX);
            vring.queue.set_next_avail(used.0.wrapping_add(taken));
            vring.counter = rec.next_counter;
            if !rec.heads.is_empty() {
                info!(
                    "queue {queue}: {} requests left in flight by the previous run are run again",
                    rec.heads.len()
                );
            }
            vring.resubmit = rec.heads;
        }
        vring.signal()
    }
}

/// Run again the requests a predecessor left in flight, oldest first (once the ring is active).
fn resubmit(
    vring: &mut Vring,
    exec: &mut QueueExec<MemGuard>,
    mem: &MemGuard,
    queue: usize,
    failed: &mut Option<String>,
) {
    let heads = std::mem::take(&mut vring.resubmit);
    let table = GuestAddress(vring.queue.desc_table());
    let size = vring.queue.size();
    for head in heads {
        let used = match chain_at(&**mem, table, size, head) {
            Ok(descs) => exec.submit(mem.clone(), head, descs),
            Err(e) => {
                // Nothing can be answered in the request; the guest still gets its head back.
                warn!("queue {queue}: request {head} left in flight is unreadable: {e}");
                Some(0)
            }
        };
        if let Some(used) = used {
            if let Err(e) = vring.put_used(&**mem, head, used) {
                failed.get_or_insert(format!("cannot complete request {head}: {e}"));
            }
        }
    }
}

/// Put the finished requests `done` in the used ring and signal the guest if it wants to
/// know (when unsure, signal: a spurious interrupt is harmless). `failed`: what already went
/// wrong in this pass; the first failure is the error returned.
fn publish(
    vring: &mut Vring,
    mem: &GuestMap,
    queue: usize,
    done: Vec<(u16, u32)>,
    mut failed: Option<String>,
) -> io::Result<()> {
    for (head, used) in done {
        if let Err(e) = vring.put_used(mem, head, used) {
            failed.get_or_insert(format!("cannot complete request {head}: {e}"));
        }
    }
    if vring.queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = vring.signal() {
            failed.get_or_insert(format!("cannot signal the guest: {e}"));
        }
    }
    match failed {
        Some(what) => Err(io::Error::other(format!("queue {queue}: {what}"))),
        None => Ok(()),
    }
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
    f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VhostUserVirtioFeatures::LOG_ALL.bits()
}

impl BlkBackend {
    /// The config space bytes `offset..offset + size`.
    pub(crate) fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg: BlkConfig = self.ctx.limits.clone();
        // The size now: it grows with `block_resize`.
        cfg.capacity = self.ctx.dev.capacity() / crate::virtio::SECTOR_SIZE;
        cfg.writeback = u8::from(self.ctx.writeback.load(Ordering::Relaxed));
        cfg.read(offset, size)
    }

    /// A driver's config write: only the writeback byte is writable (CONFIG_WCE).
    pub(crate) fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match (offset, buf) {
            (BlkConfig::WRITEBACK_OFFSET, [wce]) => {
                log::debug!("driver set writeback cache to {wce}");
                self.ctx.writeback.store(*wce != 0, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read-only config field",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;
    use crate::vhost::dirty_log::LogBitmap;
    use crate::vhost::inflight_fd::InflightRegion;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn test_backend(disk: Arc<MemDisk>, mem: GuestMem) -> BlkBackend {
        let ctx = DeviceCtx::new(disk, BlkConfig::new(1 << 20, 1, 16, 4096, true), "s");
        let pool = Pool::new(2, "test").unwrap();
        BlkBackend::new(Arc::new(ctx), mem, 16, pool, AioMode::IoUring).unwrap()
    }

    /// Point queue 0 at `q`'s rings and enable it (not started: see `start_queue`).
    fn configure(b: &BlkBackend, q: &MockSplitQueue<GuestMap>, event_idx: bool) {
        let mut v = b.vring(0).unwrap();
        v.queue
            .try_set_desc_table_address(q.desc_table_addr())
            .unwrap();
        v.queue.try_set_avail_ring_address(q.avail_addr()).unwrap();
        v.queue.try_set_used_ring_address(q.used_addr()).unwrap();
        v.queue.set_size(16);
        v.queue.set_event_idx(event_idx);
        v.enabled = true;
        v.addressed = true;
        b.event_idx.store(event_idx, Ordering::Release);
    }

    /// Complete queue 0 until nothing is in flight (a worker thread does this on events).
    fn wait_idle(b: &BlkBackend) {
        for _ in 0..10_000 {
            b.complete_queue(0).unwrap();
            if b.exec(0).unwrap().as_ref().unwrap().in_flight() == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("requests still in flight");
    }

    /// A write of `fill` bytes to sector `sector`: header at `base`, data at `base + 0x100`,
    /// status at `base + 0x1100`; descriptors from `first`.
    fn write_chain(
        m: &GuestMap,
        base: u64,
        sector: u64,
        fill: u8,
        first: u16,
    ) -> Vec<RawDescriptor> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&crate::virtio::VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(base)).unwrap();
        m.write_slice(&[fill; 512], GuestAddress(base + 0x100))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(base + 0x1100)).unwrap();
        [
            (base, 16, NEXT, first + 1),
            (base + 0x100, 512, NEXT, first + 2),
            (base + 0x1100, 1, WRITE, 0),
        ]
        .iter()
        .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
        .collect()
    }

    /// A guest that moves the available index more than a queue ahead must not make the worker
    /// spin (it would hold the vring forever): the pass ends with an error.
    #[test]
    fn available_index_past_the_queue_ends_the_pass() {
        let mmap = GuestMap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap.clone());
        let q = MockSplitQueue::new(&mmap, 16);
        // avail.idx lives 2 bytes into the available ring.
        mmap.write_obj(40u16, GuestAddress(q.avail_addr().0 + 2))
            .unwrap();
        let b = test_backend(Arc::new(MemDisk::new(1 << 20, false)), mem);
        configure(&b, &q, true);
        b.start_queue(0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _ = tx.send(b.process_queue(0).is_err());
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
        use vm_memory::GuestRegionMmap;
        let (hdr, status, data) = (0x8_0000u64, 0x8_1000u64, 0x10_0000u64);
        let first = GuestMap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(first);
        let stale = atomic.memory();
        let region = GuestRegionMmap::from_range(GuestAddress(data), 0x1000, None).unwrap();
        let full = stale.insert_region(Arc::new(region)).unwrap();
        atomic.lock().unwrap().replace(full.clone());

        let q = MockSplitQueue::new(&full, 16);
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
        let b = test_backend(disk.clone(), atomic);
        configure(&b, &q, false);
        b.start_queue(0).unwrap();
        b.process_queue_from(0, stale).unwrap();
        wait_idle(&b);
        let st: u8 = full.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(st, crate::virtio::VIRTIO_BLK_S_OK);
        assert_eq!(&disk.contents()[..512], &[0xa5; 512][..]);
    }

    /// A backend that starts on an inflight region where its predecessor had taken two
    /// requests and completed neither runs both (before anything new), and continues the
    /// available ring after them instead of taking them again.
    #[test]
    fn requests_left_in_flight_are_run_again_and_not_taken_twice() {
        let mmap = GuestMap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap.clone());
        let q = MockSplitQueue::new(&mmap, 16);
        let mut descs = write_chain(&mmap, 0x2_0000, 0, 0x11, 0);
        descs.extend(write_chain(&mmap, 0x4_0000, 1, 0x22, 3));
        q.add_desc_chains(&descs, 0).unwrap();
        let (region, _file) = InflightRegion::create(1, 16).unwrap();
        let region = Arc::new(region);
        // The predecessor took both (heads 0 and 3), then died.
        let part = region.queue(0).unwrap();
        part.taken(0, 7);
        part.taken(3, 8);

        let disk = Arc::new(MemDisk::new(1 << 20, false));
        let b = test_backend(disk.clone(), mem);
        configure(&b, &q, false);
        b.vring(0).unwrap().inflight = region.queue(0);
        b.start_queue(0).unwrap();
        assert_eq!(b.vring(0).unwrap().queue.next_avail(), 2);
        b.process_queue(0).unwrap();
        wait_idle(&b);
        for status in [0x2_1100u64, 0x4_1100] {
            let st: u8 = mmap.read_obj(GuestAddress(status)).unwrap();
            assert_eq!(st, crate::virtio::VIRTIO_BLK_S_OK);
        }
        assert_eq!(&disk.contents()[..512], &[0x11; 512][..]);
        assert_eq!(&disk.contents()[512..1024], &[0x22; 512][..]);
        let v = b.vring(0).unwrap();
        assert_eq!(v.queue.next_used(), 2);
        assert_eq!(v.counter, 9);
        drop(v);
        // Nothing is left in flight in the region either.
        assert!(part.recover(2).heads.is_empty());
    }

    /// Every ring start signals the guest, even with nothing new to publish: a predecessor may
    /// have moved the used index past `used_event` and died before signalling.
    #[test]
    fn a_ring_start_signals_the_guest() {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let mmap = GuestMap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap.clone());
        let q = MockSplitQueue::new(&mmap, 16);
        let b = test_backend(Arc::new(MemDisk::new(1 << 20, false)), mem);
        configure(&b, &q, true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        b.vring(0).unwrap().call = Some(call.try_clone().unwrap());
        assert!(call.read().is_err(), "no signal before the start");
        b.start_queue(0).unwrap();
        assert_eq!(call.read().unwrap(), 1);
    }

    /// A read request, with dirty logging on, marks the pages the device wrote: the data
    /// buffers (filled by the kernel, on the pool or on the io_uring), the status byte and the
    /// used ring.
    #[test]
    fn a_read_marks_data_status_and_used_ring_in_the_dirty_log() {
        use crate::block::BlockDevice;
        use crate::raw::RawDisk;
        use std::os::unix::fs::FileExt;
        use vm_memory::mmap::MmapRegion;
        use vm_memory::GuestRegionMmap;
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let raw: Arc<dyn BlockDevice> = Arc::new(RawDisk::open(file.path(), false).unwrap());
        let disks: [Arc<dyn BlockDevice>; 2] = [Arc::new(MemDisk::new(1 << 20, false)), raw];
        for disk in disks {
            let ctx = DeviceCtx::new(disk, BlkConfig::new(1 << 20, 1, 16, 4096, true), "s");
            let pool = Pool::new(2, "test").unwrap();
            let b = BlkBackend::new(
                Arc::new(ctx),
                GuestMemoryAtomic::new(GuestMap::new()),
                16,
                pool,
                AioMode::IoUring,
            )
            .unwrap();
            let region = MmapRegion::<LogBitmap>::new(0x10_0000).unwrap();
            region.bitmap().attach(0, &b.log);
            let region = Arc::new(GuestRegionMmap::new(region, GuestAddress(0)).unwrap());
            let mmap = GuestMap::from_arc_regions(vec![region]).unwrap();
            b.mem.lock().unwrap().replace(mmap.clone());
            let log = tempfile::tempfile().unwrap();
            log.set_len(32).unwrap();
            b.log.set_base(log.try_clone().unwrap(), 0, 32).unwrap();

            let q = MockSplitQueue::new(&mmap, 16);
            let (hdr, data, status) = (0x3_0000u64, 0x4_0000u64, 0x5_0000u64);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&crate::virtio::VIRTIO_BLK_T_IN.to_le_bytes());
            mmap.write_slice(&h, GuestAddress(hdr)).unwrap();
            let descs: Vec<RawDescriptor> = [
                (hdr, 16, NEXT, 1),
                (data, 8192, NEXT | WRITE, 2),
                (status, 1, WRITE, 0),
            ]
            .iter()
            .map(|&(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(a, l, f, n)))
            .collect();
            q.add_desc_chains(&descs, 0).unwrap();
            // From here on only the device writes guest memory.
            b.log.set_on(true);
            configure(&b, &q, false);
            b.start_queue(0).unwrap();
            b.process_queue(0).unwrap();
            wait_idle(&b);
            let st: u8 = mmap.read_obj(GuestAddress(status)).unwrap();
            assert_eq!(st, crate::virtio::VIRTIO_BLK_S_OK);
            let mut bits = [0u8; 32];
            log.read_exact_at(&mut bits, 0).unwrap();
            let dirty = |page: u64| bits[(page / 8) as usize] & (1 << (page % 8)) != 0;
            assert!(dirty(0x40) && dirty(0x41), "data pages: {bits:x?}");
            assert!(dirty(0x50), "status page: {bits:x?}");
            assert!(dirty(q.used_addr().0 / 4096), "used ring page: {bits:x?}");
            assert!(
                !dirty(0x42) && !dirty(0x30),
                "only written pages: {bits:x?}"
            );
        }
    }
}
