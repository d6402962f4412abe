use super::*;
use crate::storage::MemStorage;
use growth_state::TableStep;

/// A minimal image: refcount table at cluster 1, one block at cluster 2 covering clusters 0-2.
fn setup(cluster_bits: u32, order: u32) -> (MemStorage, Refcounts) {
    let cs = 1usize << cluster_bits;
    let s = MemStorage::from_vec(vec![0u8; 3 * cs]);
    s.write_at(&(2 * cs as u64).to_be_bytes(), cs as u64)
        .unwrap();
    let mut blk = vec![0u8; cs];
    for i in 0..3 {
        refblock::set(&mut blk, i, order, 1);
    }
    s.write_at(&blk, 2 * cs as u64).unwrap();
    let r = Refcounts::load(&s, cluster_bits, order, cs as u64, 1).unwrap();
    (s, r)
}

#[test]
fn runs_allocated_past_the_watermark_leave_the_gap_fresh() {
    let (s, mut r) = setup(16, 4);
    r.note_allocated(0, 3); // the file at open (as `Meta::new` does)
    assert_eq!(r.alloc(&s, 2).unwrap(), 3);
    assert_eq!(r.allocations, 5);
    // A block created ahead of the allocator (cluster 20), and data past a skipped range.
    r.note_allocated(20, 1);
    r.note_allocated(30, 4);
    r.note_allocated(33, 3); // touches 30..34: one run
    assert_eq!(r.allocations, 5, "the gap 5..20 was never written");
    assert!(!r.allocated_ahead(5, 15));
    assert!(r.allocated_ahead(19, 2));
    assert!(r.allocated_ahead(35, 1));
    assert!(!r.allocated_ahead(36, 10));
    assert!(!r.allocated_ahead(21, 9));
    // The allocator hands out the gap: fresh; it reaches the first run, which merges.
    assert_eq!(r.alloc(&s, 15).unwrap(), 5);
    assert!(!r.last_alloc_ahead);
    assert_eq!(r.allocations, 21, "the run at 20 joined the watermark");
    assert!(r.allocated_ahead(30, 1));
    // A run freed while still ahead, handed out again: not fresh.
    let mut r2 = setup(16, 4).1;
    r2.note_allocated(0, 3);
    r2.note_allocated(10, 2);
    for c in 3..12 {
        r2.set(&s, c, 1).unwrap();
    }
    assert_eq!(r2.alloc(&s, 1).unwrap(), 12, "10 and 11 are allocated");
    assert!(!r2.last_alloc_ahead);
    r2.set(&s, 10, 0).unwrap();
    assert_eq!(r2.alloc(&s, 1).unwrap(), 10);
    assert!(
        r2.last_alloc_ahead,
        "cluster 10 was allocated before, past the watermark"
    );
}

#[test]
fn durable_holes_count_until_their_clusters_are_used_or_reserved() {
    let (s, mut r) = setup(16, 4);
    assert_eq!(r.alloc(&s, 6).unwrap(), 3);
    assert!(!r.last_alloc_holes, "never freed");
    for c in 3..9 {
        r.set(&s, c, 0).unwrap();
    }
    r.hold_punching(&[(3, 6)]);
    // Punched, but only 3..5 synced since.
    r.punched(&[(3, 6)], &[(3, 2)]);
    assert_eq!(r.alloc(&s, 2).unwrap(), 3);
    assert!(r.last_alloc_holes, "a run of durable holes");
    assert_eq!(r.alloc(&s, 1).unwrap(), 5);
    assert!(!r.last_alloc_holes, "punched but not synced");
    // Freed again without a punch: the clusters were used, no longer holes.
    r.set(&s, 3, 0).unwrap();
    assert_eq!(r.alloc(&s, 1).unwrap(), 3);
    assert!(!r.last_alloc_holes, "used since its punch");
    // The dedup index area is written with refcount 0: once reserved, never a hole again.
    for c in 6..9 {
        r.set(&s, c, 0).unwrap();
    }
    r.punched(&[], &[(6, 3)]);
    r.reserve(6, 2, kind::DEDUP_INDEX);
    r.reserve(20, 1, kind::DEDUP_INDEX);
    assert_eq!(r.alloc(&s, 3).unwrap(), 6);
    assert!(!r.last_alloc_holes, "the old index area is not a hole");
}

