//! Rebuilding the index from the data (after a crash, a writable QEMU open, a lost area) while
//! the image is served. The open does only what correctness needs (the shared clusters, the
//! area) and starts with an index that holds nothing, or what it could load; the data clusters
//! are then hashed in batches, on the dedup worker's thread (`serve`) or at once by the open
//! (`OpenOptions::dedup_rebuild_in_background` off). A batch:
//!
//! 1. under the lock: the next window of guest clusters (its L2 tables read without the lock
//!    first); each data cluster that nobody holds and that has no verified record yet is taken,
//!    and the window is *watched*: every record set or cleared in it from now on is noted
//!    (`Records::watch`);
//! 2. without the lock: the clusters are read (host-contiguous ones in one call) and hashed;
//! 3. under the lock, a few records at a time: a cluster whose record changed since step 1 is
//!    left alone (its writer recorded or forgot the new content itself); every other one gets
//!    its hash as a *verified* record and a hint, or becomes pending when another cluster
//!    already holds that content (the worker merges it, as after the old rebuild at open).
//!
//! Why a record made this way may be verified (stand for the data without a byte compare):
//! every change of a guest cluster's content on an image served with dedup sets or clears its
//! record under the lock before any data moves, and holds the cluster until its data has
//! landed (docs/dedup.md). A cluster not held in step 1 had no data I/O in flight; a change
//! begun after step 1 shows in the watch by step 3. So what step 2 read is what the cluster
//! holds at step 3, and the record is kept current from there on like any other.
//!
//! A clean close stops the rebuild before its next lock section; the records made so far are
//! written as usual and the extension says where to go on (`rebuild_from`): the next open
//! hashes from there, in the background again.

use super::store::Dedup;
use crate::qcow2::engine::state::State;
use crate::qcow2::error::Result;
use crate::qcow2::format::{L1Entry, L2Entry};
use crate::qcow2::hashindex::{hash_cluster, is_zero};
use crate::storage::Storage;
use std::collections::HashMap;

/// Guest clusters looked at per batch, at most (their entries are read under the lock).
const SCAN: u64 = 512;
/// Data read per batch, at most.
const BATCH_BYTES: u64 = 1 << 20;
/// Results put in per lock section (a record, a hint: about a microsecond each).
pub(super) const INSERT_CHUNK: usize = 32;
/// Guest L2 tables with no table (no data) skipped per lock section.
const EMPTY_TABLES_PER_SECTION: u64 = 4096;

/// A data cluster taken by a batch.
#[derive(Clone, Copy)]
pub(super) struct Item {
    gc: u64,
    host: u64,
    copied: bool,
}

/// What reading and hashing one item gave.
#[derive(Clone, Copy)]
pub(super) enum Found {
    Hash([u8; 32]),
    Zero,
    ReadFailed,
}

/// What the rebuild does next.
pub(super) enum Next {
    /// Nothing left.
    Done,
    /// Guest clusters with no L2 table were passed: nothing to read.
    Skipped,
    /// Look at `first..end` (within one L2 table).
    Window(u64, u64),
}

/// Under the lock: pass guest clusters with no L2 table (a bounded number per call), then the
/// window the next batch looks at.
pub(super) fn next_window(st: &mut State) -> Next {
    let l2_bits = st.meta.g.l2_bits;
    let Some(rb) = st.dedup.as_mut().and_then(|d| d.rebuild.as_mut()) else {
        return Next::Done;
    };
    let mut skipped = 0;
    loop {
        let Some(&(start, end)) = rb.todo.front() else {
            return Next::Done;
        };
        let table = start >> l2_bits;
        let has_table = st
            .meta
            .l1
            .get(table as usize)
            .is_some_and(|&e| L1Entry::decode(e).l2_offset.is_some());
        let table_end = (table + 1) << l2_bits;
        if has_table {
            return Next::Window(start, end.min(table_end).min(start + SCAN));
        }
        rb.advance(table_end.min(end));
        skipped += 1;
        if skipped >= EMPTY_TABLES_PER_SECTION {
            return Next::Skipped;
        }
    }
}

/// Under the lock (the window's L2 tables cached): the data clusters of `first..end` to hash,
/// at most `max_items`, and the window watched. Returns the items and where the window ended.
pub(super) fn plan(
    st: &mut State,
    s: &dyn Storage,
    first: u64,
    end: u64,
    max_items: usize,
) -> Result<(Vec<Item>, u64)> {
    let mut items = Vec::new();
    let mut gc = first;
    while gc < end && items.len() < max_items {
        if let L2Entry::Normal { host, copied } = st.meta.entry(s, gc)? {
            // Held: its writer records or forgets the new content itself; its data may be
            // moving now.
            let busy = st.meta.is_held(gc) || st.meta.allocating(gc);
            if !busy && !known(st, s, gc)? {
                items.push(Item {
                    gc,
                    host: host.0,
                    copied,
                });
            }
        }
        gc += 1;
    }
    if let Some(r) = st.dedup.as_mut().and_then(|d| d.records.as_mut()) {
        r.watch(first, gc - first);
    }
    Ok((items, gc))
}

/// Guest cluster `gc` has a verified record already (written this session), or is pending.
fn known(st: &mut State, s: &dyn Storage, gc: u64) -> Result<bool> {
    let Some(d) = st.dedup.as_mut() else {
        return Ok(true);
    };
    if d.pending.contains(gc) {
        return Ok(true);
    }
    Ok(match d.records.as_mut() {
        Some(r) => matches!(r.get(s, gc)?, Some((_, true))),
        None => true,
    })
}

