//! Running a parsed request against the block device, zero copy: the device reads and writes
//! guest memory through iovecs built over the guest's own buffers.

use std::io::{IoSlice, IoSliceMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryBackend};

use super::config::BlkConfig;
use super::consts::{
    ID_BYTES, SECTOR_SIZE, SEGMENT_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use super::request::{parse_chain, ParseError, Request, RequestType, Segment};
use super::stats::QueueStats;
use super::throttle::{held_note, Throttle};
use crate::block::{check_range, BlockDevice, BlockError};

/// Everything a queue worker needs to run requests; shared by all queues.
pub struct DeviceCtx {
    pub dev: Arc<dyn BlockDevice>,
    /// The limits announced in the config space (segment counts, discard sizes).
    pub limits: BlkConfig,
    /// The GET_ID answer (serial), zero padded.
    pub id: [u8; ID_BYTES],
    /// Writeback cache on; when off every write is flushed before it completes.
    pub writeback: AtomicBool,
    /// Request counters, one per queue.
    pub stats: Box<[QueueStats]>,
    /// Limit the warnings for failed and for malformed requests (see `throttle`).
    failures: Throttle,
    malformed: Throttle,
}

/// At most one warning per this interval for failed or malformed requests.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl DeviceCtx {
    pub fn new(dev: Arc<dyn BlockDevice>, limits: BlkConfig, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let writeback = AtomicBool::new(limits.writeback != 0);
        let stats = (0..limits.num_queues.max(1))
            .map(|_| QueueStats::default())
            .collect();
        DeviceCtx {
            dev,
            limits,
            id,
            writeback,
            stats,
            failures: Throttle::new(FAILURE_LOG_INTERVAL),
            malformed: Throttle::new(FAILURE_LOG_INTERVAL),
        }
    }
}

/// Outcome of running a request: the status byte and the bytes written into guest buffers.
pub(crate) struct Done {
    pub status: u8,
    pub written: u32,
}

impl Done {
    pub(crate) fn status(status: u8) -> Self {
        Done { status, written: 0 }
    }
}

/// Parse and run one chain of queue `queue`; write its status and count it in that queue's
/// statistics. Returns the used length for the used ring (bytes written into device-writable
/// buffers, status byte included; 0 if there is no status).
pub fn process_chain<M, I>(ctx: &DeviceCtx, queue: usize, mem: &M, descs: I) -> u32
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let start = Instant::now();
    match parse_or_answer(ctx, queue, mem, descs, start) {
        Parsed::Answered(used) => used,
        Parsed::Request(req) => run_request(ctx, queue, mem, &req, start),
    }
}

/// A chain after parsing: a request to run, or already answered (malformed, no status).
pub(crate) enum Parsed {
    Answered(u32),
    Request(Request),
}

/// Parse one chain; a chain that is not a request is answered (and counted) here.
pub(crate) fn parse_or_answer<M, I>(
    ctx: &DeviceCtx,
    queue: usize,
    mem: &M,
    descs: I,
    start: Instant,
) -> Parsed
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let stats = ctx.stats.get(queue);
    match parse_chain(mem, descs) {
        Ok(r) => Parsed::Request(r),
        Err(ParseError::NoStatus) => {
            debug!("dropping a chain without a status byte");
            if let Some(s) = stats {
                s.record(None, 0, false, start.elapsed());
            }
            Parsed::Answered(0)
        }
        Err(ParseError::Malformed { status, reason }) => {
            // A driver never sends these: worth a warning, but a broken one may send many.
            match ctx.malformed.permit(Instant::now()) {
                Some(held) => warn!(
                    "malformed request on queue {queue}: {reason}{}",
                    held_note(held)
                ),
                None => debug!("malformed request on queue {queue}: {reason}"),
            }
            if let Some(s) = stats {
                s.record(None, 0, false, start.elapsed());
            }
            Parsed::Answered(finish(mem, status, Done::status(VIRTIO_BLK_S_IOERR)))
        }
    }
}

/// Run a parsed request on the device's own (blocking) path, write its status, count it.
/// Returns the used length.
pub(crate) fn run_request<M: GuestMemoryBackend + ?Sized>(
    ctx: &DeviceCtx,
    queue: usize,
    mem: &M,
    req: &Request,
    start: Instant,
) -> u32 {
    // A bug below (say, in a decompressor) fails this request only: the engine's guards undo
    // what it registered, and the queue goes on with the next one.
    let done = match std::panic::catch_unwind(AssertUnwindSafe(|| execute(ctx, mem, req))) {
        Ok(done) => done,
        Err(p) => {
            error!(
                "{:?} request on queue {queue} panicked: {}",
                req.kind,
                panic_text(p.as_ref())
            );
            Done::status(VIRTIO_BLK_S_IOERR)
        }
    };
    mark_written(mem, &req.data, u64::from(done.written));
    complete(
        ctx,
        queue,
        mem,
        req.kind,
        req.data_len,
        req.status,
        done,
        start,
    )
}