#[test]
fn a_reserved_area_is_skipped_and_guarded() {
    let (s, mut r) = setup(16, 4);
    r.reserve(3, 2, kind::DEDUP_INDEX);
    assert_eq!(r.alloc(&s, 1).unwrap(), 5, "the allocator skips the area");
    let cs = 1u64 << 16;
    assert!(
        r.guard(3 * cs + 512, 512, 0).is_err(),
        "a write into it is refused"
    );
    assert!(
        r.guard(4 * cs, cs, kind::DEDUP_INDEX).is_ok(),
        "its own writes pass"
    );
    r.reserve(6, 1, kind::DEDUP_INDEX);
    assert!(
        r.guard(3 * cs, cs, 0).is_ok(),
        "a moved area frees the old range"
    );
    assert!(r.guard(6 * cs, cs, 0).is_err());
}

#[test]
fn a_block_changed_while_its_copy_is_written_stays_dirty() {
    let (s, mut r) = setup(16, 4);
    r.set(&s, 0, 2).unwrap();
    let copies = r.copy_dirty().unwrap();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].0, 2 << 16, "block 0 lives in cluster 2");
    r.copies_written(true);
    assert_eq!(r.cached_blocks(), (0, 1), "unchanged since its copy: clean");
    r.set(&s, 1, 3).unwrap();
    let _ = r.copy_dirty().unwrap();
    r.set(&s, 1, 4).unwrap();
    r.copies_written(true);
    assert_eq!(r.cached_blocks(), (1, 0), "changed after its copy: dirty");
    let _ = r.copy_dirty().unwrap();
    r.copies_written(false);
    assert_eq!(r.cached_blocks(), (1, 0), "a failed write: dirty");
    r.write_dirty(&s).unwrap();
    assert_eq!(r.get(&s, 1).unwrap(), 4);
}

#[test]
fn a_block_read_outside_the_lock_yields_to_a_load_under_it() {
    let (s, mut r) = setup(16, 4);
    let (off, ticket) = r.block_to_load(0).unwrap();
    assert_eq!(off, 2 << 16);
    assert_eq!(r.block_to_load(0), None, "one reader at a time");
    let mut stale = vec![0u8; 1 << 16];
    s.read_at(&mut stale, off).unwrap();
    // Meanwhile a load under the lock, a change and a write of the block.
    r.set(&s, 1, 5).unwrap();
    r.write_dirty(&s).unwrap();
    // ...and another reader registered since: its read is newer than ours.
    r.clean.pop(&0);
    let (_, newer) = r.block_to_load(0).unwrap();
    r.block_loaded(0, ticket, Some(stale));
    assert_eq!(r.get(&s, 1).unwrap(), 5, "the older copy was dropped");
    r.block_loaded(0, newer, None);
    // Unchallenged, a copy read outside is cached (no read under the lock then).
    let (s2, mut r2) = setup(16, 4);
    let (off, ticket) = r2.block_to_load(0).unwrap();
    let mut d = vec![0u8; 1 << 16];
    s2.read_at(&mut d, off).unwrap();
    r2.block_loaded(0, ticket, Some(d));
    assert_eq!(r2.cached_blocks(), (0, 1));
    assert_eq!(r2.block_to_load(0), None, "cached");
    assert_eq!(r2.block_to_load(7), None, "no such block in the table");
}

#[test]
fn alloc_skips_used_and_reuses_freed() {
    let (s, mut r) = setup(16, 4);
    assert_eq!(r.alloc(&s, 1).unwrap(), 3);
    assert_eq!(r.alloc(&s, 4).unwrap(), 4);
    r.add(&s, 5, -1).unwrap();
    assert_eq!(r.alloc(&s, 1).unwrap(), 5);
    assert_eq!(r.alloc(&s, 1).unwrap(), 8);
}

