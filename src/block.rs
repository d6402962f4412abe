//! The block-device API the request layer calls. It is engine level (no virtio types): the qcow2
//! engine implements it, and so does `MemDisk`, a RAM disk for tests of the layers above.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::RwLock;

/// Errors a block device reports; the request layer maps them to virtio status codes.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request {offset}+{len} is past the end of the disk ({capacity} bytes)")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("no space left for the image")]
    NoSpace,
    #[error("the image is corrupt: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A management request the device refuses (a shrink, an unaligned size, ...).
    #[error("{0}")]
    Invalid(String),
}

/// A virtual disk. Offsets and lengths are in bytes; callers keep them 512-byte aligned.
/// Every method takes `&self`: implementations serve several queues at once.
pub trait BlockDevice: Send + Sync {
    /// Size of the disk in bytes.
    fn capacity(&self) -> u64;
    /// True when writes are refused.
    fn read_only(&self) -> bool;
    /// Fill `bufs` from `offset`.
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError>;
    /// Write `bufs` at `offset`.
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError>;
    /// Make every completed write durable (data and metadata).
    fn flush(&self) -> Result<(), BlockError>;
    /// Drop the range's data (it may read back as zeros or as before: discard is a hint).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Make the range read as zeros; `unmap` allows freeing its space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError>;
    /// Flush and release the device for a clean shutdown. The default only flushes.
    fn close(&self) -> Result<(), BlockError> {
        self.flush()
    }
    /// Plan a read or an in-place write that the caller runs itself on the device's file (on
    /// an io_uring, say). `None`: this request needs the device's own (blocking) path. A plan
    /// is registered with the device until `end_direct(plan.seq, ..)`: call it exactly once,
    /// after the I/O finished or failed. The default has no direct path.
    fn plan_direct(
        &self,
        _dir: Direction,
        _offset: u64,
        _len: u64,
    ) -> Result<Option<DirectPlan>, BlockError> {
        Ok(None)
    }
    /// End a direct plan (see `plan_direct`); `ok` says whether its I/O succeeded.
    fn end_direct(&self, _seq: u64, _dir: Direction, _ok: bool) {}
    /// Grow the disk to `new_size` bytes (a multiple of 512; the same size does nothing).
    /// Requests may run meanwhile; `capacity` reports the new size once requests up to it are
    /// accepted. Shrinking is refused. The default refuses everything.
    fn resize(&self, _new_size: u64) -> Result<(), BlockError> {
        Err(BlockError::Invalid("this device cannot be resized".into()))
    }
}

/// The checks every `resize` makes: writable, a multiple of 512 bytes, not smaller.
pub fn check_resize(capacity: u64, new_size: u64, read_only: bool) -> Result<(), BlockError> {
    if read_only {
        return Err(BlockError::ReadOnly);
    }
    if !new_size.is_multiple_of(512) {
        return Err(BlockError::Invalid(format!(
            "the new size {new_size} is not a multiple of 512 bytes"
        )));
    }
    if new_size < capacity {
        return Err(BlockError::Invalid(format!(
            "shrinking is not supported: the disk has {capacity} bytes, {new_size} were asked"
        )));
    }
    Ok(())
}

/// The direction of a direct plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One piece of a direct plan: `len` bytes at `buf_off` of the request's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectSeg {
    pub buf_off: u64,
    pub len: u64,
    /// Where in the file; `None`: the range reads as zeros (reads only).
    pub host: Option<u64>,
}

/// The file I/O a request needs, as planned by `BlockDevice::plan_direct`.
#[derive(Debug)]
pub struct DirectPlan {
    /// The file every piece is in.
    pub fd: std::os::fd::RawFd,
    /// Buffer addresses, lengths and file offsets must be multiples of this (O_DIRECT); the
    /// caller runs an unaligned request on the device's own path instead.
    pub align: u64,
    pub segs: Vec<DirectSeg>,
    /// The registration `end_direct` ends.
    pub seq: u64,
}

/// Check that `offset..offset+len` lies inside a disk of `capacity` bytes.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// A RAM disk for tests of the layers above the engine.
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    pub fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: RwLock::new(vec![0; size]),
            read_only,
        }
    }
    /// A copy of the content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDisk {
    fn capacity(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, d.len() as u64)?;
        let mut o = offset as usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&d[o..o + n]);
            o += n;
        }
        Ok(())
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, d.len() as u64)?;
        let mut o = offset as usize;
        for b in bufs {
            d[o..o + b.len()].copy_from_slice(b);
            o += b.len();
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_resize(d.len() as u64, new_size, self.read_only)?;
        let n = usize::try_from(new_size)
            .map_err(|_| BlockError::Invalid(format!("{new_size} bytes do not fit in RAM")))?;
        d.resize(n, 0);
        Ok(())
    }
}
