//! A storage that passes every call to an inner one, and lets a test watch or slow chosen calls
//! (count reads, hold a read or a write in flight, record the holes punched, slow and count
//! syncs).

use std::io::{self, IoSlice, IoSliceMut};
use vhost_user_qcow2::storage::Storage;

pub type OnRead = Box<dyn Fn(u64) + Send + Sync>;
pub type OnWrite = Box<dyn Fn(&[u8], u64) + Send + Sync>;
pub type OnPunch = Box<dyn Fn(u64, u64) + Send + Sync>;
pub type OnFlush = Box<dyn Fn() + Send + Sync>;

pub struct Hooked<S> {
    pub inner: S,
    /// Before every read (one call per `readv_at`), with its offset.
    pub on_read: Option<OnRead>,
    /// After every read has returned (one call per `readv_at`), with its offset.
    pub after_read: Option<OnRead>,
    /// Before every `write_at`, with its data and offset.
    pub on_write: Option<OnWrite>,
    /// Before every `writev_at` (the plain write path's data writes), with its offset.
    pub on_writev: Option<OnRead>,
    /// Before every hole punched, with its offset and length.
    pub on_punch: Option<OnPunch>,
    /// Before every sync.
    pub on_flush: Option<OnFlush>,
    /// Pass the inner storage's `direct_fd` on (direct plans on a file).
    pub direct: bool,
}

impl<S> Hooked<S> {
    pub fn new(inner: S) -> Self {
        Hooked {
            inner,
            on_read: None,
            after_read: None,
            on_write: None,
            on_writev: None,
            on_punch: None,
            on_flush: None,
            direct: false,
        }
    }
}

impl<S: Storage> Storage for Hooked<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(f) = &self.on_read {
            f(offset);
        }
        let r = self.inner.read_at(buf, offset);
        if let Some(f) = &self.after_read {
            f(offset);
        }
        r
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(f) = &self.on_write {
            f(buf, offset);
        }
        self.inner.write_at(buf, offset)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        if let Some(f) = &self.on_read {
            f(offset);
        }
        let r = self.inner.readv_at(bufs, offset);
        if let Some(f) = &self.after_read {
            f(offset);
        }
        r
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        if let Some(f) = &self.on_writev {
            f(offset);
        }
        self.inner.writev_at(bufs, offset)
    }
    fn flush(&self) -> io::Result<()> {
        if let Some(f) = &self.on_flush {
            f();
        }
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(f) = &self.on_punch {
            f(offset, len);
        }
        self.inner.punch_hole(offset, len)
    }
    fn direct_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        if self.direct {
            self.inner.direct_fd()
        } else {
            None
        }
    }
}
