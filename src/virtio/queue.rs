//! One queue's request executor: many requests in flight, completed out of order.
//!
//! A request taken from the available ring enters the queue's in-flight table, then runs one
//! of two ways:
//! - **direct**: a read or an in-place write the device can plan (`BlockDevice::plan_direct`)
//!   goes to the queue's io_uring as one vectored read or write per host range, straight
//!   between the file and guest memory;
//! - **pool**: everything else (allocating writes, flushes, discards, a device without a
//!   direct path, `--aio threads`) runs on the device's blocking path on a pool thread.
//!
//! Both report on the queue's eventfd; `reap` collects what finished, in the order it finished,
//! for the transport to put in the used ring.

use std::ops::Deref;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestMemoryBackend, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::consts::VIRTIO_BLK_S_OK;
use super::exec::{
    complete, mark_written, parse_or_answer, run_request, rw_offset, status_of, DeviceCtx, Done,
    Parsed,
};
use super::inflight::InflightTable;
use super::request::{Request, RequestType, Segment};
use crate::aio::{Pool, Ring, RingOp};
use crate::block::{BlockError, DirectPlan, Direction};

/// A request that goes to the device (a read, an O_DIRECT write) is submitted at once while
/// fewer than this many of its queue's operations are in the ring; past that it waits for the
/// end of the event-loop turn, and the turn's requests go in one submission (one syscall, one
/// plug: the block layer notifies the device once for them). Measured on this project's
/// virtio disk, cold 4 KiB random reads at QD32 (`./run bench --cold`): everything batched to
/// the end of the turn lost IOPS (74K against 88-90K submitted one by one: the device idles
/// while a turn plans); batching only past 16 in flight kept the IOPS (0.99x-1.00x) and cut
/// the daemon's CPU per I/O by 4-9%; past 4 lost 16% IOPS at one queue, past 24 saved less
/// CPU.
pub(crate) const SUBMIT_AT_ONCE_BELOW: usize = 16;

/// One vectored file operation of a direct request.
struct Op {
    iov: Vec<libc::iovec>,
    offset: u64,
    len: u64,
}

// SAFETY: the iovecs point into guest memory that the request's memory guard (kept beside them
// in the same slot) keeps mapped; they are only handed to the kernel and read by the thread
// that owns the queue executor, whichever thread that is.
unsafe impl Send for Op {}

/// A direct request's state while its operations are in the ring.
struct DirectIo<G> {
    /// Keeps the guest memory the iovecs point into mapped.
    mem: G,
    dir: Direction,
    seq: u64,
    fd: RawFd,
    ops: Vec<Op>,
    pending: usize,
    failed: Option<std::io::Error>,
    /// A read's guest buffers, to mark in the dirty log once filled (empty for writes).
    segs: Vec<Segment>,
}

/// How a request in flight runs.
enum Exec<G> {
    /// On the pool: its job owns the request and reports `(head, used length)`.
    Pool,
    Direct(DirectIo<G>),
}

/// The executor of one queue. Owned by the queue's worker thread.
pub struct QueueExec<G> {
    queue: usize,
    ctx: Arc<DeviceCtx>,
    pool: Arc<Pool>,
    table: InflightTable<Exec<G>>,
    ring: Option<Ring>,
    event: Arc<EventFd>,
    tx: Sender<(u16, u32)>,
    rx: Receiver<(u16, u32)>,
    /// Finished requests not handed out yet.
    ready: Vec<(u16, u32)>,
}

const ZEROS: [u8; 4096] = [0; 4096];

