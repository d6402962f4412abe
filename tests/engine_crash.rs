//! Crash consistency: a scripted workload runs on fault-injecting storage that "crashes" after
//! the N-th write, for every N. What a disk could hold afterwards (only flushed writes, all
//! writes, or a random subset of the unflushed ones) must pass `qemu-img check` with no
//! corruption (leaks allowed), and every sector written before the last completed flush and not
//! touched since must read back.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vhost_user_qcow2::block::{BlockDevice, BlockError};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage, Storage};

const SIZE: u64 = 8 << 20;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    /// Like `Write`, but each 512-byte sector starts with its own index: clusters of unique
    /// content.
    WriteUnique(u64, u64, u8),
    Flush,
    Discard(u64, u64),
    Zero(u64, u64, bool),
    /// Background dedup: the worker's steps until nothing is pending.
    Settle,
    /// The lazy-refcount timer (`flush_refcounts`): flushes, then writes refcounts.
    Refcounts,
}

fn script() -> Vec<Op> {
    use Op::*;
    vec![
        Write(0, 4096, 1),
        Write(1 << 20, 3 * 4096 + 512, 2),
        Flush,
        Write(512, 1024, 3),         // in place
        Write(2 << 20, 64 << 10, 4), // new L2 range? (4 KiB clusters: 512 entries = 2 MiB per L2)
        Write(6 << 20, 8192, 5),
        Refcounts,
        Discard(1 << 20, 8192),
        Write(3 << 20, 4096, 6),
        Zero(2 << 20, 16 << 10, true),
        Zero(0, 4096, false),
        Flush,
        Write(1 << 20, 4096, 7), // reuse after discard
        Write(7 << 20, 200 << 10, 8),
        Write(5 << 20, 1000 * 512, 9),
        Flush,
        Write(4096, 512, 10),
        Discard(7 << 20, 64 << 10),
        Refcounts,
        Write((7 << 20) + 4096, 4096, 11),
        Flush,
        Write(100 << 10, 300 << 10, 12),
        // Two clusters of one content (shared under dedup), then one dropped: the refcount falls
        // back to 1 and the survivor must get COPIED back.
        Write(6 << 20, 8192, 13),
        Flush,
        Discard(6 << 20, 4096),
        Flush,
        Write(3 << 20, 4096, 14),
        Flush,
    ]
}

/// Dedup links to clusters whose entries reached the disk with COPIED in an earlier flush
/// interval, several links between flushes with new L2 tables in between, COW of a shared
/// cluster, and links while refcount blocks grow (1 KiB clusters and 64-bit refcounts: a refcount
/// block covers 128 KiB). Unique data (`unique_len` twice) goes to `unique_at`; after the big prefill of
/// `Case::links_table` it also moves the refcount table (which covers 16 MiB).
fn link_script(unique_at: u64, unique_len: u64) -> Vec<Op> {
    use Op::*;
    const K: u64 = 1024;
    vec![
        // Links to contents flushed in the prefill (on disk with COPIED), each in its own
        // L2 table (128 entries of 1 KiB: 128 KiB per table).
        Write(4 * K, 1024, 1),
        Write(200 * K, 1024, 2),
        Write(400 * K, 2048, 1),
        Settle,
        Flush,
        // Unique data through the next refcount block and the table's end, with links between.
        WriteUnique(unique_at, unique_len, 50),
        Write(600 * K, 1024, 2),
        WriteUnique(unique_at + 256 * K, unique_len, 90),
        Write(800 * K, 1024, 1),
        Settle,
        Flush,
        // COW of a shared cluster, a link to a cluster linked in the last interval, a third copy.
        Write(4 * K + 100, 200, 7),
        Write(1000 * K, 1024, 2),
        Write(1200 * K, 2048, 1),
        Settle,
        Flush,
        // Copies dropped: refcounts fall back to 1 and the survivors get COPIED again.
        Discard(200 * K, 1024),
        Discard(600 * K, 1024),
        Discard(1000 * K, 1024),
        Flush,
        Write(1400 * K, 1024, 2),
        Settle,
        Flush,
    ]
}

