//! What of the cached L2 tables is newer in memory than in the image file, for "persist before
//! ack" (docs/design.md, "Acknowledged writes outlive the process"): before a write returns,
//! the table pieces it depends on are written into the file (no sync), so a crash of our process
//! (the host's page cache survives it) loses no write the guest saw complete.
//!
//! Tables are tracked in units of `unit` bytes (512, or the O_DIRECT alignment): the units
//! changed since the last write of the table, and those copied by the writer in flight. A table
//! that was never written (new, or a copy of a shared one) goes out whole, before its L1 entry.
//! Every change gets a sequence number; `persisted` says which of them are all in the file.
//! The pure bookkeeping lives here; `meta/persist.rs` copies and `engine/persist.rs` writes.

use super::clustermap::{ClusterMap, ClusterSet};

/// A set of units of one table.
#[derive(Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn set(&mut self, i: usize) {
        let w = i / 64;
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << (i % 64);
    }
    fn any_in(&self, lo: usize, hi: usize) -> bool {
        (lo..=hi).any(|i| self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0))
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }
    fn or(&mut self, o: &Bits) {
        if self.0.len() < o.0.len() {
            self.0.resize(o.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&o.0) {
            *a |= b;
        }
    }
    /// The set units as runs (first, count).
    fn runs(&self) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (w, &word) in self.0.iter().enumerate() {
            let mut x = word;
            while x != 0 {
                let i = w * 64 + x.trailing_zeros() as usize;
                x &= x - 1;
                match out.last_mut() {
                    Some((f, n)) if *f + *n == i => *n += 1,
                    _ => out.push((i, 1)),
                }
            }
        }
        out
    }
}

/// One table's state.
#[derive(Default)]
struct Table {
    /// Sequence number of its last change.
    seq: u64,
    /// Never written: goes out whole.
    whole: bool,
    /// Units changed and not copied yet.
    changed: Bits,
    /// Copied by the writer in flight (whole or these units).
    inflight_whole: bool,
    inflight: Bits,
}

impl Table {
    fn idle(&self) -> bool {
        !self.whole && !self.inflight_whole && self.changed.is_empty() && self.inflight.is_empty()
    }
}

/// What a persister copies: per table, whether it goes whole or as runs of units (first unit,
/// number of units).
pub(crate) struct Copy {
    pub off: u64,
    pub whole: bool,
    pub runs: Vec<(usize, usize)>,
}

/// See the module documentation.
pub(crate) struct Writeback {
    /// Record changes (persist before ack is on and the image is writable).
    pub on: bool,
    /// Bytes per tracked unit of a table.
    pub unit: u64,
    tables: ClusterMap<Table>,
    /// Sequence number of the last change.
    seq: u64,
    /// Every change up to this one is in the file.
    persisted: u64,
    /// The sequence number the writer in flight covers once it is done.
    inflight_seq: Option<u64>,
    /// New, empty tables in clusters never written before: a lost write of one reads as the
    /// empty table it is, so its L1 entry may reach the disk first.
    fresh: ClusterSet,
}

impl Writeback {
    pub(crate) fn new(on: bool, unit: u64) -> Self {
        Writeback {
            on,
            unit: unit.max(8),
            tables: ClusterMap::default(),
            seq: 0,
            persisted: 0,
            inflight_seq: None,
            fresh: ClusterSet::default(),
        }
    }