impl<G> QueueExec<G>
where
    G: Deref + Clone + Send + 'static,
    G::Target: GuestMemoryBackend,
{
    /// An executor for queue `queue` of `size` descriptors. `uring`: try to set up an
    /// io_uring (falls back to the pool alone, with a warning, when the kernel refuses).
    pub fn new(
        ctx: Arc<DeviceCtx>,
        pool: Arc<Pool>,
        queue: usize,
        size: usize,
        uring: bool,
    ) -> std::io::Result<Self> {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let ring = if uring {
            let entries = u32::try_from(size.next_power_of_two()).unwrap_or(4096);
            match Ring::new(entries, std::os::fd::AsRawFd::as_raw_fd(&*event)) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(
                        "queue {queue}: no io_uring ({e}); every request runs on the thread pool"
                    );
                    None
                }
            }
        } else {
            None
        };
        let (tx, rx) = channel();
        Ok(QueueExec {
            queue,
            ctx,
            pool,
            table: InflightTable::new(size),
            ring,
            event,
            tx,
            rx,
            ready: Vec::new(),
        })
    }

    /// Operations queued in the ring and not yet handed to the kernel.
    pub fn unsubmitted(&self) -> usize {
        self.ring.as_ref().map_or(0, Ring::unsubmitted)
    }

    /// The eventfd that becomes readable when requests finish.
    pub fn event_fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.event)
    }

    /// True when this executor has an io_uring.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.table.len()
    }

    fn gauge(&self) {
        if let Some(s) = self.ctx.stats.get(self.queue) {
            s.set_in_flight(self.table.len() as u64);
        }
    }

    /// Take the chain with head `head`. Returns its used length when it finished at once
    /// (malformed, GET_ID, ...); otherwise `reap` reports it later.
    pub fn submit<I>(&mut self, mem: G, head: u16, descs: I) -> Option<u32>
    where
        I: IntoIterator<Item = Descriptor>,
    {
        let start = Instant::now();
        let req = match parse_or_answer(&self.ctx, self.queue, &*mem, descs, start) {
            Parsed::Answered(used) => return Some(used),
            Parsed::Request(r) => r,
        };
        if matches!(req.kind, RequestType::GetId | RequestType::Unsupported(_)) {
            return Some(run_request(&self.ctx, self.queue, &*mem, &req, start));
        }
        let direct = self.plan(&mem, &req);
        // A direct request's state is filled in by `start_direct`.
        if let Err(e) =
            self.table
                .insert(head, req.kind, req.data_len, req.status, start, Exec::Pool)
        {
            // Only a broken driver reuses a head in flight; answer without touching the first.
            warn!("queue {}: {e}", self.queue);
            if let Some((plan, _)) = direct {
                self.ctx.dev.end_direct(plan.seq, plan_dir(&req), false);
            }
            return Some(0);
        }
        match direct {
            Some((plan, ops)) => self.start_direct(head, mem, req, plan, ops),
            None => self.start_pool(head, mem, req, start),
        }
        self.gauge();
        None
    }

    /// Run a request on the pool.
    fn start_pool(&mut self, head: u16, mem: G, req: Request, start: Instant) {
        let (ctx, queue, tx, event) = (
            self.ctx.clone(),
            self.queue,
            self.tx.clone(),
            self.event.clone(),
        );
        let job = Box::new(move || {
            let used = run_request(&ctx, queue, &*mem, &req, start);
            let _ = tx.send((head, used));
            let _ = event.write(1);
        });
        if let Err(job) = self.pool.spawn(job) {
            // The pool is shutting down: run the request here.
            debug!(
                "queue {}: the pool is gone; request {head} runs inline",
                self.queue
            );
            job();
        }
    }

    /// Plan a read or in-place write for the ring: the device's plan and the operations, with
    /// zero pieces of a read already filled. None: the request takes the pool.
    fn plan(&mut self, mem: &G, req: &Request) -> Option<(DirectPlan, Vec<Op>)> {
        self.ring.as_ref()?;
        let dir = plan_dir(req);
        match req.kind {
            RequestType::In => {}
            // Write-through needs a flush after the write: the pool does both.
            RequestType::Out if self.ctx.writeback.load(Ordering::Relaxed) => {}
            _ => return None,
        }
        let dev = &*self.ctx.dev;
        let offset = rw_offset(dev, req).ok()?;
        if req.data_len == 0 {
            return None;
        }
        // A bug below (reachable from a damaged image) must not end this queue's thread: the
        // request then takes the pool path, which catches it again and fails only the request.
        let planned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dev.plan_direct(dir, offset, req.data_len)
        }));
        let plan = match planned {
            Ok(r) => r.ok()??,
            Err(_) => {
                warn!(
                    "queue {}: planning a {:?} request panicked",
                    self.queue, req.kind
                );
                return None;
            }
        };
        match build_ops(&**mem, &req.data, &plan, dir) {
            Some(ops) => Some((plan, ops)),
            None => {
                dev.end_direct(plan.seq, dir, true);
                None
            }
        }
    }

    /// Put a planned request's operations in the ring.
    fn start_direct(&mut self, head: u16, mem: G, req: Request, plan: DirectPlan, ops: Vec<Op>) {
        let dir = plan_dir(&req);
        let n = ops.len();
        let Some(slot) = self.table.get_mut(head) else {
            return;
        };
        slot.state = Exec::Direct(DirectIo {
            mem,
            dir,
            seq: plan.seq,
            fd: plan.fd,
            ops,
            pending: n,
            failed: None,
            segs: match dir {
                Direction::Read => req.data,
                Direction::Write => Vec::new(),
            },
        });
        // Buffered reads first try the page cache without blocking: a hit costs one syscall
        // on this thread, less than a trip through the ring.
        let try_cache = dir == Direction::Read && plan.align <= 1;
        for i in 0..n {
            let ud = (u64::from(head) << 32) | i as u64;
            let op = match self.table.get_mut(head).map(|s| &s.state) {
                Some(Exec::Direct(d)) => {
                    let o = &d.ops[i];
                    if try_cache && read_cached(d.fd, o) {
                        let len = o.len;
                        self.op_done(head, i, Ok(len));
                        continue;
                    }
                    let (iov, iovcnt, offset) = (o.iov.as_ptr(), o.iov.len() as u32, o.offset);
                    match dir {
                        Direction::Read => RingOp::Readv {
                            fd: d.fd,
                            iov,
                            iovcnt,
                            offset,
                        },
                        Direction::Write => RingOp::Writev {
                            fd: d.fd,
                            iov,
                            iovcnt,
                            offset,
                        },
                    }
                }
                _ => return,
            };
            if let Err(e) = self.push(op, ud) {
                // This operation never reached the kernel: count it as failed and done.
                self.op_done(head, i, Err(e));
            }
        }
        if n == 0 {
            self.finish_direct(head);
        } else if (dir == Direction::Read || plan.align > 1)
            && self
                .ring
                .as_ref()
                .is_some_and(|r| r.in_flight() < SUBMIT_AT_ONCE_BELOW)
        {
            // This request goes to the device: hand it over now, unless the device already
            // has plenty of this queue's requests (see `SUBMIT_AT_ONCE_BELOW`). Buffered
            // writes land in the page cache and stay batched (one syscall per turn).
            self.flush_submissions();
        }
    }

    /// Push one operation; reaps to make room when the kernel's completion queue is full.
    fn push(&mut self, op: RingOp, ud: u64) -> std::io::Result<()> {
        for _ in 0..1000 {
            let Some(ring) = self.ring.as_mut() else {
                return Err(std::io::Error::other("no ring"));
            };
            // SAFETY: the iovecs and the guest memory they point into live in the request's
            // slot (its memory guard keeps the mapping) until this operation's completion is
            // reaped: a slot is only removed once all its operations completed (`op_done`),
            // and dropping the executor waits for the ring to empty.
            match unsafe { ring.push(op, ud) } {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap_ring(),
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::from_raw_os_error(libc::EBUSY))
    }

    /// Hand queued operations to the kernel (once per event-loop turn).
    pub fn flush_submissions(&mut self) {
        for _ in 0..1000 {
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            match ring.submit() {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap_ring(),
                Err(e) => {
                    warn!("queue {}: io_uring submit failed: {e}", self.queue);
                    return;
                }
            }
        }
    }

    fn reap_ring(&mut self) {
        let mut done = Vec::new();
        if let Some(ring) = self.ring.as_mut() {
            ring.reap(|ud, res| done.push((ud, res)));
        }
        for (ud, res) in done {
            let head = (ud >> 32) as u16;
            let i = (ud & 0xffff_ffff) as usize;
            let r = if res < 0 {
                Err(std::io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as u64)
            };
            self.op_done(head, i, r);
        }
    }

    /// One operation of a direct request finished with `r` (bytes moved).
    fn op_done(&mut self, head: u16, i: usize, r: std::io::Result<u64>) {
        let Some(Exec::Direct(d)) = self.table.get_mut(head).map(|s| &mut s.state) else {
            return;
        };
        let Some(op) = d.ops.get(i) else {
            return;
        };
        let r = match r {
            Ok(n) if n < op.len => finish_short(d.fd, d.dir, op, n),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            d.failed.get_or_insert(e);
        }
        d.pending -= 1;
        if d.pending == 0 {
            self.finish_direct(head);
        }
    }

    /// All operations of a direct request are done: end its plan, write its status.
    fn finish_direct(&mut self, head: u16) {
        let Some(slot) = self.table.remove(head) else {
            return;
        };
        let Exec::Direct(d) = slot.state else {
            return;
        };
        let ok = d.failed.is_none();
        self.ctx.dev.end_direct(d.seq, d.dir, ok);
        let done = match d.failed {
            None => Done {
                status: VIRTIO_BLK_S_OK,
                written: match d.dir {
                    Direction::Read => u32::try_from(slot.data_len).unwrap_or(u32::MAX),
                    Direction::Write => 0,
                },
            },
            Some(e) => Done::status(status_of(&self.ctx, slot.kind, &BlockError::Io(e))),
        };
        mark_written(&*d.mem, &d.segs, u64::from(done.written));
        let used = complete(
            &self.ctx,
            self.queue,
            &*d.mem,
            slot.kind,
            slot.data_len,
            slot.status,
            done,
            slot.started,
        );
        self.ready.push((head, used));
    }

    /// Collect every request finished so far as `(head, used length)`, in the order they
    /// finished.
    pub fn reap(&mut self, out: &mut Vec<(u16, u32)>) {
        // Reset the event first: whatever finishes after this read signals it again.
        let _ = self.event.read();
        self.reap_ring();
        while let Ok((head, used)) = self.rx.try_recv() {
            if self.table.remove(head).is_some() {
                self.ready.push((head, used));
            }
        }
        out.append(&mut self.ready);
        self.gauge();
    }
}