/// Unique data in the prefill: with the metadata and the dedup records (32 bytes per guest
/// cluster), the allocations end a little before the second half of the refcount table's last
/// block but one (16 MiB), where the table is grown ahead of the allocator.
const PREFILL: u64 = 15_140 * 1024;

/// The prefill of `Case::table_ahead` (no dedup): its allocations end a few dozen clusters
/// before the second half of the refcount table's last block but one (16 MiB of 1 KiB
/// clusters), which the script's writes reach.
const PREFILL_AHEAD: u64 = 15_900 * 1024;

/// How `Case::table_ahead` runs: strict, plain, nothing persisted before acks (never DIRTY).
const TABLE_AHEAD_MODE: Mode = Mode {
    lazy: false,
    dedup: DedupMode::Off,
    ack: AckDurability::Memory,
};

/// What the prefill of `link_script` writes (on plain storage, flushed and closed): the first
/// contents, then (`fill`) unique data up to just short of the refcount table's 16 MiB.
fn link_prefill(fill: bool) -> Vec<Op> {
    use Op::*;
    let mut ops = vec![Write(0, 1024, 1), Write(2048, 1024, 2)];
    if fill {
        ops.push(WriteUnique(2 << 20, PREFILL, 10));
    }
    ops.extend([Settle, Flush]);
    ops
}

/// How the engine is opened for a crash run.
#[derive(Clone, Copy, Debug)]
struct Mode {
    lazy: bool,
    dedup: DedupMode,
    ack: AckDurability,
}

impl Mode {
    fn options(self) -> OpenOptions {
        OpenOptions {
            lazy_refcounts: Some(self.lazy),
            dedup_mode: Some(self.dedup),
            ack_durability: self.ack,
            ..Default::default()
        }
    }
}

fn fill(model: &mut [u8], op: Op) {
    match op {
        Op::Write(o, l, v) => model[o as usize..(o + l) as usize].fill(v),
        Op::WriteUnique(o, l, v) => {
            for s in (o..o + l).step_by(512) {
                let sector = &mut model[s as usize..(s + 512).min(o + l) as usize];
                sector.fill(v);
                let tag = (s / 512).to_le_bytes();
                let n = tag.len().min(sector.len());
                sector[..n].copy_from_slice(&tag[..n]);
            }
        }
        Op::Discard(o, l) | Op::Zero(o, l, _) => model[o as usize..(o + l) as usize].fill(0),
        Op::Flush | Op::Settle | Op::Refcounts => {}
    }
}

/// Apply `op` to the image and (before) to `model`.
fn apply(q: &Qcow2, model: &mut [u8], op: Op) -> Result<(), BlockError> {
    fill(model, op);
    match op {
        Op::Write(o, l, _) | Op::WriteUnique(o, l, _) => {
            let data = model[o as usize..(o + l) as usize].to_vec();
            q.write_vectored(o, &[IoSlice::new(&data)])
        }
        Op::Discard(o, l) => q.discard(o, l),
        Op::Zero(o, l, u) => q.write_zeroes(o, l, u),
        Op::Flush => q.flush(),
        Op::Refcounts => q.flush_refcounts().map_err(BlockError::from),
        Op::Settle => {
            while q.dedup_step().map_err(BlockError::from)? {}
            Ok(())
        }
    }
}

/// Run `ops` until the storage fails. Returns the model as of the last completed flush and
/// the sectors touched since.
fn run(storage: Arc<FaultStorage>, ops: &[Op], start: &[u8], mode: Mode) -> (Vec<u8>, Vec<bool>) {
    let mut model = start.to_vec();
    let mut durable = model.clone();
    let mut touched = vec![false; model.len() / 512];
    let q = match Qcow2::open_storage(storage, &mode.options(), None, 0) {
        Ok(q) => q,
        Err(_) => return (durable, touched),
    };
    for &op in ops {
        if let Op::Write(o, l, _)
        | Op::WriteUnique(o, l, _)
        | Op::Discard(o, l)
        | Op::Zero(o, l, _) = op
        {
            for s in o / 512..(o + l).div_ceil(512) {
                touched[s as usize] = true;
            }
        }
        let r = apply(&q, &mut model, op);
        if r.is_err() {
            break;
        }
        if let Op::Flush | Op::Refcounts = op {
            durable = model.clone();
            touched.fill(false);
        }
    }
    let _ = q.close();
    (durable, touched)
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    crash_points(&Case::basic(), Mode::plain(false));
    // Metadata kept in memory until a flush: strict mode never sets DIRTY then.
    crash_points(&Case::basic(), Mode::plain(false).memory());
}

