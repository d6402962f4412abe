//! The inflight region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, for split rings.
//!
//! The frontend (QEMU) asks the backend for a shared memory file once (GET_INFLIGHT_FD), keeps
//! it across reconnects and hands it back on every start (SET_INFLIGHT_FD); it never reads it.
//! The backend records in it, per queue and per descriptor head, which requests it has taken
//! from the available ring and not yet put in the used ring, with the order it took them in. A
//! backend that starts after its predecessor died reads the region to find the requests the
//! guest still waits for and runs them again, oldest first.
//!
//! Layout of one queue's part (`queue_region_size` bytes, consecutive per queue), host endian:
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | features: u64 |
//! | 8 | version: u16 (1) |
//! | 10 | desc_num: u16 |
//! | 12 | last_batch_head: u16 |
//! | 14 | used_idx: u16 |
//! | 16 + 16 i | descriptor i: inflight u8, 5 bytes padding, next u16, counter u64 |
//!
//! Completing one request is three steps around the used-ring update: `before_used` names the
//! head in `last_batch_head`, the used ring gets the element and its index moves, then
//! `after_used` clears the head's flag and copies the ring's used index. A death between the
//! ring update and `after_used` shows at the next start as a region `used_idx` behind the
//! ring's: the head in `last_batch_head` is then done and its flag is stale.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// The only layout version defined.
pub const VERSION: u16 = 1;
const HEADER_SIZE: usize = 16;
const DESC_SIZE: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes of one queue's part for a queue of `queue_size` descriptors (64-byte aligned).
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_SIZE + DESC_SIZE * usize::from(queue_size)).next_multiple_of(64)
}

/// Bytes of the whole region.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

/// Offset of descriptor `head`'s entry inside its queue's part.
fn desc_offset(head: u16) -> usize {
    HEADER_SIZE + DESC_SIZE * usize::from(head)
}

/// Why a region cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightFdError {
    #[error("inflight region of {size} bytes is too small for {queues} queues of {queue_size}")]
    TooSmall {
        size: u64,
        queues: u16,
        queue_size: u16,
    },
    #[error("inflight region with no queues or empty queues")]
    Empty,
    #[error("cannot map the inflight region: {0}")]
    Map(String),
    #[error("cannot create the inflight region: {0}")]
    Create(io::Error),
}

/// The mapped region, shared by the queues.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

/// What a queue's part says at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads taken and not completed, oldest first.
    pub heads: Vec<u16>,
    /// The counter the next request taken gets.
    pub next_counter: u64,
}

impl InflightRegion {
    /// A new zeroed region in a memory file (to hand to the frontend), every queue's header
    /// initialized.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightFdError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightFdError::Empty);
        }
        let size = region_size(num_queues, queue_size);
        let file = memfd("vuq-inflight").map_err(InflightFdError::Create)?;
        file.set_len(size as u64).map_err(InflightFdError::Create)?;
        let dup = file.try_clone().map_err(InflightFdError::Create)?;
        let region = Self::map(dup, 0, size as u64, num_queues, queue_size)?;
        for q in 0..num_queues {
            if let Some(s) = region.queue_slice(q) {
                let _ = s.write_obj(VERSION, OFF_VERSION);
                let _ = s.write_obj(queue_size, OFF_DESC_NUM);
            }
        }
        Ok((region, file))
    }

    /// Map the region the frontend handed over.
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightFdError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightFdError::Empty);
        }
        let need = region_size(num_queues, queue_size) as u64;
        if size < need {
            return Err(InflightFdError::TooSmall {
                size,
                queues: num_queues,
                queue_size,
            });
        }
        if !super::sys::file_covers(&file, offset, size) {
            return Err(InflightFdError::Map(format!(
                "the file is shorter than {size} bytes at offset {offset}"
            )));
        }
        let len = usize::try_from(size).map_err(|e| InflightFdError::Map(e.to_string()))?;
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| InflightFdError::Map(e.to_string()))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_slice(&self, q: u16) -> Option<VolatileSlice<'_, ()>> {
        if q >= self.num_queues {
            return None;
        }
        let part = queue_region_size(self.queue_size);
        self.map.get_slice(usize::from(q) * part, part).ok()
    }

    /// Queue `q`'s part, or None past the region's queues.
    pub fn queue(self: &Arc<Self>, q: u16) -> Option<InflightQueue> {
        (q < self.num_queues).then(|| InflightQueue {
            region: self.clone(),
            q,
        })
    }
}

/// One queue's part of the region. The region stays mapped while a queue uses it.
#[derive(Debug, Clone)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    q: u16,
}