impl<G> Drop for QueueExec<G> {
    fn drop(&mut self) {
        // The kernel may still write into guest memory and read the iovecs of the slots:
        // wait for every operation before they go.
        if let Some(ring) = self.ring.as_mut() {
            let mut left = ring.in_flight();
            while left > 0 {
                if ring.wait_one().is_err() {
                    break;
                }
                ring.reap(|_, _| {});
                left = ring.in_flight();
            }
        }
    }
}

/// Read `op` from the page cache if all of it is there (`preadv2` with `RWF_NOWAIT`); false
/// when it is not (or partly), and the ring must read it.
fn read_cached(fd: RawFd, op: &Op) -> bool {
    let Ok(off) = i64::try_from(op.offset) else {
        return false;
    };
    let Ok(cnt) = i32::try_from(op.iov.len()) else {
        return false;
    };
    // SAFETY: the iovecs point into guest memory kept mapped by the request's slot, each
    // valid for its length; the kernel writes at most that much into each.
    let n = unsafe { libc::preadv2(fd, op.iov.as_ptr(), cnt, off, libc::RWF_NOWAIT) };
    n >= 0 && n as u64 == op.len
}

fn plan_dir(req: &Request) -> Direction {
    match req.kind {
        RequestType::In => Direction::Read,
        _ => Direction::Write,
    }
}

