//! Discard and write-zeroes: metadata-only for whole clusters, real zeros for the partial ends.

use super::image::Qcow2;
use super::meta::frees::PENDING_FREE_LIMIT;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::L2Entry;
use std::io::IoSlice;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Discard,
    Zero { unmap: bool },
}

/// Clusters handled under one hold of the lock.
const BATCH: u64 = 4096;

impl Qcow2 {
    pub(crate) fn zero_range(&self, offset: u64, len: u64, mode: Mode) -> Result<()> {
        let r = self.note_error(self.zero_range_inner(offset, len, mode));
        if self.dedup_on && Self::records_evicted(&self.lock()) {
            self.write_evicted_records();
        }
        r
    }

    /// Discard `offset..offset + len` (whole clusters; see `Mode::Discard`).
    pub(crate) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, Mode::Discard)
    }

    /// Make `offset..offset + len` read as zeros; `unmap` lets whole clusters be freed.
    pub(crate) fn write_zeroes_range(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_range(offset, len, Mode::Zero { unmap })
    }

    fn zero_range_inner(&self, offset: u64, len: u64, mode: Mode) -> Result<()> {
        if self.read_only {
            return Err(Qcow2Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let cs = self.g.cluster_size();
        let end = offset + len;
        let first_full = offset.div_ceil(cs) * cs;
        let last_full = end / cs * cs;
        let meta_ok = match mode {
            Mode::Discard => true,
            Mode::Zero { unmap } => self.g.version >= 3 || (unmap && self.backing.is_none()),
        };
        if first_full >= last_full || !meta_ok {
            if matches!(mode, Mode::Zero { .. }) {
                self.write_zero_bytes(offset, len)?;
            }
            return Ok(());
        }
        if let Mode::Zero { .. } = mode {
            self.write_zero_bytes(offset, first_full - offset)?;
            self.write_zero_bytes(last_full, end - last_full)?;
        }
        let mut gc = first_full / cs;
        let gc_end = last_full / cs;
        let mut need = 0;
        while gc < gc_end {
            let n = (gc_end - gc).min(BATCH);
            need = need.max(self.zero_clusters(gc, gc + n, mode)?);
            gc += n;
            // Many frees waiting: flush them now, between batches, where the group commit
            // runs its last sync without the metadata lock (other queues go on meanwhile).
            if self.lock().frees_pending() > PENDING_FREE_LIMIT {
                self.flush_all()?;
            }
        }
        // A write-zeroes is a write: its entries are in the file before it returns. A discard
        // promises nothing about the content, so it need not be (its entries go out with the
        // next persister or flush; frees wait for a flush either way).
        match mode {
            Mode::Zero { .. } => self.persist(need),
            Mode::Discard => Ok(()),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.write(offset, &[IoSlice::new(&zeros[..n])])?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Returns the table change the batch depends on that is not in the file yet.
    fn zero_clusters(&self, from: u64, to: u64, mode: Mode) -> Result<u64> {
        let s = self.storage.as_ref();
        let cb = self.g.cluster_bits;
        // The L2 tables of the batch are read without the lock first.
        let m = self.load_tables(self.lock(), from << cb, (to - from) << cb)?;
        // And the dedup records it forgets.
        let mut m = self.load_records(m, from..to);
        while (from..to).any(|gc| m.allocating(gc) || m.is_held(gc)) {
            m = self.wait_cluster(m);
        }
        if m.is_corrupt() {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        let v3 = self.g.version >= 3;
        for gc in from..to {
            super::dedup::forget(&mut m, s, gc)?;
            let old = m.entry(s, gc)?;
            let new = match (mode, old) {
                (_, L2Entry::Invalid(raw)) => {
                    return Err(Qcow2Error::corrupt(format!("invalid L2 entry {raw:#x}")))
                }
                (Mode::Zero { unmap: false }, L2Entry::Normal { host, copied: true }) => {
                    L2Entry::Zero {
                        host: Some(host),
                        copied: true,
                    }
                }
                (
                    Mode::Zero { unmap: false },
                    e @ L2Entry::Zero {
                        host: Some(_),
                        copied: true,
                    },
                ) => e,
                (_, L2Entry::Unallocated | L2Entry::Zero { host: None, .. })
                    if self.backing.is_none() =>
                {
                    old
                }
                (_, L2Entry::Zero { host: None, .. }) => old,
                _ if self.backing.is_some() && v3 => L2Entry::Zero {
                    host: None,
                    copied: false,
                },
                _ => L2Entry::Unallocated,
            };
            if new != old {
                m.set_entry(s, gc, new)?;
                if new.host_cluster() != old.host_cluster() {
                    m.release(s, gc, old)?;
                }
            }
        }
        Ok(m.ack_need(from, to - 1))
    }
}
