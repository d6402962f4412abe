//! One io_uring per queue thread: vectored reads and writes at file offsets, completions
//! signalled on an eventfd the queue's event loop already polls. No busy polling: the kernel
//! runs each request and posts its completion; the submitter never waits in the ring.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// One operation for the ring: `iovcnt` iovecs at `iov` moved at byte `offset` of `fd`.
#[derive(Debug, Clone, Copy)]
pub enum RingOp {
    Readv {
        fd: RawFd,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
    },
    Writev {
        fd: RawFd,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
    },
}

/// A submission and completion ring.
pub struct Ring {
    ring: IoUring,
    /// Entries pushed and not yet handed to the kernel.
    unsubmitted: usize,
    /// Operations handed to the kernel and not yet reaped.
    in_kernel: usize,
}

impl Ring {
    /// A ring of `entries` submission slots whose completions are signalled on `eventfd`.
    pub fn new(entries: u32, eventfd: RawFd) -> io::Result<Self> {
        let ring = IoUring::new(entries.clamp(1, 4096))?;
        ring.submitter().register_eventfd(eventfd)?;
        Ok(Ring {
            ring,
            unsubmitted: 0,
            in_kernel: 0,
        })
    }

    /// Queue `op` with `user_data`; hands queued entries to the kernel first when the
    /// submission queue is full.
    ///
    /// # Safety
    /// The iovecs behind `op` and the memory they point to must stay valid (and, for a read,
    /// not otherwise used) until the completion with `user_data` has been reaped.
    pub unsafe fn push(&mut self, op: RingOp, user_data: u64) -> io::Result<()> {
        let entry = match op {
            RingOp::Readv {
                fd,
                iov,
                iovcnt,
                offset,
            } => opcode::Readv::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build(),
            RingOp::Writev {
                fd,
                iov,
                iovcnt,
                offset,
            } => opcode::Writev::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build(),
        }
        .user_data(user_data);
        loop {
            // SAFETY: the caller keeps the buffers valid until the completion (this function's
            // contract); the entry holds no other pointer.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Hand every queued entry to the kernel. Does not wait for any completion.
    pub fn submit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted -= n.min(self.unsubmitted);
                    self.in_kernel += n;
                    if n == 0 {
                        // The completion queue is full: the caller must reap first.
                        return Err(io::Error::from_raw_os_error(libc::EBUSY));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(e),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Block until at least one completion is posted (submitting what is queued).
    pub fn wait_one(&mut self) -> io::Result<()> {
        let n = self.ring.submit_and_wait(1)?;
        self.unsubmitted -= n.min(self.unsubmitted);
        self.in_kernel += n;
        Ok(())
    }

    /// Entries pushed and not yet handed to the kernel.
    pub fn unsubmitted(&self) -> usize {
        self.unsubmitted
    }

    /// Operations submitted and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_kernel + self.unsubmitted
    }

    /// Call `f(user_data, result)` for every completion posted so far (result: bytes moved,
    /// or a negative errno).
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        let mut n = 0;
        for c in self.ring.completion() {
            n += 1;
            f(c.user_data(), c.result());
        }
        self.in_kernel = self.in_kernel.saturating_sub(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reads_and_writes_complete_with_their_user_data() {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let Ok(mut ring) = Ring::new(8, efd.as_raw_fd()) else {
            eprintln!("no io_uring here; skipped");
            return;
        };
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let out = [9u8; 512];
        let wv = [libc::iovec {
            iov_base: out.as_ptr() as *mut libc::c_void,
            iov_len: out.len(),
        }];
        let mut back = [0u8; 1024];
        let rv = [libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        }];
        let fd = f.as_raw_fd();
        // SAFETY: the buffers and iovecs live until both completions are reaped below.
        unsafe {
            ring.push(
                RingOp::Writev {
                    fd,
                    iov: wv.as_ptr(),
                    iovcnt: 1,
                    offset: 512,
                },
                1,
            )
            .unwrap();
        }
        ring.submit().unwrap();
        let mut seen = Vec::new();
        while seen.is_empty() {
            let _ = efd.read();
            ring.reap(|u, r| seen.push((u, r)));
        }
        // SAFETY: as above.
        unsafe {
            ring.push(
                RingOp::Readv {
                    fd,
                    iov: rv.as_ptr(),
                    iovcnt: 1,
                    offset: 0,
                },
                2,
            )
            .unwrap();
        }
        ring.submit().unwrap();
        while seen.len() < 2 {
            let _ = efd.read();
            ring.reap(|u, r| seen.push((u, r)));
        }
        assert_eq!(seen, vec![(1, 512), (2, 1024)]);
        assert_eq!(ring.in_flight(), 0);
        assert!(back[..512].iter().all(|&b| b == 7));
        assert!(back[512..].iter().all(|&b| b == 9));
    }
}