/// The writes persist before ack adds: a table piece written before the write returns, after
/// a sync when the data must be durable first (partial writes into reused clusters, a rewrite
/// of a preallocated zero cluster), new tables (synced) before their L1 entries, write-zeroes.
#[test]
fn every_crash_point_of_early_table_writes_leaves_a_consistent_image() {
    let case = Case::early();
    crash_points(&case, Mode::plain(false));
    crash_points(&case, Mode::plain(true));
    crash_points(&case, Mode::inline(false));
    crash_points(&case, Mode::inline(true));
}

/// Copy on write from a backing file: the copied bytes are durable before the entry that
/// points at them, whatever the crash.
#[test]
fn every_crash_point_of_backing_file_cow_leaves_a_consistent_image() {
    let case = Case::backing();
    crash_points(&case, Mode::plain(false));
    crash_points(&case, Mode::plain(true));
}

/// Dedup links, COPIED cleared and given back when a refcount falls to 1: the same guarantees.
#[test]
fn every_crash_point_with_dedup_leaves_a_consistent_image() {
    crash_points(&Case::basic(), Mode::inline(false));
    crash_points(&Case::basic(), Mode::inline(true));
}

/// With lazy refcounts a crash may leave the image DIRTY with refcounts behind the tables: then
/// `qemu-img check -r all` must make it clean with the data intact. Without DIRTY it must be as
/// consistent as in strict mode.
#[test]
fn every_crash_point_with_lazy_refcounts_is_repairable() {
    crash_points(&Case::basic(), Mode::plain(true));
}

/// Links to clusters flushed with COPIED in an earlier interval (the increment side of the
/// COPIED rule), with refcount-block growth between links: strict and lazy, inline.
#[test]
fn every_crash_point_of_links_to_flushed_clusters_inline() {
    let case = Case::links();
    crash_points(&case, Mode::inline(false));
    crash_points(&case, Mode::inline(true));
}

/// The same script with the background worker doing the links.
#[test]
fn every_crash_point_of_links_to_flushed_clusters_background() {
    let case = Case::links();
    crash_points(&case, Mode::background(false));
    crash_points(&case, Mode::background(true));
}

/// The same links while the refcount table moves (a 16 MiB image: one mode, the slowest case).
#[test]
fn every_crash_point_of_links_while_the_refcount_table_grows() {
    crash_points(&Case::links_table(), Mode::background(true));
}

/// Where the refcount table is after `case`'s script has run without a crash.
fn table_after(case: &Case, mode: Mode) -> u64 {
    let dry = Arc::new(FaultStorage::new(case.image.clone(), None));
    run(dry.clone(), &case.ops, &case.start, mode);
    reftable_offset(&dry.crashed_image(CrashMode::AllWrites))
}

/// Small unique writes with flushes between, from a prefill that ends short of the second half
/// of the table's last block but one: the refcount table grows ahead of the allocator, its steps
/// outside the metadata lock (`Refcounts::table_to_grow`), among the script's own writes. Strict
/// refcounts without DIRTY: every crash image must be consistent as it is (a DIRTY image would
/// let a repair hide a refcount table the header names too early).
#[test]
fn every_crash_point_of_a_refcount_table_grown_ahead() {
    let (case, mode) = (Case::table_ahead(), TABLE_AHEAD_MODE);
    // Grown ahead, the new blocks and table sit at the start of the table's last block's area
    // (its entry was empty); grown under the lock, past it (16 MiB).
    let at = table_after(&case, mode);
    assert!(
        at > reftable_offset(&case.image) && at < 16 << 20,
        "the table should have grown ahead of the allocator (new table at {at:#x})"
    );
    crash_points(&case, mode);
}