#[test]
fn grows_blocks_and_table_for_small_clusters() {
    // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 blocks per table cluster.
    let (s, mut r) = setup(9, 6);
    let mut got = Vec::new();
    for _ in 0..20_000 {
        got.push(r.alloc(&s, 1).unwrap());
    }
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), 20_000, "no cluster handed out twice");
    r.write_dirty(&s).unwrap();
    // Reload from disk: every handed-out cluster and all metadata is referenced.
    let hdr_tab = r.table_location();
    let mut r2 = Refcounts::load(&s, 9, 6, hdr_tab.0, hdr_tab.1).unwrap();
    for &c in &got {
        assert_eq!(r2.get(&s, c).unwrap(), 1, "cluster {c}");
    }
    for off in r.block_offsets().collect::<Vec<_>>() {
        assert_eq!(
            r2.get(&s, off / 512).unwrap(),
            1,
            "refcount block at {off:#x}"
        );
    }
    for c in 0..hdr_tab.1 {
        assert_eq!(r2.get(&s, hdr_tab.0 / 512 + c).unwrap(), 1, "table cluster");
    }
    // The first table (cluster 1) was freed when the table moved, and handed out again.
    assert!(
        got.contains(&1),
        "old refcount table cluster was not reused"
    );
}

#[test]
fn reserved_range_gets_no_data_block_or_table() {
    // 512-byte clusters, 64-bit refcounts: 64 clusters per block. The reserved range spans
    // several blocks, none of which exist yet, and the table must grow past it.
    let (s, mut r) = setup(9, 6);
    let (f, n) = (100u64, 300u64);
    r.reserved = Some((f, n));
    let mut got = Vec::new();
    for _ in 0..6_000 {
        got.push(r.alloc(&s, 1).unwrap());
    }
    got.push(r.alloc(&s, 50).unwrap());
    assert!(
        got.iter().all(|&c| c < f || c >= f + n),
        "data in reserved range"
    );
    for off in r.block_offsets().collect::<Vec<_>>() {
        let c = off / 512;
        assert!(c < f || c >= f + n, "refcount block at cluster {c}");
    }
    let (t, tc) = r.table_location();
    assert!(
        t / 512 + tc <= f || t / 512 >= f + n,
        "table in reserved range"
    );
    r.write_dirty(&s).unwrap();
    let mut r2 = Refcounts::load(&s, 9, 6, t, tc).unwrap();
    for c in f..f + n {
        assert_eq!(r2.get(&s, c).unwrap(), 0, "cluster {c}");
    }
    for off in r.block_offsets().collect::<Vec<_>>() {
        assert_eq!(r2.get(&s, off / 512).unwrap(), 1, "block at {off:#x}");
    }
}

#[test]
fn clean_blocks_are_bounded_and_dirty_ones_kept_until_written() {
    // 512-byte clusters, 16-bit refcounts: 256 clusters per block.
    let (s, mut r) = setup(9, 4);
    r.clean.resize(NonZeroUsize::new(4).unwrap());
    let mut got = Vec::new();
    for _ in 0..5_000 {
        got.push(r.alloc(&s, 1).unwrap());
    }
    let (dirty, clean) = r.cached_blocks();
    assert!(dirty >= 19, "changed blocks stay until written: {dirty}");
    assert!(clean <= 4, "{clean} clean blocks");
    r.write_dirty(&s).unwrap();
    assert_eq!(r.cached_blocks().0, 0);
    assert!(r.cached_blocks().1 <= 4);
    // Evicted blocks are read again with what was written.
    for &c in &got {
        assert_eq!(r.get(&s, c).unwrap(), 1, "cluster {c}");
        assert!(r.cached_blocks().1 <= 4);
    }
    r.add(&s, got[0], -1).unwrap();
    assert_eq!(r.get(&s, got[0]).unwrap(), 0);
    assert_eq!(r.alloc(&s, 1).unwrap(), got[0], "freed cluster reused");
}

#[test]
fn free_run_finds_the_first_gap() {
    // 512-byte clusters, 16-bit refcounts: 256 clusters per block; clusters 0-2 used.
    let (s, mut r) = setup(9, 4);
    assert_eq!(r.free_run(&s, 1, 10).unwrap(), 3);
    for c in [3u64, 20, 30] {
        r.set(&s, c, 1).unwrap();
    }
    assert_eq!(r.free_run(&s, 1, 10).unwrap(), 4);
    assert_eq!(r.free_run(&s, 1, 16).unwrap(), 4);
    assert_eq!(r.free_run(&s, 1, 17).unwrap(), 31);
    // Past the blocks that exist everything is free.
    assert_eq!(r.free_run(&s, 1, 100_000).unwrap(), 31);
    r.set(&s, 255, 1).unwrap();
    assert_eq!(r.free_run(&s, 1, 300).unwrap(), 256);
}

