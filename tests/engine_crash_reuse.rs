//! A freed cluster handed out again must never show its old content after a crash. A write
//! into a reused cluster may skip the sync of its data before the table entry that points at
//! it only when the cluster's hole was punched and synced first (`Refcounts::holes`): then a
//! lost data write reads as zeros, as for a cluster past the end of the file. Crashes at every
//! write, in every crash mode, strict and lazy, with persist before ack and without, plain and
//! with inline dedup.

mod common;

use std::io::IoSlice;
use std::sync::Arc;
use vhost_user_qcow2::block::{BlockDevice, BlockError};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

const CS: u64 = 4096;
/// Guest clusters: `OLD` is written, flushed and discarded; `NEW` is written afterwards into
/// the host cluster `OLD` had.
const OLD: u64 = 16;
const NEW: u64 = 40;
/// Bytes written into `NEW`: half a cluster.
const NEW_LEN: usize = 2048;

fn image(dedup: bool) -> Vec<u8> {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: 1 << 20,
        cluster_bits: 12,
        dedup,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    mem.snapshot()
}

/// The host cluster guest cluster `gc` maps to in `img` (one L2 table), if any.
fn host_of(img: &[u8], gc: u64) -> Option<u64> {
    let be = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00;
    let e = be(l2 + gc * 8) & 0x00ff_ffff_ffff_fe00;
    (l2 != 0 && e != 0).then_some(e)
}

/// Write, flush, discard, flush (the frees are applied and punched), then (unless `prefix`)
/// the write that reuses the freed cluster and a flush, which a crash may cut short.
fn reuse_script(q: &Qcow2, prefix: bool) -> Result<(), BlockError> {
    q.write_vectored(OLD * CS, &[IoSlice::new(&[0xaa; CS as usize])])?;
    q.flush()?;
    q.discard(OLD * CS, CS)?;
    q.flush()?;
    if prefix {
        return Ok(());
    }
    // Part of a cluster: the rest is not written around it (a durable hole reads as zeros).
    q.write_vectored(NEW * CS, &[IoSlice::new(&[0x55; NEW_LEN])])?;
    q.flush()
}

type Script = fn(&Qcow2, bool) -> Result<(), BlockError>;

/// Runs `script` on `st`; returns how many writes it made before the close.
fn run(st: Arc<FaultStorage>, opts: &OpenOptions, script: Script, prefix: bool) -> u64 {
    let Ok(q) = Qcow2::open_storage(st.clone(), opts, None, 0) else {
        return st.writes();
    };
    let _ = script(&q, prefix);
    let n = st.writes();
    let _ = q.close();
    n
}

