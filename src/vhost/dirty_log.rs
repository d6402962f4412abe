//! Dirty-page logging for live migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD).
//!
//! During migration the frontend hands over a shared log (SET_LOG_BASE): one bit per 4 KiB page
//! of guest physical memory, bit `p % 8` of byte `p / 8` for page `p`. While the driver has
//! LOG_ALL on, every byte the daemon writes into guest memory must have its page's bit set, or
//! the destination gets a stale page. Writes through vm-memory (the used ring, status bytes,
//! zero fills) reach `LogBitmap::mark_dirty` by themselves; data the kernel writes (reads into
//! guest buffers through io_uring or `preadv`) is marked by the request layer when the request
//! completes, before it is published.
//!
//! Each guest memory region carries a `LogBitmap` that knows the region's guest address and the
//! connection's `DirtyLog`; with logging off a mark costs one atomic load.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// Bytes of guest memory per log bit.
pub const LOG_PAGE: u64 = 4096;

/// Why a log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot map the dirty log ({size} bytes at {offset}): {why}")]
    Map { size: u64, offset: u64, why: String },
}

/// The environment variable that switches marking off, for the migration test's control run
/// only (a migration then hands the destination stale guest pages).
pub const NO_MARKS_ENV: &str = "VUQ_TEST_NO_DIRTY_MARKS";

/// The connection's dirty log: on or off, and the shared bitmap once the frontend gave it.
#[derive(Debug, Default)]
pub struct DirtyLog {
    on: AtomicBool,
    map: RwLock<Option<MmapRegion<()>>>,
    /// Marking switched off by `NO_MARKS_ENV` (test control).
    disabled: bool,
}

impl DirtyLog {
    pub fn new() -> Arc<Self> {
        Arc::new(DirtyLog {
            disabled: std::env::var_os(NO_MARKS_ENV).is_some(),
            ..DirtyLog::default()
        })
    }

    /// Use the log in `file` (`size` bytes at `offset`), replacing any earlier one.
    pub fn set_base(&self, file: File, offset: u64, size: u64) -> Result<(), DirtyLogError> {
        let err = |why: String| DirtyLogError::Map { size, offset, why };
        if !super::sys::file_covers(&file, offset, size) {
            return Err(err("the file is shorter than the log".into()));
        }
        let len = usize::try_from(size).map_err(|e| err(e.to_string()))?;
        let map = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| err(e.to_string()))?;
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Some(map);
        Ok(())
    }

    /// Turn marking on or off (the driver's LOG_ALL feature bit).
    pub fn set_on(&self, on: bool) {
        if on && self.disabled {
            log::error!("{NO_MARKS_ENV} is set: dirty pages are NOT marked (a test control)");
        }
        self.on.store(on && !self.disabled, Ordering::Release);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Mark the pages of guest physical range `gpa .. gpa + len`.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.is_on() {
            return;
        }
        let guard = self.map.read().unwrap_or_else(|e| e.into_inner());
        let Some(map) = guard.as_ref() else {
            return;
        };
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let bytes = map.size() as u64;
        for page in first..=last {
            let byte = page / 8;
            if byte >= bytes {
                // Past the log the frontend sized: nothing it tracks.
                break;
            }
            // SAFETY: `byte` is inside the mapping, which stays mapped while `guard` is held;
            // an AtomicU8 has the size and alignment of a u8, and every access to the log
            // from this process goes through atomics (the frontend reads and clears it with
            // atomic operations of its own).
            let cell = unsafe { &*(map.as_ptr().add(byte as usize) as *const AtomicU8) };
            cell.fetch_or(1 << (page % 8), Ordering::Release);
        }
    }
}

/// What one guest memory region knows to log its writes: its guest address and the log.
#[derive(Debug, Default)]
pub struct RegionLog {
    gpa: AtomicU64,
    log: OnceLock<Arc<DirtyLog>>,
}

impl RegionLog {
    fn mark(&self, offset: usize, len: usize) {
        if let Some(log) = self.log.get() {
            log.mark(
                self.gpa
                    .load(Ordering::Relaxed)
                    .saturating_add(offset as u64),
                len as u64,
            );
        }
    }
}

impl<'a> WithBitmapSlice<'a> for RegionLog {
    type S = RefSlice<'a, RegionLog>;
}

impl Bitmap for RegionLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len);
    }

    /// Nothing reads the log back in this process (the frontend does).
    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, RegionLog> {
        RefSlice::new(self, offset)
    }
}

/// The bitmap type of the daemon's guest memory regions.
#[derive(Debug, Default, Clone)]
pub struct LogBitmap(Arc<RegionLog>);

impl LogBitmap {
    /// Log this region's writes into `log`; the region starts at guest address `gpa`.
    pub fn attach(&self, gpa: u64, log: &Arc<DirtyLog>) {
        self.0.gpa.store(gpa, Ordering::Relaxed);
        let _ = self.0.log.set(log.clone());
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = RefSlice<'a, RegionLog>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark(offset, len);
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, RegionLog> {
        // A borrow, not an Arc clone: slices are made on every guest memory access.
        RefSlice::new(&self.0, offset)
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        LogBitmap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

    fn log_file(bytes: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(bytes).unwrap();
        f
    }

    fn bits(f: &File, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    /// Writes through vm-memory mark the pages of their guest addresses, in the right region,
    /// only while logging is on.
    #[test]
    fn writes_mark_their_pages_while_logging_is_on() {
        let log = DirtyLog::new();
        let f = log_file(64);
        log.set_base(f.try_clone().unwrap(), 0, 64).unwrap();
        let mk = |gpa: u64| {
            let m = MmapRegion::<LogBitmap>::new(0x4000).unwrap();
            m.bitmap().attach(gpa, &log);
            std::sync::Arc::new(GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap())
        };
        let mem = GuestMemoryMmap::from_arc_regions(vec![mk(0), mk(0x10_000)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(bits(&f, 4), [0, 0, 0, 0], "logging off: nothing marked");
        log.set_on(true);
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        // A write across a page boundary in the second region: pages 0x11 and 0x12.
        mem.write_slice(&[7u8; 16], GuestAddress(0x11ff8)).unwrap();
        assert_eq!(bits(&f, 4), [0b10, 0, 0b110, 0]);
        log.set_on(false);
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        assert_eq!(bits(&f, 1), [0b10]);
    }

    /// Pages past the log's end are ignored, not a crash.
    #[test]
    fn marks_past_the_log_are_dropped() {
        let log = DirtyLog::new();
        let f = log_file(1);
        log.set_base(f.try_clone().unwrap(), 0, 1).unwrap();
        log.set_on(true);
        log.mark(7 * LOG_PAGE, 2 * LOG_PAGE);
        assert_eq!(bits(&f, 1), [0b1000_0000]);
    }
}