/// The same image, but one large write crosses the table's end in one allocation: the
/// growth happens under the lock (`Refcounts::grow`), settling nothing.
#[test]
fn every_crash_point_of_a_refcount_table_grown_under_the_lock() {
    let (case, mode) = (Case::table_locked(), TABLE_AHEAD_MODE);
    let at = table_after(&case, mode);
    assert!(
        at >= 16 << 20,
        "the table should have grown under the lock, past 16 MiB (new table at {at:#x})"
    );
    crash_points(&case, mode);
}

impl Mode {
    fn plain(lazy: bool) -> Mode {
        Mode {
            lazy,
            dedup: DedupMode::Off,
            ack: AckDurability::File,
        }
    }
    fn inline(lazy: bool) -> Mode {
        Mode {
            dedup: DedupMode::Inline,
            ..Mode::plain(lazy)
        }
    }
    fn background(lazy: bool) -> Mode {
        Mode {
            dedup: DedupMode::Background,
            ..Mode::plain(lazy)
        }
    }
    fn memory(self) -> Mode {
        Mode {
            ack: AckDurability::Memory,
            ..self
        }
    }
}

/// A script with the image it starts from.
struct Case {
    ops: Vec<Op>,
    image: Vec<u8>,
    /// The guest's view of `image`.
    start: Vec<u8>,
    /// The script must move the refcount table (checked on the run without a crash).
    grows_table: bool,
    /// Holds the backing file, if any.
    _dir: Option<tempfile::TempDir>,
}

/// The virtual size of `Case::links` and `Case::links_table` images.
const LINKS_SIZE: u64 = 4 << 20;
const LINKS_TABLE_SIZE: u64 = 24 << 20;

impl Case {
    fn basic() -> Case {
        Case::new(script(), SIZE, 12, 4, &[], false)
    }

    fn links() -> Case {
        // 140 new clusters: past at least one 128-cluster refcount block.
        let ops = link_script(3 << 20, 70 << 10);
        Case::new(ops, LINKS_SIZE, 10, 6, &link_prefill(false), false)
    }

    fn links_table() -> Case {
        let ops = link_script(20 << 20, 24 << 10);
        Case::new(ops, LINKS_TABLE_SIZE, 10, 6, &link_prefill(true), true)
    }

    fn table_ahead() -> Case {
        use Op::*;
        const K: u64 = 1024;
        let mut ops = Vec::new();
        for i in 0..12u64 {
            ops.push(WriteUnique((20 << 20) + i * 8 * K, 8 * K, 60 + i as u8));
            if i % 3 == 2 {
                ops.push(Flush);
            }
        }
        Case::table_prefilled(ops)
    }

    fn table_locked() -> Case {
        use Op::*;
        const K: u64 = 1024;
        let ops = vec![WriteUnique(20 << 20, 240 * K, 60), Flush];
        Case::table_prefilled(ops)
    }

    /// A plain image of 1 KiB clusters prefilled up to a little before the table growth's
    /// trigger (`PREFILL_AHEAD`), for `ops`.
    fn table_prefilled(ops: Vec<Op>) -> Case {
        use Op::*;
        let o = CreateOptions {
            size: LINKS_TABLE_SIZE,
            cluster_bits: 10,
            refcount_order: 6,
            ..Default::default()
        };
        let prefill = [WriteUnique(2 << 20, PREFILL_AHEAD, 10), Flush];
        Case::prefilled(ops, &o, &prefill, TABLE_AHEAD_MODE, true)
    }

    /// A new image (dedup recorded), with `prefill` written, flushed and closed on plain storage.
    fn new(
        ops: Vec<Op>,
        size: u64,
        cluster_bits: u32,
        order: u32,
        prefill: &[Op],
        grows: bool,
    ) -> Case {
        let o = CreateOptions {
            size,
            cluster_bits,
            refcount_order: order,
            // Recorded where the case prefills with dedup; the basic script starts plain.
            dedup: !prefill.is_empty(),
            ..Default::default()
        };
        Case::prefilled(ops, &o, prefill, Mode::inline(false), grows)
    }