/// The refcount table the header on disk points at (`setup` images keep the header's
/// refcount-table fields where a real header has them).
fn table_on_disk(s: &MemStorage) -> (u64, u64) {
    let mut h = [0u8; 12];
    s.read_at(&mut h, format::header::OFF_REFCOUNT_TABLE)
        .unwrap();
    let off = u64::from_be_bytes(h[..8].try_into().unwrap());
    let n = u32::from_be_bytes(h[8..].try_into().unwrap());
    (off, n as u64)
}

/// Every cluster of `got` has refcount 1 through what is on disk now (after `write_dirty`).
fn all_counted_on_disk(s: &MemStorage, r: &mut Refcounts, got: &[u64], when: &str) {
    r.write_dirty(s).unwrap();
    let (off, n) = table_on_disk(s);
    let mut r2 = Refcounts::load(s, 9, 6, off, n).unwrap();
    for &c in got {
        assert_eq!(r2.get(s, c).unwrap(), 1, "cluster {c} {when}");
    }
}

/// Allocations while the table grows without the lock: each step runs `lag` allocations
/// after it was handed out (`header_lag` for the header switch), and its result is taken as
/// many allocations later (0: at once, as one request does them; more: other requests
/// allocate meanwhile, create blocks under the lock, and may outrun the growth, so that a
/// growth under the lock settles it). Blocks missing below the table's end (the range of
/// `reserved`) are created under the lock while a growth runs, one per 5 allocations. After every
/// step and every 97 allocations, what is on disk counts every cluster handed out. Returns
/// (steps, allocations made while a growth was cancelled, blocks created during a growth).
fn growth_without_the_lock(lag: usize, header_lag: usize) -> (u64, u64, u64) {
    let (s, mut r) = setup(9, 6);
    s.write_at(
        &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1],
        format::header::OFF_REFCOUNT_TABLE,
    )
    .unwrap();
    // Blocks 16..=20 (64 clusters each) are reserved whole: the allocator does not create them.
    r.reserved = Some((1000, 400));
    let mut missing: Vec<u64> = (16..=20).collect();
    let (mut got, mut done, mut over, mut late) = (Vec::new(), 0u64, 0u64, 0u64);
    // The step, when it was handed out, and its result once run.
    let mut step: Option<(TableStep, usize, Option<bool>)> = None;
    let mut i = 0usize;
    while i < 20_000 || step.is_some() {
        if step.is_none() && i < 20_000 {
            step = r.table_to_grow().map(|st| (st, i, None));
        }
        if let Some((st, at, res)) = step.take() {
            let wait = if st.is_header() { header_lag } else { lag };
            step = match res {
                None if i - at >= wait => {
                    let ok = st.run(&s).is_ok();
                    all_counted_on_disk(&s, &mut r, &got, "after a step ran");
                    Some((st, at, Some(ok)))
                }
                Some(ok) if i - at >= 2 * wait => {
                    let next = r.table_step_done(&s, st, ok).unwrap();
                    done += 1;
                    all_counted_on_disk(&s, &mut r, &got, "after a step was done");
                    next.map(|n| (n, i, None))
                }
                res => Some((st, at, res)),
            };
        }
        if i.is_multiple_of(5) && r.growing.as_ref().is_some_and(|g| !g.cancelled) {
            if let Some(b) = missing.pop() {
                let keep = r.reserved.take();
                r.set(&s, b * 64 + 1, 1).unwrap();
                r.reserved = keep;
                got.push(b * 64 + 1);
                late += 1;
            }
        }
        if i < 20_000 {
            got.push(r.alloc(&s, 1).unwrap());
            if i.is_multiple_of(97) {
                all_counted_on_disk(&s, &mut r, &got, &format!("at allocation {i}"));
            }
            over += u64::from(r.growing.as_ref().is_some_and(|g| g.cancelled));
        }
        i += 1;
    }
    assert!(r.growing.is_none());
    got.sort_unstable();
    got.dedup();
    assert_eq!(
        got.len(),
        20_000 + late as usize,
        "no cluster handed out twice"
    );
    all_counted_on_disk(&s, &mut r, &got, "at the end");
    assert_eq!(table_on_disk(&s), r.table_location());
    (done, over, late)
}