/// Crash `script` on `img` after every write. Every image a crash leaves (only flushed writes,
/// all, torn sectors, and, once the script's prefix is done, 24 random subsets: the one that
/// shows a lost write keeps an entry and loses the writes it depends on) must pass
/// `check_crashed`; then `check` looks at the guest's view (and is told whether the crash
/// came after the prefix). Crashes inside the prefix are the
/// business of tests/engine_crash.rs: only the fixed modes there.
fn crash_each(
    img: &[u8],
    opts: &OpenOptions,
    script: Script,
    what: &str,
    check: impl Fn(&[u8], &str, bool),
) {
    let dry = Arc::new(FaultStorage::new(img.to_vec(), None));
    run(dry.clone(), opts, script, false);
    let from = run(
        Arc::new(FaultStorage::new(img.to_vec(), None)),
        opts,
        script,
        true,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    for n in 0..=dry.writes() {
        let st = Arc::new(FaultStorage::new(img.to_vec(), Some(n)));
        run(st.clone(), opts, script, false);
        let k = if n >= from { 24 } else { 0 };
        let subsets = (0..k).map(|k| CrashMode::RandomSubset(n * 7919 + k * 104_729 + 1));
        let modes = [
            CrashMode::FlushedOnly,
            CrashMode::AllWrites,
            CrashMode::TornSectors(n * 11 + 3),
        ];
        for cm in modes.into_iter().chain(subsets) {
            let w = format!("{what}: crash after write {n} ({cm:?})");
            let (_, disk) = common::crash::check_crashed(&path, st.crashed_image(cm), &w);
            check(&disk, &w, n >= from);
        }
    }
}

fn options(lazy: bool, ack: AckDurability, dedup: DedupMode) -> OpenOptions {
    OpenOptions {
        lazy_refcounts: Some(lazy),
        ack_durability: ack,
        dedup_mode: (dedup != DedupMode::Off).then_some(dedup),
        ..Default::default()
    }
}

#[test]
fn a_reused_cluster_never_shows_its_old_content_after_a_crash() {
    let configs = [
        (false, AckDurability::File, DedupMode::Off),
        (false, AckDurability::Memory, DedupMode::Off),
        (true, AckDurability::File, DedupMode::Off),
        (true, AckDurability::Memory, DedupMode::Off),
        // A unique cluster of a dedup write takes the same shortcut (`write_unique`).
        (false, AckDurability::File, DedupMode::Inline),
        (true, AckDurability::Memory, DedupMode::Inline),
    ];
    for (lazy, ack, dedup) in configs {
        let img = image(dedup != DedupMode::Off);
        let opts = options(lazy, ack, dedup);
        let what = format!("lazy {lazy}, ack {ack:?}, dedup {dedup:?}");
        // The script reuses the freed cluster: where OLD was before its discard is where NEW
        // is at the end.
        let dry = Arc::new(FaultStorage::new(img.clone(), None));
        run(dry.clone(), &opts, reuse_script, false);
        let first = Arc::new(FaultStorage::new(img.clone(), None));
        let q = Qcow2::open_storage(first.clone(), &opts, None, 0).unwrap();
        q.write_vectored(OLD * CS, &[IoSlice::new(&[0xaa; CS as usize])])
            .unwrap();
        q.close().unwrap();
        let old_host = host_of(&first.crashed_image(CrashMode::AllWrites), OLD);
        let new_host = host_of(&dry.crashed_image(CrashMode::AllWrites), NEW);
        assert!(
            old_host.is_some() && old_host == new_host,
            "{what}: the script should reuse the freed cluster ({old_host:?}, {new_host:?})"
        );
        crash_each(&img, &opts, reuse_script, &what, |disk, w, _| {
            let new = &disk[(NEW * CS) as usize..((NEW + 1) * CS) as usize];
            for (i, s) in new.chunks(512).enumerate() {
                let written = i * 512 < NEW_LEN;
                assert!(
                    (written && s.iter().all(|&b| b == 0x55)) || s.iter().all(|&b| b == 0),
                    "{w}: sector {i} of the new cluster reads {:#x}",
                    s[0]
                );
            }
        });
    }
}

/// Guest cluster `B` holds flushed data; `A`, which read as zeros, gets new content in a new
/// cluster without a sync of that data (it reads as zeros on disk); then `B` gets the same
/// content, and inline dedup links `B` to `A`'s cluster. The link must sync that data first,
/// or a crash keeping `B`'s new entry would turn its flushed content into zeros.
fn link_script(q: &Qcow2, prefix: bool) -> Result<(), BlockError> {
    q.write_vectored(B * CS, &[IoSlice::new(&[0x33; CS as usize])])?;
    q.flush()?;
    if prefix {
        return Ok(());
    }
    q.write_vectored(A * CS, &[IoSlice::new(&[0x55; CS as usize])])?;
    q.write_vectored(B * CS, &[IoSlice::new(&[0x55; CS as usize])])?;
    q.flush()
}

const A: u64 = 20;
const B: u64 = 30;

#[test]
fn a_link_to_a_new_cluster_never_loses_the_linked_clusters_content() {
    for (lazy, ack) in [
        (false, AckDurability::File),
        (true, AckDurability::File),
        (true, AckDurability::Memory),
    ] {
        let img = image(true);
        let opts = options(lazy, ack, DedupMode::Inline);
        let what = format!("lazy {lazy}, ack {ack:?}");
        let dry = Arc::new(FaultStorage::new(img.clone(), None));
        run(dry.clone(), &opts, link_script, false);
        let all = dry.crashed_image(CrashMode::AllWrites);
        assert_eq!(
            host_of(&all, A),
            host_of(&all, B),
            "{what}: B is linked to A"
        );
        crash_each(&img, &opts, link_script, &what, |disk, w, after| {
            if !after {
                return; // B's first content was not flushed yet
            }
            let b = &disk[(B * CS) as usize..((B + 1) * CS) as usize];
            assert!(
                b.iter().all(|&x| x == 0x33) || b.iter().all(|&x| x == 0x55),
                "{w}: B reads {:#x} at {}",
                b[b.iter().position(|&x| x != 0x33 && x != 0x55).unwrap_or(0)],
                b.iter().position(|&x| x != 0x33 && x != 0x55).unwrap_or(0)
            );
        });
    }
}