/// Mark the first `written` bytes of the data buffers `segs` as written by the device, for the
/// guest memory's dirty log (live migration): the kernel filled them (`preadv`, io_uring), so
/// vm-memory did not see the writes.
pub(crate) fn mark_written<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segs: &[Segment],
    written: u64,
) {
    let mut left = written;
    for seg in segs {
        if left == 0 {
            break;
        }
        let len = u64::from(seg.len).min(left);
        left -= len;
        if let Ok(s) = mem.get_slice(seg.addr, len as usize) {
            s.bitmap().mark_dirty(0, len as usize);
        }
    }
}

/// Count a finished request and write its status. Returns the used length.
#[allow(clippy::too_many_arguments)]
pub(crate) fn complete<M: GuestMemoryBackend + ?Sized>(
    ctx: &DeviceCtx,
    queue: usize,
    mem: &M,
    kind: RequestType,
    data_len: u64,
    status: vm_memory::GuestAddress,
    done: Done,
    start: Instant,
) -> u32 {
    if let Some(s) = ctx.stats.get(queue) {
        let ok = done.status == VIRTIO_BLK_S_OK;
        s.record(Some(kind), data_len, ok, start.elapsed());
    }
    finish(mem, status, done)
}

/// The message a panic carried, if it was a string.
fn panic_text(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn finish<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    status: vm_memory::GuestAddress,
    d: Done,
) -> u32 {
    match mem.write_obj(d.status, status) {
        Ok(()) => d.written.saturating_add(1),
        // The parser checked the address; memory can only vanish under a remap.
        Err(e) => {
            warn!("cannot write a request status: {e}");
            0
        }
    }
}

pub(crate) fn status_of(ctx: &DeviceCtx, kind: RequestType, e: &BlockError) -> u8 {
    match e {
        BlockError::OutOfRange { .. } | BlockError::ReadOnly => {
            debug!("{kind:?} refused: {e}");
        }
        _ => match ctx.failures.permit(Instant::now()) {
            Some(held) => warn!("{kind:?} failed: {e}{}", held_note(held)),
            None => debug!("{kind:?} failed: {e}"),
        },
    }
    VIRTIO_BLK_S_IOERR
}

fn execute<M: GuestMemoryBackend + ?Sized>(ctx: &DeviceCtx, mem: &M, req: &Request) -> Done {
    let dev = &*ctx.dev;
    let kind = req.kind;
    let r = match kind {
        RequestType::In => {
            return match rw_offset(dev, req).and_then(|off| read_into(dev, mem, off, &req.data)) {
                Ok(()) => Done {
                    status: VIRTIO_BLK_S_OK,
                    written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
                },
                Err(e) => Done::status(status_of(ctx, kind, &e)),
            };
        }
        RequestType::Out => {
            rw_offset(dev, req).and_then(|off| write_from(dev, mem, off, &req.data))
        }
        RequestType::Flush => dev.flush(),
        RequestType::GetId => return get_id(ctx, mem, req),
        RequestType::Discard | RequestType::WriteZeroes => match ranges(ctx, mem, req) {
            Ok(r) => r,
            Err(status) => return Done::status(status),
        },
        RequestType::Unsupported(t) => {
            debug!("unsupported request type {t}");
            return Done::status(VIRTIO_BLK_S_UNSUPP);
        }
    };
    let r = r.and_then(|()| {
        let writes = matches!(
            kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && !ctx.writeback.load(Ordering::Relaxed) {
            dev.flush()
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) => Done::status(VIRTIO_BLK_S_OK),
        Err(e) => Done::status(status_of(ctx, kind, &e)),
    }
}

/// Byte offset of an IN/OUT request after the alignment and capacity checks.
pub(crate) fn rw_offset(dev: &dyn BlockDevice, req: &Request) -> Result<u64, BlockError> {
    let capacity = dev.capacity();
    let offset = req
        .sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(BlockError::OutOfRange {
            offset: u64::MAX,
            len: req.data_len,
            capacity,
        })?;
    if !req.data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(BlockError::OutOfRange {
            offset,
            len: req.data_len,
            capacity,
        });
    }
    check_range(offset, req.data_len, capacity)?;
    if req.kind == RequestType::Out && dev.read_only() {
        return Err(BlockError::ReadOnly);
    }
    Ok(offset)
}

/// Gather the guest-memory slices behind `segs`, in order, into a local vector.
macro_rules! slices {
    ($mem:expr, $segs:expr) => {{
        let mut out = Vec::with_capacity($segs.len());
        for s in $segs {
            for sl in GuestMemoryBackend::get_slices($mem, s.addr, s.len as usize) {
                out.push(sl.map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))?);
            }
        }
        out
    }};
}

