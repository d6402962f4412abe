//! Real-file storage: pread/pwrite and preadv/pwritev on a file descriptor.

use super::traits::Storage;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// A file on the host. Short reads at the end of the file are filled with zeros.
///
/// Opened with O_DIRECT (`open_direct`), every buffer address, length and file offset must be
/// a multiple of the file's alignment: I/O that is not goes through an aligned bounce buffer
/// covering its blocks (a read-modify-write for writes; those are serialized among themselves
/// so two of them cannot lose each other's bytes in a shared block).
pub struct FileStorage {
    file: File,
    /// A sync failed once: Linux may have dropped the dirty pages it could not write and would
    /// report the next sync as a success, so every later sync fails too (as QEMU does).
    sync_failed: std::sync::atomic::AtomicBool,
    /// O_DIRECT alignment (1: buffered I/O, anything goes).
    align: u64,
    /// Serializes read-modify-write cycles under O_DIRECT.
    rmw: std::sync::Mutex<()>,
}

impl FileStorage {
    /// Wrap an open file (buffered I/O).
    pub fn new(file: File) -> Self {
        FileStorage {
            file,
            sync_failed: std::sync::atomic::AtomicBool::new(false),
            align: 1,
            rmw: std::sync::Mutex::new(()),
        }
    }
    /// Open `path` with O_DIRECT (bypassing the host page cache) and probe its alignment.
    pub fn open_direct(path: &std::path::Path, write: bool) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => io::Error::new(
                    e.kind(),
                    format!(
                        "{}: the file system does not support O_DIRECT (cache modes none and \
                         directsync need it): {e}",
                        path.display()
                    ),
                ),
                _ => e,
            })?;
        let align = super::direct::probe_alignment(&file)?;
        let mut s = FileStorage::new(file);
        s.align = align;
        Ok(s)
    }
    /// The underlying file (for locking).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The O_DIRECT alignment (1 when buffered).
    pub fn alignment(&self) -> u64 {
        self.align
    }
    fn aligned(&self, offset: u64, lens_ptrs: impl Iterator<Item = (usize, usize)>) -> bool {
        let a = self.align;
        if a <= 1 {
            return true;
        }
        offset.is_multiple_of(a)
            && lens_ptrs
                .into_iter()
                .all(|(p, l)| (p as u64).is_multiple_of(a) && (l as u64).is_multiple_of(a))
    }
}

/// Largest iovec count one preadv/pwritev call takes.
const IOV_MAX: usize = 1024;