/// Complete a short read or write on the calling thread. A read that ends early met the end
/// of the file: the rest reads as zeros.
fn finish_short(fd: RawFd, dir: Direction, op: &Op, done: u64) -> std::io::Result<()> {
    let mut skip = done;
    let mut off = op.offset + done;
    for v in &op.iov {
        let len = v.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // SAFETY: the iovec points into guest memory kept mapped by the request's slot (the
        // caller holds it); skip < len keeps the pointer and length inside it.
        let (ptr, n) = unsafe {
            (
                v.iov_base.cast::<u8>().add(skip as usize),
                (len - skip) as usize,
            )
        };
        skip = 0;
        let mut at = 0usize;
        while at < n {
            // SAFETY: as above; at < n keeps p..p+(n-at) inside the iovec.
            let p = unsafe { ptr.add(at) };
            let pos = i64::try_from(off).map_err(std::io::Error::other)?;
            // SAFETY: p..p+(n-at) is guest memory kept mapped (see above).
            let r = unsafe {
                match dir {
                    Direction::Read => libc::pread(fd, p.cast(), n - at, pos),
                    Direction::Write => libc::pwrite(fd, p.cast(), n - at, pos),
                }
            };
            let err = (r < 0).then(std::io::Error::last_os_error);
            let at_eof = match &err {
                None => r == 0,
                // An O_DIRECT read that starts unaligned past a short end of file.
                Some(e) => e.raw_os_error() == Some(libc::EINVAL),
            };
            match (dir, err) {
                _ if r > 0 => {
                    at += r as usize;
                    off += r as u64;
                }
                (Direction::Read, _) if at_eof => {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_bytes(p, 0, n - at) };
                    at = n;
                }
                (_, Some(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                (_, Some(e)) => return Err(e),
                (_, None) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "the file took no more bytes",
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The operations of a direct plan over the request's guest buffers; zero pieces of a read are
/// filled here. None when guest memory cannot be mapped or a buffer breaks the plan's
/// alignment (the pool path then bounces it).
fn build_ops<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    data: &[Segment],
    plan: &DirectPlan,
    dir: Direction,
) -> Option<Vec<Op>> {
    let mut slices = Vec::with_capacity(data.len());
    for s in data {
        for sl in mem.get_slices(s.addr, s.len as usize) {
            slices.push(sl.ok()?);
        }
    }
    let a = plan.align.max(1);
    let mut ops = Vec::with_capacity(plan.segs.len());
    for seg in &plan.segs {
        let pieces = sub_slices(&slices, seg.buf_off as usize, seg.len as usize)?;
        match seg.host {
            None => {
                if dir == Direction::Write {
                    return None;
                }
                for p in &pieces {
                    zero(p);
                }
            }
            Some(host) => {
                if host % a != 0 {
                    return None;
                }
                let mut iov = Vec::with_capacity(pieces.len());
                for p in &pieces {
                    let ptr = p.ptr_guard_mut().as_ptr();
                    if !(ptr as u64).is_multiple_of(a) || !(p.len() as u64).is_multiple_of(a) {
                        return None;
                    }
                    iov.push(libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: p.len(),
                    });
                }
                ops.push(Op {
                    iov,
                    offset: host,
                    len: seg.len,
                });
            }
        }
    }
    Some(ops)
}

/// The parts of `slices` (one list of buffers) that fall in `start..start+len`.
fn sub_slices<'a, B: vm_memory::bitmap::BitmapSlice>(
    slices: &[VolatileSlice<'a, B>],
    start: usize,
    len: usize,
) -> Option<Vec<VolatileSlice<'a, B>>> {
    let end = start + len;
    let mut pos = 0usize;
    let mut out = Vec::new();
    for s in slices {
        let (lo, hi) = (pos, pos + s.len());
        pos = hi;
        if hi <= start {
            continue;
        }
        if lo >= end {
            break;
        }
        let from = start.max(lo) - lo;
        let to = end.min(hi) - lo;
        out.push(s.subslice(from, to - from).ok()?);
    }
    Some(out)
}

fn zero<B: vm_memory::bitmap::BitmapSlice>(s: &VolatileSlice<'_, B>) {
    let mut at = 0;
    while at < s.len() {
        let n = (s.len() - at).min(ZEROS.len());
        if let Ok(p) = s.subslice(at, n) {
            p.copy_from(&ZEROS[..n]);
        }
        at += n;
    }
}
