//! In-memory storage, for unit tests.

use super::traits::Storage;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// A growable byte vector behind a mutex.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// Storage holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemStorage {
            data: Mutex::new(data),
        }
    }
    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another test thread panicked; the bytes are still valid.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .and_then(|e| usize::try_from(e).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.lock();
        let end = end_of(offset, buf.len())?;
        let start = offset as usize;
        buf.fill(0);
        if start < d.len() {
            let avail = end.min(d.len()) - start;
            buf[..avail].copy_from_slice(&d[start..start + avail]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        let end = end_of(offset, buf.len())?;
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length overflow"))?;
        self.lock().resize(len, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        let start = (offset as usize).min(d.len());
        let end = (offset.saturating_add(len) as usize).min(d.len());
        d[start..end].fill(0);
        Ok(())
    }
}