#[test]
fn a_table_grown_without_the_lock_counts_every_cluster_at_every_step() {
    // At once: every growth is done without the lock (two steps at least each).
    let (steps, over, _) = growth_without_the_lock(0, 0);
    assert!(steps >= 4, "{steps} steps");
    assert_eq!(over, 0, "no growth was cancelled");
    // Late: blocks created under the lock meanwhile, and growths the allocator outruns.
    for (lag, header_lag) in [
        (1, 1),
        (3, 3),
        (1, 15),
        (1, 30),
        (2, 60),
        (40, 40),
        (1, 200),
        (1000, 1000),
    ] {
        let (steps, over, late) = growth_without_the_lock(lag, header_lag);
        assert!(steps >= 2, "lag {lag}: {steps} steps");
        assert!(late > 0, "lag {lag}: blocks created during a growth");
        eprintln!("lag {lag}/{header_lag}: {steps} steps, {over} allocations while cancelled");
    }
}

/// A block created ahead whose write failed may have left its bytes in its cluster: that
/// cluster is never taken for zeros (a partial data write there would show the block).
#[test]
fn a_failed_block_created_ahead_leaves_no_cluster_taken_for_zeros() {
    let (s, mut r) = setup(9, 6); // 64 clusters per block
    r.note_allocated(0, 3);
    let nb = loop {
        r.alloc(&s, 1).unwrap();
        if let Some(nb) = r.block_to_create() {
            break nb;
        }
    };
    let at = nb.end(512) / 512 - 1;
    assert!(
        at >= r.allocations,
        "the block is created past the watermark"
    );
    r.block_created(&s, nb, false).unwrap();
    assert!(
        r.allocated_ahead(at, 1) || at < r.allocations,
        "cluster {at} of a failed block is taken for zeros"
    );
}

#[test]
fn skip_allocated_passes_only_clusters_in_use_and_asks_for_missing_blocks() {
    // 512-byte clusters, 16-bit refcounts: 256 per block.
    let (s, mut r) = setup(9, 4);
    r.note_allocated(0, 3);
    for _ in 0..1200 {
        r.alloc(&s, 1).unwrap();
    }
    r.set(&s, 600, 0).unwrap();
    r.set(&s, 700, 0).unwrap();
    r.set(&s, 701, 0).unwrap();
    r.write_dirty(&s).unwrap();
    r.clean.clear();
    r.free_hint = 0;
    let no_free_below = |r: &mut Refcounts, what: &str| {
        for c in 0..r.free_hint {
            assert_ne!(r.get(&s, c).unwrap(), 0, "{what}: cluster {c} is free");
        }
    };
    // Nothing cached: the first block is asked for, the search start stays.
    assert_eq!(r.skip_allocated(1), Some(0));
    assert_eq!(r.free_hint, 0);
    let mut rounds = 0;
    let read = |r: &mut Refcounts, b: u64, n: usize| {
        for (k, off, ticket) in r.blocks_to_load_from(b, n) {
            let mut d = vec![0u8; 512];
            s.read_at(&mut d, off).unwrap();
            r.block_loaded(k, ticket, Some(d));
        }
    };
    while let Some(b) = r.skip_allocated(1) {
        read(&mut r, b, 1);
        rounds += 1;
        assert!(rounds < 10, "no progress at block {b}");
    }
    assert_eq!(r.free_hint, 600, "stops at the first free cluster");
    // A run of two: the search start stays at 600, the run at 700 is in a cached block.
    r.clean.clear();
    r.free_hint = 0;
    while let Some(b) = r.skip_allocated(2) {
        read(&mut r, b, 2);
    }
    assert_eq!(r.free_hint, 600);
    assert!(r.clean.contains(&2), "block 2 (clusters 512-767) was read");
    // A run of three is not there before the end of what is allocated: the scan goes on to
    // the last block the table has, reading each one.
    r.clean.clear();
    r.free_hint = 0;
    let mut asked = Vec::new();
    while let Some(b) = r.skip_allocated(3) {
        asked.push(b);
        read(&mut r, b, 1);
    }
    no_free_below(&mut r, "run of three");
    assert_eq!(r.free_hint, 600);
    let last = 1203u64.div_ceil(256) - 1;
    assert_eq!(asked, (0..=last).collect::<Vec<u64>>());
    // `alloc` agrees: the single free cluster first, then the pair.
    assert_eq!(r.alloc(&s, 1).unwrap(), 600);
    assert_eq!(r.alloc(&s, 2).unwrap(), 700);
}
