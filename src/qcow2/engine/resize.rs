//! Growing a served disk (QMP `block_resize`; docs/design.md, "Growing the disk").
//!
//! Grow only: QEMU's `block_resize` may shrink, but a shrink drops guest data, and a guest
//! that is told its disk got smaller has usually not agreed to lose its end first. The new
//! size must be a multiple of 512 bytes (QEMU refuses others too: the virtio capacity counts
//! 512-byte sectors).

use super::dedup::lifecycle;
use super::image::Qcow2;
use crate::qcow2::error::{Qcow2Error, Result};
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Grow the virtual disk to `new_size` bytes. The same size does nothing; a smaller one,
    /// one that is not a multiple of 512, a read-only or corrupt image are refused. Requests
    /// go on meanwhile: the metadata lock is held while the L1 table grows and the header
    /// changes (a few syncs), and requests past the old end are accepted only once the new
    /// size is in the file.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Qcow2Error::Invalid("the image is closed".into()));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Qcow2Error::Invalid(format!(
                "the new size {new_size} is not a multiple of 512 bytes"
            )));
        }
        let old = self.size();
        check_growth(old, new_size)?;
        if new_size == old {
            return Ok(());
        }
        if self.header.nb_snapshots > 0 {
            // Each snapshot must keep its own size (the snapshot table's disk-size field), which
            // this engine does not maintain. (Snapshots cannot be made while we serve.)
            return Err(Qcow2Error::Invalid(format!(
                "the image has {} internal snapshots: grow it offline with qemu-img resize",
                self.header.nb_snapshots
            )));
        }
        // Most of what is unwritten goes out now, without the metadata lock: less to do under it.
        self.flush_all()?;
        let s = self.storage.as_ref();
        let t0 = std::time::Instant::now();
        let r = {
            let _wb = self.wb_lock();
            let mut m = self.lock();
            if m.is_corrupt() {
                return Err(Qcow2Error::MarkedCorrupt);
            }
            let old = m.size;
            check_growth(old, new_size)?;
            if new_size == old {
                return Ok(());
            }
            m.grow(s, new_size).and_then(|()| {
                // From here on the image has the new size whatever follows: the guest may use it.
                self.size.store(new_size, Ordering::Release);
                lifecycle::grow(s, &mut m, new_size)
            })
        };
        self.note_error(r)?;
        log::info!(
            "disk grown from {old} to {new_size} bytes ({:.2?} under the metadata lock)",
            t0.elapsed()
        );
        self.hide_backing_tail(old, new_size)
    }

    /// A backing file larger than the old size would show through in the new area: zero it
    /// (QEMU does the same on growth). Nobody was told about the new size yet.
    fn hide_backing_tail(&self, old: u64, new_size: u64) -> Result<()> {
        let Some(b) = self.backing.as_ref() else {
            return Ok(());
        };
        let end = b.capacity().min(new_size);
        if end <= old {
            return Ok(());
        }
        self.write_zeroes_range(old, end - old, false)?;
        self.flush_all()
    }
}

fn check_growth(old: u64, new_size: u64) -> Result<()> {
    if new_size < old {
        return Err(Qcow2Error::Invalid(format!(
            "shrinking is not supported: the disk has {old} bytes, {new_size} were asked"
        )));
    }
    Ok(())
}