/// Without the lock: read and hash the items, host-contiguous ones in one read; an item whose
/// host cluster an earlier one of the batch has is read once.
pub(super) fn read_items(s: &dyn Storage, cs: u64, items: &[Item]) -> Vec<Found> {
    let mut found = vec![Found::ReadFailed; items.len()];
    let mut first_of: HashMap<u64, usize> = HashMap::new();
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if first_of.contains_key(&it.host) {
            continue;
        }
        first_of.insert(it.host, i);
        match runs.last_mut() {
            Some(run) if items[run[run.len() - 1]].host + cs == it.host => run.push(i),
            _ => runs.push(vec![i]),
        }
    }
    let mut buf = vec![0u8; (items.len() as u64 * cs) as usize];
    for run in runs {
        let b = &mut buf[..run.len() * cs as usize];
        if let Err(e) = s.read_at(b, items[run[0]].host) {
            log::warn!(
                "dedup index rebuild: reading {} clusters at {:#x} failed ({e}): not indexed",
                run.len(),
                items[run[0]].host
            );
            continue;
        }
        for (j, &i) in run.iter().enumerate() {
            let c = &b[j * cs as usize..(j + 1) * cs as usize];
            found[i] = if is_zero(c) {
                Found::Zero
            } else {
                Found::Hash(hash_cluster(c))
            };
        }
    }
    for (i, it) in items.iter().enumerate() {
        if let Some(&j) = first_of.get(&it.host) {
            found[i] = found[j];
        }
    }
    found
}

/// Under the lock: put in what `items` gave, but for clusters whose record changed since the
/// batch was planned (the watch).
pub(super) fn insert(
    st: &mut State,
    s: &dyn Storage,
    items: &[Item],
    found: &[Found],
) -> Result<()> {
    let cs = st.meta.g.cluster_size();
    let State { meta, dedup } = st;
    let Some(Dedup {
        index,
        records: Some(r),
        pending,
        rebuild: Some(rb),
        ..
    }) = dedup.as_mut()
    else {
        return Ok(());
    };
    for (it, f) in items.iter().zip(found) {
        if r.watched().is_none_or(|w| w.changed(it.gc)) {
            rb.changed += 1;
            continue;
        }
        let h = match f {
            Found::ReadFailed => {
                rb.read_errors += 1;
                continue;
            }
            Found::Zero => {
                rb.hashed += 1;
                continue;
            }
            Found::Hash(h) => h,
        };
        rb.hashed += 1;
        // A copy of a content another cluster holds, in a cluster of its own: the worker
        // merges it (after a crash in background mode, or data written while dedup was off).
        // The index matches 32 bits of the hash; a candidate's record has all of it (at 1M
        // unique clusters about one in 10^4 matches only the 32 bits: not worth the worker's
        // read, nor the loss of the other content's hint when that read disproves it).
        let mut cands = Vec::new();
        index.inner.for_each_candidate(h, |c| {
            cands.push(c - 1);
            true
        });
        let mut seen = false;
        for c in cands.into_iter().filter(|&c| c != it.gc) {
            if matches!(r.get(s, c)?, Some((rh, _)) if rh == *h) {
                seen = true;
                break;
            }
        }
        if seen && (it.copied || meta.rc.get(s, it.host / cs)? < 2) {
            if let Some(old) = r.set_pending(s, it.gc)? {
                index.remove(&old, it.gc);
            }
            pending.insert(it.gc);
            rb.pending += 1;
            continue;
        }
        if let Some(old) = r.set(s, it.gc, Some(h), true)?.filter(|o| o != h) {
            index.remove(&old, it.gc);
        }
        index.insert_limited(h, it.gc);
        rb.hints += 1;
    }
    Ok(())
}

/// Under the lock, after a batch: stop watching, mark `first..end` done; log the end.
pub(super) fn batch_done(st: &mut State, end: u64) {
    let Some(d) = st.dedup.as_mut() else {
        return;
    };
    if let Some(r) = d.records.as_mut() {
        r.unwatch();
    }
    if let Some(rb) = d.rebuild.as_mut() {
        rb.busy = false;
        rb.advance(end);
    }
    finish_if_done(d);
}

/// When nothing is left: the rebuild's results go into the open report, and it is logged.
pub(super) fn finish_if_done(d: &mut Dedup) {
    if d.rebuild.as_ref().is_none_or(|rb| !rb.todo.is_empty()) {
        return;
    }
    let Some(rb) = d.rebuild.take() else {
        return;
    };
    let rep = &mut d.open_report;
    rep.clusters_hashed += rb.hashed;
    rep.hints += rb.hints;
    rep.pending += rb.pending;
    if rep.background {
        let t = rb.started.elapsed();
        rep.background_millis = Some(t.as_millis() as u64);
        log::info!(
            "dedup index rebuilt in the background in {t:.2?}: {} data clusters hashed, {} \
             hints, {} clusters pending background dedup, {} left to writes that changed them \
             meanwhile, {} unreadable",
            rb.hashed,
            rb.hints,
            rb.pending,
            rb.changed,
            rb.read_errors
        );
    }
}

/// Most clusters a batch reads.
pub(super) fn max_items(cs: u64) -> usize {
    (BATCH_BYTES / cs).clamp(1, SCAN) as usize
}

/// The whole rebuild at once, in the open (no other thread can take the lock yet).
pub(super) fn run_now(st: &mut State, s: &dyn Storage) -> Result<()> {
    let cs = st.meta.g.cluster_size();
    loop {
        match next_window(st) {
            Next::Done => break,
            Next::Skipped => continue,
            Next::Window(first, end) => {
                let (items, end) = plan(st, s, first, end, max_items(cs))?;
                let found = read_items(s, cs, &items);
                insert(st, s, &items, &found)?;
                batch_done(st, end);
            }
        }
    }
    if let Some(d) = st.dedup.as_mut() {
        finish_if_done(d);
    }
    Ok(())
}
