//! Direct plans: reads of allocated or zero clusters and in-place writes of clusters with
//! refcount 1, mapped under the lock and then run by the caller on the image file itself (the
//! request layer's io_uring). Everything else (allocation, COW, compressed clusters, a backing
//! file, dedup) answers `None` and takes the engine's own path.
//!
//! A plan is registered as an I/O in flight (`Meta::begin_io`) like the engine's own reads and
//! writes, so frees and dedup verifiers wait for it; `end_direct` ends it.

use super::image::Qcow2;
use super::io::Src;
use crate::block::{DirectPlan, DirectSeg, Direction};
use crate::qcow2::error::Result;
use crate::qcow2::format::L2Entry;

impl Qcow2 {
    /// See `BlockDevice::plan_direct`.
    pub(crate) fn plan_direct_io(
        &self,
        dir: Direction,
        offset: u64,
        len: u64,
    ) -> Result<Option<DirectPlan>> {
        let Some((fd, align)) = self.storage.direct_fd() else {
            return Ok(None);
        };
        if dir == Direction::Write && (self.read_only || self.dedup_on) {
            return Ok(None);
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let mut m = self.load_tables(self.lock(), offset, len)?;
        let segs = match dir {
            Direction::Read => {
                let mut segs = Vec::new();
                for (buf_off, n, src) in self.map_read(&mut m, offset, len)? {
                    let host = match src {
                        Src::Data(h) => Some(h),
                        Src::Zero => None,
                        Src::Backing(_) | Src::Compressed { .. } => return Ok(None),
                    };
                    segs.push(DirectSeg {
                        buf_off: buf_off as u64,
                        len: n as u64,
                        host,
                    });
                }
                segs
            }
            Direction::Write => {
                if m.is_corrupt() {
                    return Ok(None);
                }
                let s = self.storage.as_ref();
                let cb = self.g.cluster_bits;
                let mut segs: Vec<DirectSeg> = Vec::new();
                for c in super::iov::chunks(offset, len, cb) {
                    let L2Entry::Normal { host, copied: true } = m.entry(s, c.gc)? else {
                        return Ok(None);
                    };
                    let h = host.0 + c.in_off;
                    match segs.last_mut() {
                        Some(DirectSeg {
                            len: l,
                            host: Some(prev),
                            ..
                        }) if *prev + *l == h => *l += c.n,
                        _ => segs.push(DirectSeg {
                            buf_off: c.buf_off as u64,
                            len: c.n,
                            host: Some(h),
                        }),
                    }
                }
                // An entry another writer linked and has not written into the file yet: the
                // engine's path writes it before this write completes (persist before ack).
                if m.ack_need(offset >> cb, (offset + len - 1) >> cb) != 0 {
                    return Ok(None);
                }
                // No data write may land on metadata: the engine's path finds the overlap
                // again and marks the image corrupt.
                for seg in &segs {
                    if m.rc.guard(seg.host.unwrap_or(0), seg.len, 0).is_err() {
                        return Ok(None);
                    }
                }
                segs
            }
        };
        let seq = m.begin_io();
        Ok(Some(DirectPlan {
            fd,
            align,
            segs,
            seq,
        }))
    }

    /// See `BlockDevice::end_direct`.
    pub(crate) fn end_direct_io(&self, seq: u64, dir: Direction, _ok: bool) {
        let mut m = self.lock();
        let wake = m.end_io(seq);
        if dir == Direction::Write {
            // The data is in the file (or failed half way): the next flush must sync it.
            m.note_change();
        }
        drop(m);
        if wake {
            self.cond.notify_all();
        }
    }
}
