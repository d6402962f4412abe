//! Checking that OFLAG_COPIED in the active tables says "refcount is exactly one" (QEMU's
//! `check_oflag_copied`), fixing it in place when asked.
//!
//! An L2 table is checked once per active L1 entry that points at it, as QEMU does; what a
//! table reports depends only on its contents and the stored refcounts, so a table reached
//! again replays the mismatches found the first time instead of reading and classifying its
//! entries again (a hostile L1 table may point every entry at one table). While repairing,
//! writes change what a table reads: a write forgets what was remembered of every table it
//! overlaps, or of all tables when it lands in a refcount block.

use super::classify::{classify, Kind};
use super::image::{Image, MetaGuard};
use super::ondisk::OnDisk;
use super::report::{CheckError, Findings};
use super::walk::{nonzero_entries, second_visit};
use crate::qcow2::format::entries::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COPIED,
};
use crate::storage::Storage;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

/// Most mismatches all remembered tables may hold together.
const MEMO_BUDGET: usize = 1 << 19;

/// One pass over the active tables.
struct Pass<'a> {
    st: &'a dyn Storage,
    img: &'a Image,
    repair: bool,
    what: &'static str,
    disk: OnDisk<'a>,
    guard: MetaGuard,
    l2: Vec<u8>,
    /// Tables checked once; a second check remembers the table.
    seen: HashSet<u64>,
    /// Table offset -> the (entry, stored refcount) of each mismatch, in entry order. While
    /// repairing, only tables without a mismatch (nothing written) are remembered.
    memo: BTreeMap<u64, Rc<Vec<(u64, u64)>>>,
    memo_cost: usize,
}

/// Check (and with `repair`, fix) OFLAG_COPIED on the active L1 and L2 entries against the
/// stored refcounts.
pub(crate) fn check_copied(
    st: &dyn Storage,
    img: &Image,
    repair: bool,
    f: &mut Findings,
) -> Result<(), CheckError> {
    let mut p = Pass {
        st,
        img,
        repair,
        what: if repair { "Repairing" } else { "ERROR" },
        disk: OnDisk::new(st, img),
        guard: img.meta_guard(true),
        l2: vec![0u8; img.cs as usize],
        seen: HashSet::new(),
        memo: BTreeMap::new(),
        memo_cost: 0,
    };
    for (i, l1e) in nonzero_entries(&img.l1) {
        let l2_off = l1e & L1E_OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        let Ok(rc) = p.disk.get(l2_off >> img.cb) else {
            continue;
        };
        if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
            let what = p.what;
            f.corrupt_with(|| {
                format!(
                    "{what} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                )
            });
            if repair {
                let new = if rc == 1 {
                    l1e | OFLAG_COPIED
                } else {
                    l1e & !OFLAG_COPIED
                };
                let at = img.header.l1_table_offset + 8 * i as u64;
                if let Err(e) = st.write_at(&new.to_be_bytes(), at) {
                    f.error(format!("ERROR: Could not write L1 entry: {e}"));
                    return Ok(());
                }
                p.wrote(at, 8);
                f.corruptions -= 1;
                f.corruptions_fixed += 1;
            }
        }
        if !p.table(l2_off, f) {
            return Ok(());
        }
    }
    Ok(())
}

impl Pass<'_> {
    /// Check the L2 table at `l2_off`. False when the pass must stop (a table that cannot be
    /// read or rewritten).
    fn table(&mut self, l2_off: u64, f: &mut Findings) -> bool {
        if let Some(m) = self.memo.get(&l2_off) {
            let m = Rc::clone(m);
            if f.full() {
                f.corrupt_unlisted(m.len() as u64);
            } else {
                for &(e, rc) in m.iter() {
                    f.corrupt_with(|| self.data_msg(e, rc));
                }
            }
            return true;
        }
        if let Err(e) = self.st.read_at(&mut self.l2, l2_off) {
            f.error(format!("ERROR: Could not read L2 table: {e}"));
            return false;
        }
        let cb = self.img.cb;
        let mut found = Vec::new();
        let mut dirty = 0u64;
        let mut not_a_table = false;
        for j in 0..self.l2.len() / 8 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&self.l2[8 * j..8 * j + 8]);
            let e = u64::from_be_bytes(a);
            not_a_table |= classify(e) != Kind::Compressed && e & L2E_RESERVED_MASK != 0;
            if !matches!(classify(e), Kind::Normal | Kind::ZeroAlloc) {
                continue;
            }
            let Ok(rc) = self.disk.get((e & L2E_OFFSET_MASK) >> cb) else {
                continue;
            };
            if (rc == 1) != (e & OFLAG_COPIED != 0) {
                f.corrupt_with(|| self.data_msg(e, rc));
                found.push((e, rc));
                if self.repair {
                    let new = if rc == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    self.l2[8 * j..8 * j + 8].copy_from_slice(&new.to_be_bytes());
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            return self.rewrite(l2_off, dirty, not_a_table, f);
        }
        self.remember(l2_off, found);
        true
    }

    fn data_msg(&self, e: u64, rc: u64) -> String {
        format!(
            "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
            self.what
        )
    }

    /// Write back a table whose COPIED flags were fixed in `self.l2`.
    fn rewrite(&mut self, l2_off: u64, dirty: u64, not_a_table: bool, f: &mut Findings) -> bool {
        let (cs, cb) = (self.img.cs, self.img.cb);
        // Only rewrite a table that is where a table may be: aligned, inside the file, and
        // not the header or other metadata (QEMU's overlap check does the same). And only a
        // table that looks like one: an entry with reserved bits set means this is something
        // else (guest data an L1 entry points at), which must not be written.
        if l2_off & (cs - 1) != 0
            || l2_off >= self.img.file_len
            || self.guard.hits(l2_off >> cb)
            || not_a_table
        {
            f.error(format!(
                "ERROR: Could not write L2 table at {l2_off:#x}: not a valid table location"
            ));
            return false;
        }
        if let Err(e) = self.st.write_at(&self.l2, l2_off) {
            f.error(format!("ERROR: Could not write L2 table: {e}"));
            return false;
        }
        self.wrote(l2_off, cs);
        f.corruptions -= dirty;
        f.corruptions_fixed += dirty;
        true
    }

    /// Remember what the table at `l2_off` reported (from its second check on, within budget).
    fn remember(&mut self, l2_off: u64, found: Vec<(u64, u64)>) {
        if !second_visit(&mut self.seen, l2_off) || self.memo_cost + found.len() + 1 > MEMO_BUDGET {
            return;
        }
        self.memo_cost += found.len() + 1;
        self.memo.insert(l2_off, Rc::new(found));
    }

    /// `[at, at + len)` of the file was written: forget every table that overlaps it (all of
    /// them when it is in a refcount block: the stored refcounts changed).
    fn wrote(&mut self, at: u64, len: u64) {
        let (cs, cb) = (self.img.cs, self.img.cb);
        self.disk.forget(at, len);
        let first = at >> cb;
        let last = (at + len - 1) >> cb;
        if (first..=last).any(|c| self.guard.is_refblock(c)) {
            self.memo.clear();
            return;
        }
        let stale: Vec<u64> = self
            .memo
            .range(at.saturating_sub(cs - 1)..at.saturating_add(len))
            .map(|(&k, _)| k)
            .collect();
        for k in stale {
            self.memo.remove(&k);
        }
    }
}