fn read_into<M: GuestMemoryBackend + ?Sized>(
    dev: &dyn BlockDevice,
    mem: &M,
    offset: u64,
    segs: &[Segment],
) -> Result<(), BlockError> {
    let sl = slices!(mem, segs);
    let guards: Vec<_> = sl.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<IoSliceMut<'_>> = guards
        .iter()
        .zip(&sl)
        .map(|(g, s)| {
            // SAFETY: the pointer and length come from a VolatileSlice of mapped guest memory that
            // stays mapped while `mem` (a loaded snapshot of the guest memory) and the guard live,
            // which outlasts this call. The guest may touch the buffer concurrently; it gave it to
            // the device, and the kernel's preadv (or a plain copy) tolerates that like any DMA.
            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(g.as_ptr(), s.len()) })
        })
        .collect();
    dev.read_vectored(offset, &mut iov)?;
    for s in &sl {
        s.bitmap().mark_dirty(0, s.len());
    }
    Ok(())
}

fn write_from<M: GuestMemoryBackend + ?Sized>(
    dev: &dyn BlockDevice,
    mem: &M,
    offset: u64,
    segs: &[Segment],
) -> Result<(), BlockError> {
    let sl = slices!(mem, segs);
    let guards: Vec<_> = sl.iter().map(|s| s.ptr_guard()).collect();
    let iov: Vec<IoSlice<'_>> = guards
        .iter()
        .zip(&sl)
        .map(|(g, s)| {
            // SAFETY: as in `read_into`; the slice is only read.
            IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), s.len()) })
        })
        .collect();
    dev.write_vectored(offset, &iov)
}

fn get_id<M: GuestMemoryBackend + ?Sized>(ctx: &DeviceCtx, mem: &M, req: &Request) -> Done {
    let mut left = &ctx.id[..];
    let mut written = 0u32;
    for s in &req.data {
        if left.is_empty() {
            break;
        }
        let n = (s.len as usize).min(left.len());
        if mem.write_slice(&left[..n], s.addr).is_err() {
            return Done::status(VIRTIO_BLK_S_IOERR);
        }
        left = &left[n..];
        written += n as u32;
    }
    Done {
        status: VIRTIO_BLK_S_OK,
        written,
    }
}

/// Run the segments of a DISCARD or WRITE_ZEROES request. `Err` is a status to answer at once.
fn ranges<M: GuestMemoryBackend + ?Sized>(
    ctx: &DeviceCtx,
    mem: &M,
    req: &Request,
) -> Result<Result<(), BlockError>, u8> {
    let discard = req.kind == RequestType::Discard;
    let (max_seg, max_sectors) = if discard {
        (ctx.limits.max_discard_seg, ctx.limits.max_discard_sectors)
    } else {
        (
            ctx.limits.max_write_zeroes_seg,
            ctx.limits.max_write_zeroes_sectors,
        )
    };
    let seg_size = u64::from(SEGMENT_SIZE);
    if req.data_len == 0 || !req.data_len.is_multiple_of(seg_size) {
        debug!("{:?}: bad segment list length {}", req.kind, req.data_len);
        return Err(VIRTIO_BLK_S_IOERR);
    }
    if req.data_len / seg_size > u64::from(max_seg) {
        debug!("{:?}: more than {max_seg} segments", req.kind);
        return Err(VIRTIO_BLK_S_UNSUPP);
    }
    // Segment descriptors are metadata (16 bytes each, bounded above): copying them is fine.
    let mut buf = vec![0u8; req.data_len as usize];
    let mut pos = 0usize;
    for s in &req.data {
        let end = pos + s.len as usize;
        if mem.read_slice(&mut buf[pos..end], s.addr).is_err() {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        pos = end;
    }
    let dev = &*ctx.dev;
    if dev.read_only() {
        return Ok(Err(BlockError::ReadOnly));
    }
    let capacity = dev.capacity();
    let mut todo = Vec::new();
    for chunk in buf.chunks_exact(SEGMENT_SIZE as usize) {
        let mut s8 = [0u8; 8];
        s8.copy_from_slice(&chunk[0..8]);
        let sector = u64::from_le_bytes(s8);
        let num = u32::from_le_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]);
        let flags = u32::from_le_bytes([chunk[12], chunk[13], chunk[14], chunk[15]]);
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            debug!("{:?}: unsupported segment flags {flags:#x}", req.kind);
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        if num > max_sectors {
            debug!("{:?}: segment of {num} sectors is over the limit", req.kind);
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let len = u64::from(num) * SECTOR_SIZE;
        let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
            return Err(VIRTIO_BLK_S_IOERR);
        };
        if let Err(e) = check_range(offset, len, capacity) {
            return Ok(Err(e));
        }
        todo.push((offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
    }
    for (offset, len, unmap) in todo {
        if len == 0 {
            continue;
        }
        let r = if discard {
            dev.discard(offset, len)
        } else {
            dev.write_zeroes(offset, len, unmap)
        };
        if r.is_err() {
            return Ok(r);
        }
    }
    Ok(Ok(()))
}