impl FileStorage {
    fn direct(&self) -> super::direct::DirectFile<'_> {
        super::direct::DirectFile {
            file: &self.file,
            align: self.align,
            rmw: &self.rmw,
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.align > 1 {
            // One path for every O_DIRECT read (it handles a short read at the end of the file).
            return self.readv_at(&mut [IoSliceMut::new(buf)], offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.aligned(offset, std::iter::once((buf.as_ptr() as usize, buf.len()))) {
            return super::direct::bounce_write(&self.direct(), &[IoSlice::new(buf)], offset);
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.sync_failed.load(Ordering::Relaxed) {
            return Err(io::Error::other(
                "an earlier sync of this file failed: its data may be lost, nothing is durable",
            ));
        }
        let r = self.file.sync_data();
        if r.is_err() {
            self.sync_failed.store(true, Ordering::Relaxed);
        }
        r
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let Ok(off) = i64::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek only takes integers and a file descriptor we own. It moves the file
        // position, which nothing here uses (every read and write is positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No SEEK_DATA on this file system: assume data everywhere.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                Ok((offset < self.len()?).then_some(offset))
            }
            _ => Err(e),
        }
    }

    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        Some((self.file.as_raw_fd(), self.align))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range overflow",
            ));
        };
        // SAFETY: fallocate only takes integers and a file descriptor we own.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Also EOPNOTSUPP: the data stays, so the caller must know (discard may ignore it,
        // write-zeroes must write zeros instead).
        Err(io::Error::last_os_error())
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if !self.aligned(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            return super::direct::bounce_read(&self.direct(), bufs, offset);
        }
        let mut idx = 0usize; // first segment not yet fully read
        let mut skip = 0usize; // bytes of bufs[idx] already read
        let mut off = offset;
        while idx < bufs.len() {
            if bufs[idx].len() == skip {
                idx += 1;
                skip = 0;
                continue;
            }
            let end = (idx + IOV_MAX).min(bufs.len());
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(end - idx);
            for (i, b) in bufs[idx..end].iter_mut().enumerate() {
                let s = if i == 0 { skip } else { 0 };
                iov.push(libc::iovec {
                    iov_base: b[s..].as_mut_ptr().cast(),
                    iov_len: b.len() - s,
                });
            }
            let off_t = i64::try_from(off)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            // SAFETY: every iovec points into a live, exclusively borrowed buffer of the given
            // length; the kernel writes at most that many bytes into each.
            let n = unsafe {
                libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off_t)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                // End of file: the rest reads as zeros.
                bufs[idx][skip..].fill(0);
                for b in bufs[idx + 1..].iter_mut() {
                    b.fill(0);
                }
                return Ok(());
            }
            let mut n = n as usize;
            off += n as u64;
            while n > 0 && idx < bufs.len() {
                let left = bufs[idx].len() - skip;
                if n >= left {
                    n -= left;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
            // A short O_DIRECT read ends at the end of the file (the next would be unaligned).
            if self.align > 1 && !off.is_multiple_of(self.align) && idx < bufs.len() {
                bufs[idx][skip..].fill(0);
                for b in bufs[idx + 1..].iter_mut() {
                    b.fill(0);
                }
                return Ok(());
            }
        }
        Ok(())
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if !self.aligned(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            return super::direct::bounce_write(&self.direct(), bufs, offset);
        }
        let mut idx = 0usize;
        let mut skip = 0usize;
        let mut off = offset;
        while idx < bufs.len() {
            if bufs[idx].len() == skip {
                idx += 1;
                skip = 0;
                continue;
            }
            let end = (idx + IOV_MAX).min(bufs.len());
            let iov: Vec<libc::iovec> = bufs[idx..end]
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let s = if i == 0 { skip } else { 0 };
                    libc::iovec {
                        iov_base: b[s..].as_ptr() as *mut libc::c_void,
                        iov_len: b.len() - s,
                    }
                })
                .collect();
            let off_t = i64::try_from(off)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            // SAFETY: every iovec points into a live buffer of the given length; pwritev only
            // reads from them.
            let n = unsafe {
                libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off_t)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            let mut n = n as usize;
            off += n as u64;
            while n > 0 && idx < bufs.len() {
                let left = bufs[idx].len() - skip;
                if n >= left {
                    n -= left;
                    idx += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_roundtrip_and_eof_zero_fill() {
        let f = tempfile::tempfile().unwrap();
        let s = FileStorage::new(f);
        let a = vec![1u8; 3000];
        let b = vec![2u8; 5000];
        s.writev_at(&[IoSlice::new(&a), IoSlice::new(&b)], 100)
            .unwrap();
        assert_eq!(s.len().unwrap(), 8100);
        let mut x = vec![9u8; 4000];
        let mut y = vec![9u8; 4200];
        s.readv_at(&mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)], 100)
            .unwrap();
        assert!(x[..3000].iter().all(|&v| v == 1));
        assert!(x[3000..].iter().all(|&v| v == 2));
        assert!(y[..4000].iter().all(|&v| v == 2));
        assert!(y[4000..].iter().all(|&v| v == 0), "past EOF reads zero");
    }

    /// Unaligned reads and writes on an O_DIRECT file give the bytes a buffered file gives.
    #[test]
    fn unaligned_io_through_bounce_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 10000]).unwrap();
        let s = match FileStorage::open_direct(&path, true) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("no O_DIRECT here ({e}); skipped");
                return;
            }
        };
        assert!(s.alignment() >= 512, "probed {}", s.alignment());
        s.write_at(&[1u8; 3], 700).unwrap();
        s.writev_at(
            &[IoSlice::new(&[2u8; 1000]), IoSlice::new(&[3u8; 24])],
            9000,
        )
        .unwrap();
        let mut back = vec![0u8; 12000];
        s.read_at(&mut back, 1).unwrap();
        let want = |i: usize| match i {
            700..=702 => 1,
            9000..=9999 => 2,
            10000..=10023 => 3,
            10024.. => 0,
            _ => 5,
        };
        for (k, &v) in back.iter().enumerate() {
            assert_eq!(v, want(k + 1), "byte {}", k + 1);
        }
    }
}