impl InflightQueue {
    fn slice(&self) -> Option<VolatileSlice<'_, ()>> {
        self.region.queue_slice(self.q)
    }

    /// Heads this part can track.
    pub fn desc_num(&self) -> u16 {
        self.region.queue_size
    }

    /// Record that request `head` was taken as the `counter`-th: the counter first, then the
    /// flag, so a flagged entry always has its counter.
    pub fn taken(&self, head: u16, counter: u64) {
        let (Some(s), true) = (self.slice(), head < self.desc_num()) else {
            return;
        };
        let at = desc_offset(head);
        let _ = s.write_obj(counter, at + DESC_OFF_COUNTER);
        fence(Ordering::Release);
        let _ = s.write_obj(1u8, at + DESC_OFF_INFLIGHT);
    }

    /// About to put `head` in the used ring.
    pub fn before_used(&self, head: u16) {
        if let Some(s) = self.slice() {
            let _ = s.write_obj(head, OFF_LAST_BATCH_HEAD);
            fence(Ordering::Release);
        }
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        let (Some(s), true) = (self.slice(), head < self.desc_num()) else {
            return;
        };
        fence(Ordering::Release);
        let _ = s.write_obj(0u8, desc_offset(head) + DESC_OFF_INFLIGHT);
        fence(Ordering::Release);
        let _ = s.write_obj(used_idx, OFF_USED_IDX);
    }

    /// At a queue's start, with the used ring's index `ring_used_idx`: finish the last
    /// completion a dead predecessor may have left half recorded, and list what it left in
    /// flight, oldest first. Leaves the region agreeing with the ring.
    pub fn recover(&self, ring_used_idx: u16) -> Recovery {
        let Some(s) = self.slice() else {
            return Recovery {
                heads: Vec::new(),
                next_counter: 0,
            };
        };
        let used: u16 = s.read_obj(OFF_USED_IDX).unwrap_or(ring_used_idx);
        if used != ring_used_idx {
            // The ring moved past the last recorded completion: its head is done.
            let last: u16 = s.read_obj(OFF_LAST_BATCH_HEAD).unwrap_or(u16::MAX);
            if last < self.desc_num() {
                let _ = s.write_obj(0u8, desc_offset(last) + DESC_OFF_INFLIGHT);
            }
            fence(Ordering::Release);
            let _ = s.write_obj(ring_used_idx, OFF_USED_IDX);
        }
        let mut taken: Vec<(u64, u16)> = (0..self.desc_num())
            .filter(|&h| s.read_obj::<u8>(desc_offset(h) + DESC_OFF_INFLIGHT).ok() == Some(1))
            .map(|h| {
                let c = s
                    .read_obj::<u64>(desc_offset(h) + DESC_OFF_COUNTER)
                    .unwrap_or(0);
                (c, h)
            })
            .collect();
        taken.sort_unstable();
        let next_counter = taken.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovery {
            heads: taken.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }

    /// The version and descriptor count the part's header claims.
    pub fn header(&self) -> (u16, u16) {
        match self.slice() {
            Some(s) => (
                s.read_obj(OFF_VERSION).unwrap_or(0),
                s.read_obj(OFF_DESC_NUM).unwrap_or(0),
            ),
            None => (0, 0),
        }
    }
}

/// A memory file, closed on exec.
fn memfd(name: &str) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the result is
    // checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by memfd_create and is owned by nothing else.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_sizes() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(region_size(2, 128), 4224);
        assert_eq!(desc_offset(0), 16);
        assert_eq!(desc_offset(3), 64);
    }

    #[test]
    fn a_new_region_has_headers_and_nothing_in_flight() {
        let (r, f) = InflightRegion::create(2, 8).unwrap();
        assert_eq!(f.metadata().unwrap().len(), region_size(2, 8) as u64);
        let r = Arc::new(r);
        let q = r.queue(1).unwrap();
        assert_eq!(q.header(), (VERSION, 8));
        assert_eq!(
            q.recover(0),
            Recovery {
                heads: vec![],
                next_counter: 0
            }
        );
        assert!(r.queue(2).is_none());
    }

    /// A second mapping of the same file (the next daemon) sees what the first recorded:
    /// requests completed out of order leave the others, resubmitted in the order taken.
    #[test]
    fn a_successor_resubmits_in_the_order_taken() {
        let (r, f) = InflightRegion::create(1, 8).unwrap();
        let r = Arc::new(r);
        let q = r.queue(0).unwrap();
        for (counter, head) in [5u16, 2, 7, 0].into_iter().enumerate() {
            q.taken(head, counter as u64);
        }
        // 7 then 5 complete.
        q.before_used(7);
        q.after_used(7, 1);
        q.before_used(5);
        q.after_used(5, 2);
        let size = f.metadata().unwrap().len();
        let next = Arc::new(InflightRegion::map(f, 0, size, 1, 8).unwrap());
        let rec = next.queue(0).unwrap().recover(2);
        assert_eq!(rec.heads, vec![2, 0]);
        assert_eq!(rec.next_counter, 4);
    }

    /// Death after the used ring moved but before the flag was cleared: the head is done.
    #[test]
    fn the_last_batch_fix_up_drops_a_completed_head() {
        let (r, _f) = InflightRegion::create(1, 8).unwrap();
        let r = Arc::new(r);
        let q = r.queue(0).unwrap();
        q.taken(3, 0);
        q.taken(4, 1);
        q.before_used(3);
        // The ring's used index is 1 now, the region still says 0.
        let rec = q.recover(1);
        assert_eq!(rec.heads, vec![4]);
        // The fix-up is written back: a second start agrees.
        assert_eq!(q.recover(1).heads, vec![4]);
        // Without the ring having moved, the head stays in flight.
        q.taken(3, 2);
        q.before_used(3);
        assert_eq!(q.recover(1).heads, vec![4, 3]);
    }

    #[test]
    fn a_region_too_small_is_refused() {
        let (_r, f) = InflightRegion::create(1, 8).unwrap();
        assert!(matches!(
            InflightRegion::map(f, 0, 64, 2, 8),
            Err(InflightFdError::TooSmall { .. })
        ));
    }
}
