//! In-memory storage, for unit tests and fuzzing.

use super::traits::Storage;
use std::io;
use std::sync::{Mutex, MutexGuard};

/// A growable byte vector behind a mutex, optionally capped in size.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
    /// Writes and `set_len` that would make the storage longer than this fail with an I/O
    /// error instead of allocating (an image may point at clusters far past its end).
    cap: Option<u64>,
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
            cap: None,
        }
    }
    /// Storage holding `data` that refuses to grow past `cap` bytes (it may start larger).
    pub fn with_cap(data: Vec<u8>, cap: u64) -> Self {
        MemStorage {
            data: Mutex::new(data),
            cap: Some(cap),
        }
    }
    /// Fails when growing to `end` bytes would pass the cap.
    fn check_cap(&self, cur: usize, end: u64) -> io::Result<()> {
        match self.cap {
            Some(cap) if end > cur as u64 && end > cap => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "in-memory storage would grow past its cap",
            )),
            _ => Ok(()),
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
            self.check_cap(d.len(), end as u64)?;
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
        let mut d = self.lock();
        self.check_cap(d.len(), len as u64)?;
        d.resize(len, 0);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_storage_refuses_to_grow_past_its_cap() {
        let s = MemStorage::with_cap(vec![1; 100], 4096);
        s.write_at(&[2; 96], 4000).unwrap();
        assert_eq!(s.len().unwrap(), 4096);
        assert!(s.write_at(&[3], 4096).is_err());
        assert!(s.write_at(&[3], u64::MAX / 2).is_err());
        assert!(s.set_len(4097).is_err());
        assert!(s.set_len(1 << 40).is_err());
        assert_eq!(s.len().unwrap(), 4096);
        // Writes inside it and shrinking still work.
        s.write_at(&[4; 10], 0).unwrap();
        s.set_len(10).unwrap();
        assert_eq!(s.snapshot(), vec![4; 10]);
        // Storage that starts past its cap may be written inside but not grown.
        let big = MemStorage::with_cap(vec![0; 200], 100);
        big.write_at(&[1; 10], 150).unwrap();
        assert!(big.set_len(201).is_err());
        big.set_len(200).unwrap();
    }
}
