//! A block device that can be switched off and on while it is served: the image handover of a
//! live migration (QMP `blockdev-set-active`). Two daemons serve the same image file, one for
//! the source VM and one for the destination; only the active one has the image open.
//!
//! While inactive, requests wait for activation (bounded by `wait_limit`, logged once per
//! inactive period) and never touch the image. Deactivating waits for every direct plan handed
//! out (its I/O runs outside the call, on an io_uring) and every call in progress, then
//! flushes and closes the inner device; dropping it releases the image and its locks.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::block::{BlockDevice, BlockError, DirectPlan, Direction};

/// How long a request waits for an inactive image to become active before it fails.
pub const DEFAULT_WAIT_LIMIT: Duration = Duration::from_secs(60);

type Inner = Arc<dyn BlockDevice>;

/// The switchable device. Its size and read-only flag are fixed (read from the image's header
/// before it is opened); an activation must bring the same.
pub struct ActiveDevice {
    /// Grows with `resize` (while active).
    capacity: AtomicU64,
    read_only: bool,
    /// The open device while active. Every call holds the read side for its duration.
    inner: RwLock<Option<Inner>>,
    /// Activation wakes the requests that wait.
    woken: (Mutex<()>, Condvar),
    /// Direct plans handed out and not ended.
    plans: AtomicU64,
    /// A deactivation is waiting for the plans to end: no new ones.
    closing: AtomicBool,
    /// A request has already logged that it waits, in this inactive period.
    warned: AtomicBool,
    wait_limit: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ActiveDevice {
    /// A device of `capacity` bytes, active with `inner` or inactive (None).
    pub fn new(capacity: u64, read_only: bool, inner: Option<Inner>) -> Self {
        ActiveDevice {
            capacity: AtomicU64::new(capacity),
            read_only,
            inner: RwLock::new(inner),
            woken: (Mutex::new(()), Condvar::new()),
            plans: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            wait_limit: DEFAULT_WAIT_LIMIT,
        }
    }

    /// How long requests wait for activation.
    pub fn set_wait_limit(&mut self, d: Duration) {
        self.wait_limit = d;
    }

    pub fn is_active(&self) -> bool {
        self.inner.read().is_ok_and(|g| g.is_some())
    }

    /// Serve `dev` from now on; requests waiting go ahead. Refused when it does not match the
    /// size and mode announced to the guest.
    pub fn activate(&self, dev: Inner) -> Result<(), BlockError> {
        let capacity = self.capacity();
        if dev.capacity() != capacity || dev.read_only() != self.read_only {
            return Err(BlockError::Io(std::io::Error::other(format!(
                "the image changed while inactive: {} bytes{}, the guest was told {} bytes{}",
                dev.capacity(),
                if dev.read_only() { " read-only" } else { "" },
                capacity,
                if self.read_only { " read-only" } else { "" },
            ))));
        }
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some(dev);
        self.warned.store(false, Ordering::Relaxed);
        let _g = lock(&self.woken.0);
        self.woken.1.notify_all();
        Ok(())
    }

    /// Stop serving: wait for the calls and direct plans in progress, flush and close the
    /// device, and return it (dropping it releases the image). Requests that arrive meanwhile
    /// wait for the next activation.
    pub fn deactivate(&self) -> Result<Option<Inner>, BlockError> {
        self.closing.store(true, Ordering::Release);
        let r = self.close_inner();
        self.closing.store(false, Ordering::Release);
        r
    }

    fn close_inner(&self) -> Result<Option<Inner>, BlockError> {
        loop {
            // The plans' I/O runs outside any call; `end_direct` takes the read side, so wait
            // for them before taking the write side. A plan made just before `closing` was
            // seen shows up under the write lock: then wait again.
            while self.plans.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if self.plans.load(Ordering::Acquire) > 0 {
                continue;
            }
            let Some(dev) = g.clone() else {
                return Ok(None);
            };
            dev.flush()?;
            dev.close()?;
            *g = None;
            return Ok(Some(dev));
        }
    }

    /// Run `f` on the active device, waiting (bounded) for an activation first.
    fn with<R>(
        &self,
        f: impl FnOnce(&dyn BlockDevice) -> Result<R, BlockError>,
    ) -> Result<R, BlockError> {
        let deadline = Instant::now() + self.wait_limit;
        loop {
            {
                let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
                if let Some(dev) = g.as_ref() {
                    return f(dev.as_ref());
                }
            }
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "a request waits for the image to become active (blockdev-set-active), \
                     at most {:?}",
                    self.wait_limit
                );
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(BlockError::Io(std::io::Error::other(format!(
                    "the image stayed inactive for {:?}",
                    self.wait_limit
                ))));
            }
            let g = lock(&self.woken.0);
            // Woken by an activation, or time to look again (an activation between the check
            // above and this wait is seen at the next look).
            let step = (deadline - now).min(Duration::from_millis(50));
            let _ = self.woken.1.wait_timeout(g, step);
        }
    }
}

