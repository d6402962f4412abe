//! Counting references: what the refcount of every host cluster should be, computed from the
//! header, the active and snapshot L1/L2 tables, the snapshot table, the refcount table and
//! blocks, the crypto header and (when their autoclear bit is set) the bitmaps. Mirrors QEMU's
//! `calculate_refcounts` and its classification of what is corrupt.

use super::image::{read_table, Image, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use super::l2memo::{exceed_msg, exceeds, Ev, L2Memo};
use super::refarray::RefArray;
use super::report::{CheckError, EntryFix, Findings, FixReason, Progress};
use crate::qcow2::format::entries::{L1E_OFFSET_MASK, L1E_RESERVED_MASK, OFLAG_ZERO};
use crate::qcow2::format::refblock::max_refcount;
use crate::storage::Storage;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Most entries all cached [`L2Memo`]s may hold together (a few MiB).
const MEMO_BUDGET: usize = 1 << 19;
/// Most table offsets remembered as visited once (8 MiB or so): past it, tables not seen yet
/// are never memoized (they only cost time, as they did before memoization).
const SEEN_CAP: usize = 1 << 19;

/// Most clusters with put-off single increments (a few MiB): then they are applied.
const DELTA_CAP: usize = 1 << 16;

/// True when `off` was seen before; else remembers it (while `seen` is under [`SEEN_CAP`]).
pub(crate) fn second_visit(seen: &mut HashSet<u64>, off: u64) -> bool {
    if seen.contains(&off) {
        return true;
    }
    if seen.len() < SEEN_CAP {
        seen.insert(off);
    }
    false
}

/// Reference counting over one image.
///
/// Counts are exact in `refs` except for increments put off: visits of a memoized L2 table
/// that cannot produce a message are only noted in `pending` (table -> visits), and once the
/// message list is full, single increments go to `delta`. Saturating increments commute, so
/// applying them later (`flush`) gives the same counts and the same number of overflows; the
/// messages that are kept come in the same order as a visit-by-visit walk gives them.
pub(crate) struct Walker<'a> {
    st: &'a dyn Storage,
    img: &'a Image,
    pub refs: RefArray,
    pub f: Findings,
    refmax: u64,
    l2buf: Vec<u8>,
    /// L2 tables whose entry fixes are recorded already: a table reached again (from another
    /// L1 entry or a snapshot) adds no second copy of them, so the list stays bounded by the
    /// file, whatever the L1 tables say.
    fixed_tables: HashSet<u64>,
    /// L2 tables visited once; a second visit memoizes the table.
    seen: HashSet<u64>,
    memos: HashMap<u64, Rc<L2Memo>>,
    memo_cost: usize,
    /// Put-off visits of memoized tables; the latest run of visits of one table is counted
    /// in `pending_run` first.
    pending: HashMap<u64, u64>,
    pending_run: (u64, u64),
    /// The table memoized last looked up.
    last: Option<(u64, Rc<L2Memo>)>,
    /// Put-off single increments (only while the message list is full).
    delta: HashMap<u64, u64>,
    /// The largest count in `refs`.
    max: u64,
    /// The most the put-off increments may add to any one cluster.
    put_off: u64,
}

impl<'a> Walker<'a> {
    pub fn new(st: &'a dyn Storage, img: &'a Image) -> Self {
        Walker {
            st,
            img,
            refs: RefArray::new(img.nb_clusters),
            f: Findings::default(),
            refmax: max_refcount(img.header.refcount_order),
            l2buf: vec![0u8; img.cs as usize],
            fixed_tables: HashSet::new(),
            seen: HashSet::new(),
            memos: HashMap::new(),
            memo_cost: 0,
            pending: HashMap::new(),
            pending_run: (0, 0),
            last: None,
            delta: HashMap::new(),
            max: 0,
            put_off: 0,
        }
    }

    /// Count one reference to every cluster of `[offset, offset + size)`. Returns false (and
    /// reports a corruption) when the region ends a cluster or more past the end of the file.
    fn inc(&mut self, offset: u64, size: u64) -> bool {
        if size == 0 {
            return true;
        }
        if exceeds(self.img, offset, size) {
            self.f.corrupt_with(|| exceed_msg(offset, size));
            return false;
        }
        let cb = self.img.cb;
        for k in (offset >> cb)..=((offset + size - 1) >> cb) {
            self.inc_cluster(k);
        }
        true
    }

