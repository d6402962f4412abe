//! `RawDisk`: a [`BlockDevice`] over a raw image (any [`Storage`], normally a `FileStorage`).
//! Used by `serve` when the image is not qcow2, and by tests of the layers above.

use std::fs::OpenOptions;
use std::io::{self, IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::block::{
    check_range, check_resize, BlockDevice, BlockError, DirectPlan, DirectSeg, Direction,
};
use crate::storage::{FileStorage, Storage};

/// A raw disk image: guest offset == file offset. The capacity is the file length at open
/// (`resize` grows both).
pub struct RawDisk<S: Storage = FileStorage> {
    storage: S,
    capacity: AtomicU64,
    read_only: bool,
}

impl RawDisk<FileStorage> {
    /// Open a raw image file.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        Self::open_with(path, read_only, false)
    }
    /// Open a raw image file; `direct`: with O_DIRECT.
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        if direct {
            return RawDisk::new(FileStorage::open_direct(path, !read_only)?, read_only);
        }
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        RawDisk::new(FileStorage::new(file), read_only)
    }
}

impl<S: Storage> RawDisk<S> {
    /// Wrap storage; the disk is as large as the storage is now.
    pub fn new(storage: S, read_only: bool) -> io::Result<Self> {
        let capacity = storage.len()?;
        Ok(RawDisk {
            storage,
            capacity: AtomicU64::new(capacity),
            read_only,
        })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.capacity())
    }
}

fn io_err(e: io::Error) -> BlockError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        BlockError::NoSpace
    } else {
        BlockError::Io(e)
    }
}

impl<S: Storage> BlockDevice for RawDisk<S> {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, len, self.capacity())?;
        self.storage.readv_at(bufs, offset).map_err(io_err)
    }
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.writable(offset, len)?;
        self.storage.writev_at(bufs, offset).map_err(io_err)
    }
    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.storage.flush().map_err(io_err)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        match self.storage.punch_hole(offset, len) {
            // A file system that cannot punch keeps the data, which a discard allows.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r.map_err(io_err),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        if unmap && self.storage.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        // Keep the range allocated (or the file system cannot punch): write real zeros, a
        // bounded buffer at a time.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.storage
                .write_at(&zeros[..n], offset + done)
                .map_err(io_err)?;
            done += n as u64;
        }
        Ok(())
    }
    fn plan_direct(
        &self,
        dir: Direction,
        offset: u64,
        len: u64,
    ) -> Result<Option<DirectPlan>, BlockError> {
        let Some((fd, align)) = self.storage.direct_fd() else {
            return Ok(None);
        };
        if dir == Direction::Write {
            self.writable(offset, len)?;
        } else {
            check_range(offset, len, self.capacity())?;
        }
        // Guest offset == file offset; nothing to register (`end_direct` has nothing to end).
        Ok(Some(DirectPlan {
            fd,
            align,
            segs: vec![DirectSeg {
                buf_off: 0,
                len,
                host: Some(offset),
            }],
            seq: 0,
        }))
    }
    /// The file grows (a hole: reads as zeros), synced, then requests may use it.
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        check_resize(self.capacity(), new_size, self.read_only)?;
        self.storage.set_len(new_size).map_err(io_err)?;
        self.storage.flush().map_err(io_err)?;
        self.capacity.fetch_max(new_size, Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn raw_disk_basics() {
        let s = MemStorage::new();
        s.set_len(8192).unwrap();
        let d = RawDisk::new(s, false).unwrap();
        assert_eq!(d.capacity(), 8192);
        d.write_vectored(512, &[IoSlice::new(&[1u8; 512]), IoSlice::new(&[2u8; 512])])
            .unwrap();
        let mut a = [0u8; 1024];
        d.read_vectored(512, &mut [IoSliceMut::new(&mut a)])
            .unwrap();
        assert_eq!(&a[..512], &[1u8; 512]);
        assert_eq!(&a[512..], &[2u8; 512]);
        d.write_zeroes(512, 512, false).unwrap();
        d.discard(1024, 512).unwrap();
        d.read_vectored(512, &mut [IoSliceMut::new(&mut a)])
            .unwrap();
        assert!(a.iter().all(|&b| b == 0));
        assert!(matches!(
            d.write_vectored(8192, &[IoSlice::new(&[0u8; 512])]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(d.resize(4096), Err(BlockError::Invalid(_))));
        assert!(matches!(d.resize(8192 + 100), Err(BlockError::Invalid(_))));
        d.resize(16384).unwrap();
        assert_eq!(d.capacity(), 16384);
        d.write_vectored(8192, &[IoSlice::new(&[3u8; 512])])
            .unwrap();
        d.read_vectored(8192, &mut [IoSliceMut::new(&mut a[..512])])
            .unwrap();
        assert_eq!(&a[..512], &[3u8; 512]);
    }

    #[test]
    fn read_only_raw_disk() {
        let s = MemStorage::new();
        s.set_len(4096).unwrap();
        let d = RawDisk::new(s, true).unwrap();
        assert!(matches!(
            d.write_vectored(0, &[IoSlice::new(&[0u8; 512])]),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(d.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(d.resize(8192), Err(BlockError::ReadOnly)));
    }
}