impl BlockDevice for ActiveDevice {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<(), BlockError> {
        self.with(|d| d.read_vectored(offset, bufs))
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<(), BlockError> {
        self.with(|d| d.write_vectored(offset, bufs))
    }

    fn flush(&self) -> Result<(), BlockError> {
        // Nothing to flush while inactive: the deactivation flushed.
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(d) => d.flush(),
            None => Ok(()),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.with(|d| d.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.with(|d| d.write_zeroes(offset, len, unmap))
    }

    fn close(&self) -> Result<(), BlockError> {
        self.deactivate().map(|_| ())
    }

    fn plan_direct(
        &self,
        dir: Direction,
        offset: u64,
        len: u64,
    ) -> Result<Option<DirectPlan>, BlockError> {
        // Only while active and without waiting: an inactive device's requests take the
        // blocking path, which waits.
        if self.closing.load(Ordering::Acquire) {
            return Ok(None);
        }
        let Ok(g) = self.inner.try_read() else {
            return Ok(None);
        };
        let Some(dev) = g.as_ref() else {
            return Ok(None);
        };
        let plan = dev.plan_direct(dir, offset, len)?;
        if plan.is_some() {
            self.plans.fetch_add(1, Ordering::AcqRel);
        }
        Ok(plan)
    }

    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        // Not while inactive: the other daemon may have the image open, and an activation must
        // bring the size the guest was told.
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some(dev) = g.as_ref() else {
            return Err(BlockError::Invalid(
                "the image is inactive (blockdev-set-active): it cannot be resized".into(),
            ));
        };
        // The engine may fail after the new size is in the file (the dedup area, the backing
        // tail): the capacity follows the device either way, so the frontend is told and a
        // later activation finds the size it reopens.
        let r = dev.resize(new_size);
        self.capacity.store(dev.capacity(), Ordering::Release);
        r
    }

    fn end_direct(&self, seq: u64, dir: Direction, ok: bool) {
        // No deactivation holds the write side while plans are out (see `close_inner`).
        let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = g.as_ref() {
            d.end_direct(seq, dir, ok);
        }
        self.plans.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;

    #[test]
    fn requests_wait_for_activation_and_then_run() {
        let dev = Arc::new(ActiveDevice::new(1 << 20, false, None));
        let d2 = dev.clone();
        let t = std::thread::spawn(move || d2.write_vectored(0, &[IoSlice::new(&[7u8; 512])]));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "the write must wait while inactive");
        let disk = Arc::new(MemDisk::new(1 << 20, false));
        dev.activate(disk.clone()).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(&disk.contents()[..512], &[7u8; 512][..]);
    }

    #[test]
    fn an_inactive_device_fails_requests_after_the_wait_limit() {
        let mut dev = ActiveDevice::new(1 << 20, false, None);
        dev.set_wait_limit(Duration::from_millis(50));
        let mut b = [0u8; 512];
        assert!(dev
            .read_vectored(0, &mut [IoSliceMut::new(&mut b)])
            .is_err());
        assert!(matches!(dev.plan_direct(Direction::Read, 0, 512), Ok(None)));
    }

    #[test]
    fn resize_forwards_while_active_and_is_refused_while_inactive() {
        let disk: Inner = Arc::new(MemDisk::new(1 << 20, false));
        let dev = ActiveDevice::new(1 << 20, false, Some(disk));
        assert!(matches!(dev.resize(1 << 19), Err(BlockError::Invalid(_))));
        dev.resize(4 << 20).unwrap();
        assert_eq!(dev.capacity(), 4 << 20);
        dev.write_vectored((4 << 20) - 512, &[IoSlice::new(&[1u8; 512])])
            .unwrap();
        let inner = dev.deactivate().unwrap().unwrap();
        assert_eq!(inner.capacity(), 4 << 20);
        let e = dev.resize(8 << 20).unwrap_err().to_string();
        assert!(e.contains("inactive"), "{e}");
        // An activation must bring the grown size.
        assert!(dev
            .activate(Arc::new(MemDisk::new(1 << 20, false)))
            .is_err());
        dev.activate(inner).unwrap();
    }

    #[test]
    fn deactivation_closes_the_device_and_activation_checks_its_size() {
        let disk: Inner = Arc::new(MemDisk::new(1 << 20, false));
        let dev = ActiveDevice::new(1 << 20, false, Some(disk));
        assert!(dev.is_active());
        assert!(dev.deactivate().unwrap().is_some());
        assert!(!dev.is_active());
        assert!(dev.deactivate().unwrap().is_none());
        assert!(dev
            .activate(Arc::new(MemDisk::new(2 << 20, false)))
            .is_err());
        assert!(dev.activate(Arc::new(MemDisk::new(1 << 20, true))).is_err());
        assert!(dev.activate(Arc::new(MemDisk::new(1 << 20, false))).is_ok());
    }
}