    /// A new image of `o`, with `prefill` written in `mode`, flushed and closed on plain storage.
    fn prefilled(ops: Vec<Op>, o: &CreateOptions, prefill: &[Op], mode: Mode, grows: bool) -> Case {
        let mem = Arc::new(MemStorage::new());
        create(mem.as_ref(), o).unwrap();
        let mut start = vec![0u8; o.size as usize];
        if !prefill.is_empty() {
            let q = Qcow2::open_storage(mem.clone(), &mode.options(), None, 0).unwrap();
            for &op in prefill {
                apply(&q, &mut start, op).unwrap();
            }
            q.close().unwrap();
        }
        Case {
            ops,
            image: mem.snapshot(),
            start,
            grows_table: grows,
            _dir: None,
        }
    }

    fn early() -> Case {
        Case::new(early_script(), SIZE, 12, 4, &[], false)
    }

    /// A raw backing file of a pattern (each sector its own), under a 4 KiB-cluster image.
    fn backing() -> Case {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("base.raw");
        let mut start = vec![0u8; SIZE as usize];
        fill(&mut start, Op::WriteUnique(0, SIZE, 0x5a));
        std::fs::write(&raw, &start).unwrap();
        let mem = MemStorage::new();
        let o = CreateOptions {
            size: SIZE,
            cluster_bits: 12,
            backing: Some((raw.to_str().unwrap().into(), "raw".into())),
            ..Default::default()
        };
        create(&mem, &o).unwrap();
        Case {
            ops: backing_script(),
            image: mem.snapshot(),
            start,
            grows_table: false,
            _dir: Some(dir),
        }
    }
}

/// For `Case::early` (4 KiB clusters, 2 MiB per L2 table): early table writes between flushes.
fn early_script() -> Vec<Op> {
    use Op::*;
    const K: u64 = 1024;
    vec![
        Write(0, 32 * K, 1),
        Write(2 << 20, 16 * K, 20),
        Write(40 * K, 4 * K, 11),
        Flush,
        // One cluster freed (its old bytes stay until a sync makes the punch durable). With
        // dedup the next write is a link (no data, so no data sync) whose new table lands on
        // the freed cluster: the table must be durable before its L1 entry.
        Discard(40 * K, 4 * K),
        Flush,
        Write((4 << 20) + 8 * K, 4 * K, 20),
        // Freed clusters, reused below by partial writes: their old bytes must never show.
        Discard(4 * K, 12 * K),
        Flush,
        Write((1 << 20) + 512, 1024, 2),
        Write((1 << 20) + 8 * K + 1024, 512, 3),
        Write(20 * K + 512, 512, 4),  // in place
        Zero(24 * K, 4 * K, false),   // keeps the cluster, zero flag
        Write(24 * K + 1024, 512, 5), // rewrites the preallocated zero cluster
        Write(4 << 20, 4 * K, 6),     // a new table
        Zero(28 * K, 8 * K, true),
        Write((6 << 20) + 512, 512, 30), // another new table, partial
        Flush,
        Discard(2 << 20, 8 * K),
        Write((3 << 20) + 2 * K, 3 * K, 7),
        Flush,
        Write((2 << 20) + 512, 1024, 8),
        Write((1 << 20) + 4 * K, 4 * K + 512, 9),
        Flush,
    ]
}

/// For `Case::backing`: partial writes copy the rest of their clusters from the backing file.
fn backing_script() -> Vec<Op> {
    use Op::*;
    const K: u64 = 1024;
    vec![
        Write(512, 1024, 1),
        Write(64 * K + 4 * K - 512, 1024, 2), // spans two clusters
        Flush,
        Write(512, 512, 3),       // in place
        Write(3 << 20, 4 * K, 4), // a whole cluster: nothing copied, a new table
        Write((3 << 20) + 6 * K, 512, 5),
        Discard(128 * K, 8 * K), // zero flag over the backing file
        Write(128 * K + 1024, 512, 6),
        Zero(256 * K, 4 * K, true),
        Flush,
        Write((5 << 20) + 512, 2048, 7),
        Write(512 * K, 12 * K, 8),
        Flush,
    ]
}

/// The refcount table's offset in a header.
fn reftable_offset(img: &[u8]) -> u64 {
    u64::from_be_bytes(img[48..56].try_into().unwrap())
}

/// How many refcount blocks the refcount table points at.
fn refcount_blocks(img: &[u8]) -> usize {
    let off = reftable_offset(img) as usize;
    let clusters = u32::from_be_bytes(img[56..60].try_into().unwrap()) as usize;
    let cs = 1usize << u32::from_be_bytes(img[20..24].try_into().unwrap());
    img[off..off + clusters * cs]
        .chunks_exact(8)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count()
}