    fn bump(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Entry `idx` of the table at `off` changed.
    pub(crate) fn changed(&mut self, off: u64, idx: usize) {
        if !self.on {
            return;
        }
        let seq = self.bump();
        let unit = (idx as u64 * 8 / self.unit) as usize;
        let t = self.tables.entry(off).or_default();
        t.seq = seq;
        if !t.whole {
            t.changed.set(unit);
        }
    }

    /// A table that was never written (new, or a copy) now lives at `off`; `fresh`: an empty
    /// one in a cluster never written before.
    pub(crate) fn new_table(&mut self, off: u64, fresh: bool) {
        if !self.on {
            return;
        }
        if fresh {
            self.fresh.insert(off);
        } else {
            self.fresh.remove(&off);
        }
        let seq = self.bump();
        let t = self.tables.entry(off).or_default();
        *t = Table {
            seq,
            whole: true,
            ..Default::default()
        };
    }

    /// An L1 entry changed (it lives in `Meta::l1_dirty`; the next persister writes it).
    pub(crate) fn l1_changed(&mut self) {
        if self.on {
            self.bump();
        }
    }

    /// The change a write that depends on entries `lo..=hi` of the table at `off` must see in
    /// the file before it returns (0: none).
    pub(crate) fn need(&self, off: u64, lo: usize, hi: usize) -> u64 {
        let Some(t) = self.tables.get(&off) else {
            return 0;
        };
        let (ulo, uhi) = (
            (lo as u64 * 8 / self.unit) as usize,
            (hi as u64 * 8 / self.unit) as usize,
        );
        let pending = t.whole
            || t.inflight_whole
            || t.changed.any_in(ulo, uhi)
            || t.inflight.any_in(ulo, uhi);
        if pending {
            t.seq
        } else {
            0
        }
    }

    /// True when the table at `off` is a new, empty one in a cluster never written before (see
    /// `fresh`). Forgotten once its L1 entry is in the file.
    pub(crate) fn fresh(&self, off: u64) -> bool {
        self.fresh.contains(&off)
    }

    /// The L1 entry of the fresh table at `off` is in the file.
    pub(crate) fn linked(&mut self, off: u64) {
        self.fresh.remove(&off);
    }

    /// True when every change up to `seq` is in the file.
    pub(crate) fn covered(&self, seq: u64) -> bool {
        self.persisted >= seq
    }

    /// True while a persister's copy of the table at `off` is on its way to the file: nothing
    /// else may write the table meanwhile (its older copy would land after).
    pub(crate) fn inflight(&self, off: u64) -> bool {
        self.tables
            .get(&off)
            .is_some_and(|t| t.inflight_whole || !t.inflight.is_empty())
    }

    /// Tables with changes not copied yet, in no particular order.
    pub(crate) fn pending(&self) -> Vec<u64> {
        self.tables
            .iter()
            .filter(|(_, t)| t.whole || !t.changed.is_empty())
            .map(|(&k, _)| k)
            .collect()
    }

    /// A persister copies every change up to now: they move to in flight. Returns what to copy
    /// for each pending table.
    pub(crate) fn take(&mut self) -> Vec<Copy> {
        self.inflight_seq = Some(self.seq);
        let mut out = Vec::new();
        for (&off, t) in self.tables.iter_mut() {
            if t.whole {
                t.whole = false;
                t.inflight_whole = true;
                t.changed = Bits::default();
                out.push(Copy {
                    off,
                    whole: true,
                    runs: Vec::new(),
                });
            } else if !t.changed.is_empty() {
                let c = std::mem::take(&mut t.changed);
                out.push(Copy {
                    off,
                    whole: false,
                    runs: c.runs(),
                });
                t.inflight.or(&c);
            }
        }
        out
    }

    /// A table left the cache (or the persister found it gone): nothing to copy from any more.
    pub(crate) fn forget(&mut self, off: u64) {
        self.tables.remove(&off);
    }

    /// The persister's writes are done (`ok`) or failed (the copied changes are pending again).
    /// Returns the tables with nothing left to write.
    pub(crate) fn done(&mut self, ok: bool) -> Vec<u64> {
        let seq = self.inflight_seq.take().unwrap_or(0);
        let mut idle = Vec::new();
        for (&off, t) in self.tables.iter_mut() {
            if ok {
                t.inflight_whole = false;
                t.inflight = Bits::default();
            } else {
                t.whole |= std::mem::take(&mut t.inflight_whole);
                let c = std::mem::take(&mut t.inflight);
                t.changed.or(&c);
            }
            if t.idle() {
                idle.push(off);
            }
        }
        for off in &idle {
            self.tables.remove(off);
        }
        if ok {
            self.persisted = self.persisted.max(seq);
        }
        idle
    }

    /// A flush wrote the whole table at `off`.
    pub(crate) fn written(&mut self, off: u64) {
        if let Some(t) = self.tables.get_mut(&off) {
            t.whole = false;
            t.changed = Bits::default();
            if t.idle() {
                self.tables.remove(&off);
            }
        }
    }

    /// A flush wrote every dirty table and L1 entry, with no persister in flight: every change
    /// so far is in the file.
    pub(crate) fn all_written(&mut self) {
        if self.inflight_seq.is_none() {
            self.tables.clear();
            self.persisted = self.seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_covered_once_their_copy_is_written() {
        let mut w = Writeback::new(true, 512);
        w.changed(0x10000, 3);
        w.changed(0x10000, 70); // unit 1
        let need = w.need(0x10000, 3, 3);
        assert!(need > 0);
        assert_eq!(w.need(0x10000, 200, 200), 0, "another unit of the table");
        assert_eq!(w.need(0x20000, 3, 3), 0, "another table");
        let c = w.take();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].runs, vec![(0, 2)]);
        assert!(w.inflight(0x10000));
        // A change after the copy: not covered by this writer.
        w.changed(0x10000, 4);
        let later = w.need(0x10000, 4, 4);
        assert!(later > need);
        assert_eq!(w.done(true), Vec::<u64>::new());
        assert!(w.covered(need) && !w.covered(later));
        assert!(!w.inflight(0x10000));
        let c = w.take();
        assert_eq!(c[0].runs, vec![(0, 1)]);
        assert_eq!(w.done(true), vec![0x10000]);
        assert!(w.covered(later));
        assert_eq!(w.need(0x10000, 4, 4), 0);
    }

    #[test]
    fn a_failed_write_leaves_its_changes_pending_and_new_tables_go_whole() {
        let mut w = Writeback::new(true, 512);
        w.new_table(0x30000, true);
        assert!(w.fresh(0x30000));
        w.changed(0x30000, 9);
        let c = w.take();
        assert!(c[0].whole);
        w.done(false);
        assert!(w.need(0x30000, 500, 500) > 0, "still never written");
        let c = w.take();
        assert!(c[0].whole);
        w.done(true);
        assert_eq!(w.need(0x30000, 9, 9), 0);
        w.changed(0x30000, 1);
        w.written(0x30000);
        assert!(w.pending().is_empty());
    }

    #[test]
    fn off_records_nothing() {
        let mut w = Writeback::new(false, 512);
        w.changed(0x10000, 1);
        w.new_table(0x20000, true);
        assert!(!w.fresh(0x20000));
        assert_eq!(w.need(0x10000, 1, 1), 0);
        assert_eq!(w.need(0x20000, 1, 1), 0);
        assert!(w.take().is_empty());
    }
}