    fn inc_cluster(&mut self, k: u64) {
        // With increments put off, `refs` may be short by up to `put_off`: exact enough
        // unless the true count could have reached the maximum.
        if self.put_off > 0 && self.max.saturating_add(self.put_off) >= self.refmax {
            if self.f.full() {
                *self.delta.entry(k).or_insert(0) += 1;
                self.put_off = self.put_off.saturating_add(1);
                if self.delta.len() >= DELTA_CAP {
                    self.flush();
                }
                return;
            }
            self.flush();
        }
        let r = self.refs.get(k);
        if r >= self.refmax {
            let cb = self.img.cb;
            self.f
                .corrupt_with(|| format!("ERROR: overflow cluster offset={:#x}", k << cb));
            return;
        }
        self.refs.set(k, r + 1);
        self.max = self.max.max(r + 1);
    }

    /// Add `n` references to cluster `k` at once, saturating (overflows are counted: this
    /// only runs for increments put off when they could not produce a listed message).
    fn add(&mut self, k: u64, n: u64) {
        let r = self.refs.get(k);
        let total = r.saturating_add(n);
        let new = total.min(self.refmax.max(r));
        self.refs.set(k, new);
        self.max = self.max.max(new);
        self.f.corrupt_unlisted(total - new);
    }

    /// Apply every increment put off, making `refs` exact.
    fn flush(&mut self) {
        let (off, n) = std::mem::take(&mut self.pending_run);
        if n > 0 {
            *self.pending.entry(off).or_insert(0) += n;
        }
        for (off, visits) in std::mem::take(&mut self.pending) {
            if let Some(m) = self.memos.get(&off).cloned() {
                for &(k, n) in &m.clusters {
                    self.add(k, n.saturating_mul(visits));
                }
            }
        }
        for (k, n) in std::mem::take(&mut self.delta) {
            self.add(k, n);
        }
        self.put_off = 0;
    }