fn all_writes(st: &FaultStorage) -> Vec<u8> {
    st.crashed_image(CrashMode::AllWrites)
}

fn crash_points(case: &Case, mode: Mode) {
    let dry = Arc::new(FaultStorage::new(case.image.clone(), None));
    let (end, _) = run(dry.clone(), &case.ops, &case.start, mode);
    let total = dry.writes();
    // Without a crash the image is exactly clean: no leak, no COPIED flag out of step.
    let dir0 = tempfile::tempdir().unwrap();
    let clean = dir0.path().join("clean.qcow2");
    let all = dry.crashed_image(CrashMode::AllWrites);
    std::fs::write(&clean, &all).unwrap();
    common::assert_check_clean(&clean);
    assert_eq!(
        common::crash::read_all(all),
        end,
        "{mode:?}: the data after the whole script"
    );
    assert!(
        total > 30,
        "the script should do real metadata work ({total} writes)"
    );
    if !case.ops.iter().any(|op| matches!(op, Op::WriteUnique(..))) {
        // (the basic script)
    } else {
        let blocks = |img: &[u8]| refcount_blocks(img);
        assert!(
            blocks(&all_writes(&dry)) > blocks(&case.image),
            "{mode:?}: the script should add refcount blocks"
        );
    }
    if case.grows_table {
        assert_ne!(
            reftable_offset(&case.image),
            reftable_offset(&dry.crashed_image(CrashMode::AllWrites)),
            "{mode:?}: the script should move the refcount table"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    let mut checked = 0;
    for n in 0..=total {
        let st = Arc::new(FaultStorage::new(case.image.clone(), Some(n)));
        let (durable, touched) = run(st.clone(), &case.ops, &case.start, mode);
        let mut modes = vec![
            CrashMode::FlushedOnly,
            CrashMode::AllWrites,
            CrashMode::RandomSubset(n * 7 + 1),
            CrashMode::TornSectors(n * 11 + 3),
        ];
        if case.grows_table {
            // The header switch landing before the new table it names.
            modes.push(CrashMode::NewestOnly);
        }
        for cm in modes {
            let what = format!("{mode:?}: crash after write {n} ({cm:?})");
            let (dirty, disk) = common::crash::check_crashed(&path, st.crashed_image(cm), &what);
            let may_dirty =
                mode.lazy || mode.dedup != DedupMode::Off || mode.ack == AckDurability::File;
            assert!(
                may_dirty || !dirty,
                "strict mode without persist before ack never sets DIRTY"
            );
            // Every flushed sector not touched since reads back.
            for (s, t) in touched.iter().enumerate() {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    *t || disk[r.clone()] == durable[r.clone()],
                    "{mode:?}: crash after write {n} ({cm:?}): flushed sector {s} lost"
                );
            }
            checked += 1;
        }
    }
    let modes = if case.grows_table { 5 } else { 4 };
    assert_eq!(checked, modes * (total + 1));
}

#[test]
fn lazy_refcounts_set_dirty_on_flush_and_clear_it_on_close() {
    let mem = MemStorage::new();
    create(
        &mem,
        &CreateOptions {
            size: SIZE,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    let st = Arc::new(FaultStorage::new(mem.snapshot(), None));
    // Metadata in memory until a flush: DIRTY only when a flush writes tables ahead of their
    // refcounts (persist before ack sets it at the first write instead: see below).
    let opts = OpenOptions {
        ack_durability: AckDurability::Memory,
        ..Default::default()
    };
    let q = Qcow2::open_storage(st.clone(), &opts, None, 0).unwrap();
    assert!(q.lazy_refcounts(), "follows the compatible bit");
    let dirty = |st: &FaultStorage| st.crashed_image(CrashMode::FlushedOnly)[79] & 1 != 0;
    q.write_vectored(0, &[IoSlice::new(&[7u8; 4096])]).unwrap();
    assert!(!dirty(&st), "nothing written yet");
    q.flush().unwrap();
    assert!(
        dirty(&st),
        "L2 reached the disk before its refcounts: DIRTY must be set"
    );
    q.flush_refcounts().unwrap();
    assert!(!dirty(&st), "refcounts written: DIRTY cleared");
    q.write_vectored(1 << 20, &[IoSlice::new(&[8u8; 4096])])
        .unwrap();
    q.flush().unwrap();
    assert!(dirty(&st));
    q.close().unwrap();
    assert!(!dirty(&st), "clean close clears DIRTY");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    std::fs::write(&p, st.crashed_image(CrashMode::FlushedOnly)).unwrap();
    common::assert_check_clean(&p);
    common::qemu_io(&p, "qcow2", &["read -P 7 0 4096", "read -P 8 1M 4096"]);
}

/// Persist before ack: the first write that puts a table piece into the file sets DIRTY
/// (synced) first, in strict mode too; the refcount timer and a clean close end the window.
#[test]
fn persist_before_ack_sets_dirty_before_the_first_table_write() {
    for lazy in [false, true] {
        let mem = MemStorage::new();
        let o = CreateOptions {
            size: SIZE,
            ..Default::default()
        };
        create(&mem, &o).unwrap();
        let st = Arc::new(FaultStorage::new(mem.snapshot(), None));
        let opts = OpenOptions {
            lazy_refcounts: Some(lazy),
            ..Default::default()
        };
        let q = Qcow2::open_storage(st.clone(), &opts, None, 0).unwrap();
        assert!(q.needs_refcount_timer());
        let dirty = |st: &FaultStorage| st.crashed_image(CrashMode::FlushedOnly)[79] & 1 != 0;
        q.write_vectored(0, &[IoSlice::new(&[7u8; 4096])]).unwrap();
        assert!(
            dirty(&st),
            "lazy {lazy}: the entry is in the file: DIRTY must be durable"
        );
        // The write's table and L1 entry are in the file (not synced).
        let all = st.crashed_image(CrashMode::AllWrites);
        let mut back = vec![0u8; 4096];
        let r = Qcow2::open_storage(
            Arc::new(MemStorage::from_vec(all)),
            &OpenOptions::read_only(true),
            None,
            0,
        )
        .unwrap();
        r.read_vectored(0, &mut [IoSliceMut::new(&mut back)])
            .unwrap();
        assert_eq!(
            back,
            vec![7u8; 4096],
            "lazy {lazy}: the write is in the file"
        );
        // A write in place changes no metadata: no table write.
        let before = st.writes();
        q.write_vectored(512, &[IoSlice::new(&[8u8; 512])]).unwrap();
        assert_eq!(st.writes(), before + 1, "lazy {lazy}: only the data");
        q.flush_refcounts().unwrap();
        assert!(!dirty(&st), "lazy {lazy}: refcounts written: DIRTY cleared");
        q.write_vectored(1 << 20, &[IoSlice::new(&[9u8; 4096])])
            .unwrap();
        assert!(dirty(&st), "lazy {lazy}");
        q.close().unwrap();
        assert!(!dirty(&st), "lazy {lazy}: clean close clears DIRTY");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.qcow2");
        std::fs::write(&p, st.crashed_image(CrashMode::FlushedOnly)).unwrap();
        common::assert_check_clean(&p);
        common::qemu_io(
            &p,
            "qcow2",
            &["read -P 7 0 512", "read -P 8 512 512", "read -P 9 1M 4096"],
        );
    }
}

#[test]
fn failed_flush_is_reported_and_later_flush_recovers() {
    let mem = MemStorage::new();
    create(
        &mem,
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap();
    let st = Arc::new(FaultStorage::new(mem.snapshot(), None));
    let q = Qcow2::open_storage(st.clone(), &OpenOptions::default(), None, 0).unwrap();
    q.write_vectored(0, &[IoSlice::new(&[9u8; 4096])]).unwrap();
    st.fail_next_flush();
    assert!(q.flush().is_err());
    q.flush().unwrap();
    q.close().unwrap();
    let bytes = st.crashed_image(CrashMode::FlushedOnly);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    std::fs::write(&p, bytes).unwrap();
    common::assert_check_clean(&p);
    common::qemu_io(&p, "qcow2", &["read -P 9 0 4096"]);
    let _ = st.len();
}
