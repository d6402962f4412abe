//! The storage trait itself (its implementations are the sibling files).

use std::io::{self, IoSlice, IoSliceMut};

/// Byte-addressed storage that the qcow2 engine reads and writes.
///
/// Reads past the end of the storage return zeros (qcow2 allows clusters that were allocated but
/// never written past the file end). Every method takes `&self`: implementations are thread-safe.
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocate a range; it reads as zeros afterwards. An error (EOPNOTSUPP included) means
    /// the data may still be there.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Scatter read. The default reads segment by segment.
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Gather write. The default writes segment by segment.
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// True when the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// The first offset at or after `offset` that may hold data (not a hole), or None when only
    /// holes (or the end) follow. Lets a reader skip the holes of a large sparse area instead
    /// of reading terabytes of zeros. The default knows no holes.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok((offset < self.len()?).then_some(offset))
    }
    /// The file descriptor a caller may read and write itself (an io_uring), with the
    /// alignment its buffers, lengths and offsets need (1 unless opened with O_DIRECT). None
    /// for storage that is not one plain file (memory, fault injection).
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        (**self).readv_at(bufs, offset)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        (**self).writev_at(bufs, offset)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        (**self).direct_fd()
    }
}