    /// Count everything. With `refstruct` false the refcount table and blocks are left out
    /// (that is what a rebuild needs: the new structure replaces them).
    pub fn run(&mut self, refstruct: bool, p: &mut Progress<'_>) -> Result<(), CheckError> {
        let img = self.img;
        self.inc(0, img.cs);
        self.walk_l1(img.header.l1_table_offset, img.header.l1_size, true, p)?;
        for sn in &img.snapshots {
            if sn.l1_table_offset & (img.cs - 1) != 0 {
                self.f.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if sn.l1_size as u64 > super::image::MAX_L1_BYTES / 8 {
                self.f.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.walk_l1(sn.l1_table_offset, sn.l1_size, false, p)?;
        }
        self.inc(img.header.snapshots_offset, img.snapshots_size);
        if refstruct {
            self.inc(img.header.refcount_table_offset, img.reftable_entries * 8);
        }
        if let Some((off, len)) = img.crypto {
            self.inc(off, len);
        }
        self.walk_bitmaps()?;
        // The refcount block check reads counts: they must be exact from here on.
        self.flush();
        if refstruct {
            self.walk_refblocks();
        }
        Ok(())
    }

    fn walk_l1(
        &mut self,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        p: &mut Progress<'_>,
    ) -> Result<(), CheckError> {
        if l1_size == 0 {
            return Ok(());
        }
        let img = self.img;
        self.inc(l1_off, l1_size as u64 * 8);
        // The active table is in memory already (`Image::l1`); a snapshot's is read.
        let read;
        let l1: &[u64] = if active && l1_off == img.header.l1_table_offset {
            &img.l1
        } else {
            read = read_table(self.st, l1_off, l1_size as u64, img.file_len)?;
            &read
        };
        // Entries past the end of the file read as zero: nothing to walk.
        p.tick(l1_size as u64 - l1.len() as u64);
        let mut ticked = 0;
        for (i, e) in nonzero_entries(l1) {
            p.tick((i + 1 - ticked) as u64);
            ticked = i + 1;
            if e & L1E_RESERVED_MASK != 0 {
                self.f
                    .corrupt_with(|| format!("ERROR found L1 entry with reserved bits set: {e:x}"));
            }
            let l2 = e & L1E_OFFSET_MASK;
            let counted = self.inc(l2, img.cs);
            if !counted {
                // The L2 table lies past the end of the file: it reads as zeros, so the entry
                // means nothing and repair may drop it.
                self.f.fixes.push(EntryFix {
                    at: l1_off + 8 * i as u64,
                    value: 0,
                    in_l2: false,
                    why: FixReason::L1PastEnd { index: i, l2 },
                });
            }
            if l2 & (img.cs - 1) != 0 {
                self.f.corrupt_with(|| {
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    )
                });
            }
            self.walk_l2(l2, active)?;
        }
        p.tick((l1.len() - ticked) as u64);
        Ok(())
    }

    /// One visit of the L2 table at `l2_off` (from an L1 entry of an active or snapshot table).
    fn walk_l2(&mut self, l2_off: u64, active: bool) -> Result<(), CheckError> {
        // Hostile L1 tables point runs of entries at one table: look the last one up first.
        let hit = match &self.last {
            Some((off, m)) if *off == l2_off => Some(Rc::clone(m)),
            _ => self.memos.get(&l2_off).cloned(),
        };
        let (memo, cached) = match hit {
            // Its fixes were recorded on its first visit, before it was memoized.
            Some(m) => (m, true),
            None => self.load_memo(l2_off)?,
        };
        if cached {
            self.last = Some((l2_off, Rc::clone(&memo)));
        }
        let full = self.f.full();
        let no_overflow = self
            .max
            .saturating_add(self.put_off)
            .saturating_add(memo.max_n)
            <= self.refmax;
        if cached && (full || no_overflow) {
            // Only the messages that do not depend on the counts; increments put off.
            if full {
                self.f.corrupt_unlisted(memo.statics);
            } else if memo.statics > 0 {
                for ev in memo.events.iter().filter(|ev| ev.is_static()) {
                    self.f.corrupt_with(|| ev.static_msg().unwrap_or_default());
                }
            }
            if memo.max_n > 0 {
                match &mut self.pending_run {
                    (off, n) if *off == l2_off => *n += 1,
                    run => {
                        let (off, n) = std::mem::replace(run, (l2_off, 1));
                        if n > 0 {
                            *self.pending.entry(off).or_insert(0) += n;
                        }
                    }
                }
                self.put_off = self.put_off.saturating_add(memo.max_n);
            }
        } else {
            for ev in &memo.events {
                match *ev {
                    Ev::Inc { off, size, .. } => {
                        self.inc(off, size);
                    }
                    _ => self.f.corrupt_with(|| ev.static_msg().unwrap_or_default()),
                }
            }
        }
        if active {
            self.f.allocated += memo.allocated;
            self.f.compressed += memo.compressed;
            self.f.fragmented += memo.fragmented;
        }
        Ok(())
    }

    /// Read and boil down the table at `l2_off`, recording its fixes on its first visit; it
    /// is memoized (the `bool`) on its second visit, within budget: a table reached once (as
    /// in most images) costs no memory.
    fn load_memo(&mut self, l2_off: u64) -> Result<(Rc<L2Memo>, bool), CheckError> {
        let mut buf = std::mem::take(&mut self.l2buf);
        let r = self.st.read_at(&mut buf, l2_off);
        let memo = r.map(|()| Rc::new(L2Memo::build(&buf, self.img)));
        self.l2buf = buf;
        let memo = match memo {
            Ok(m) => m,
            Err(e) => {
                self.f
                    .error("ERROR: I/O error in check_refcounts_l2".to_string());
                return Err(e.into());
            }
        };
        self.record_fixes(l2_off, &memo);
        let keep =
            second_visit(&mut self.seen, l2_off) && self.memo_cost + memo.cost() <= MEMO_BUDGET;
        if keep {
            self.memo_cost += memo.cost();
            self.memos.insert(l2_off, Rc::clone(&memo));
        }
        Ok((memo, keep))
    }

    /// Entries repair (mode "all") may rewrite, recorded on the first visit of a table: only
    /// of tables that are where a table may be, once each, and only of tables that look like
    /// L2 tables (no entry with reserved bits set).
    fn record_fixes(&mut self, l2_off: u64, memo: &L2Memo) {
        let cs = self.img.cs;
        if l2_off == 0 || l2_off & (cs - 1) != 0 || memo.not_a_table {
            return;
        }
        if !self.fixed_tables.insert(l2_off) {
            return;
        }
        let v3 = self.img.header.version >= 3;
        // Past the end of the file the cluster reads as zeros: say so with the zero flag (v3)
        // or by unallocating it (v2 without a backing file; with one, an unallocated cluster
        // would read the backing file instead).
        let zero_ok = v3 || self.img.header.backing_file.is_none();
        for ev in &memo.events {
            match *ev {
                Ev::Unaligned {
                    off,
                    zero_alloc: true,
                    idx,
                } => self.f.fixes.push(EntryFix {
                    at: l2_off + 8 * idx as u64,
                    value: OFLAG_ZERO,
                    in_l2: true,
                    why: FixReason::UnalignedZero { off },
                }),
                Ev::Inc {
                    off,
                    idx,
                    data: true,
                    exceeds: true,
                    ..
                } => {
                    let at = l2_off + 8 * idx as u64;
                    if zero_ok && self.f.fixes.last().map(|f| f.at) != Some(at) {
                        self.f.fixes.push(EntryFix {
                            at,
                            value: if v3 { OFLAG_ZERO } else { 0 },
                            in_l2: true,
                            why: FixReason::L2PastEnd { off },
                        });
                    }
                }
                _ => {}
            }
        }
    }

    fn walk_bitmaps(&mut self) -> Result<(), CheckError> {
        let Some(bm) = self.img.bitmaps else {
            return Ok(());
        };
        let img = self.img;
        self.inc(bm.offset, bm.size);
        let avail = img.file_len.saturating_sub(bm.offset).min(bm.size);
        let mut dir = vec![0u8; avail as usize];
        self.st.read_at(&mut dir, bm.offset)?;
        let mut pos = 0usize;
        for _ in 0..bm.nb_bitmaps {
            if pos + 24 > dir.len() {
                self.f
                    .corrupt("ERROR bitmap directory is truncated".to_string());
                return Ok(());
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&dir[pos..pos + 8]);
            let table_off = u64::from_be_bytes(a);
            let table_size =
                u32::from_be_bytes([dir[pos + 8], dir[pos + 9], dir[pos + 10], dir[pos + 11]])
                    as u64;
            let name_size = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra =
                u32::from_be_bytes([dir[pos + 20], dir[pos + 21], dir[pos + 22], dir[pos + 23]])
                    as usize;
            pos = (pos + 24 + extra + name_size + 7) & !7;
            self.inc(table_off, table_size * 8);
            if table_size * 8 > super::image::MAX_L1_BYTES {
                self.f
                    .corrupt(format!("ERROR bitmap table at {table_off:#x} is too large"));
                continue;
            }
            let table = read_table(self.st, table_off, table_size, img.file_len)?;
            for e in table {
                let off = e & 0x00ff_ffff_ffff_fe00;
                if e & 0xff00_0000_0000_01fe != 0
                    || (off != 0 && (e & 1 != 0 || off & (img.cs - 1) != 0))
                {
                    self.f
                        .corrupt_with(|| format!("ERROR bitmap table entry {e:#x} is invalid"));
                    continue;
                }
                if off != 0 {
                    self.inc(off, img.cs);
                }
            }
        }
        Ok(())
    }

    fn walk_refblocks(&mut self) {
        let img = self.img;
        for (i, &e) in img.reftable.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> img.cb;
            if e & REFT_RESERVED_MASK != 0 {
                self.f.corrupt_with(|| {
                    format!("ERROR refcount table entry {i} has reserved bits set")
                });
                self.f.rebuild = true;
                continue;
            }
            if off & (img.cs - 1) != 0 {
                self.f.corrupt_with(|| {
                    format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                         corrupted"
                    )
                });
                self.f.rebuild = true;
                continue;
            }
            if cluster >= self.refs.len() {
                self.f
                    .corrupt_with(|| format!("ERROR refcount block {i} is outside image"));
                self.f.refblock_outside = true;
                continue;
            }
            if off != 0 {
                self.inc(off, img.cs);
                let r = self.refs.get(cluster);
                if r != 1 {
                    self.f
                        .corrupt_with(|| format!("ERROR refcount block {i} refcount={r}"));
                    self.f.rebuild = true;
                }
            }
        }
    }
}

/// The nonzero entries of a table, with their indexes. Sparse tables are mostly zeros: a chunk
/// of them is skipped after one OR over it instead of a test per entry.
pub(crate) fn nonzero_entries(t: &[u64]) -> impl Iterator<Item = (usize, u64)> + '_ {
    const CHUNK: usize = 64;
    t.chunks(CHUNK)
        .enumerate()
        .filter(|(_, c)| c.iter().fold(0, |a, &e| a | e) != 0)
        .flat_map(|(k, c)| {
            c.iter()
                .enumerate()
                .filter(|&(_, &e)| e != 0)
                .map(move |(j, &e)| (k * CHUNK + j, e))
        })
}
