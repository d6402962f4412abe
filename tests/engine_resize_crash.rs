//! Crash consistency of `Qcow2::resize`: a script that writes, grows the disk (moving the L1
//! table, then growing it in place), writes past the old end and flushes runs on
//! fault-injecting storage that "crashes" at the N-th write or sync, for every N. Whatever a
//! disk could hold afterwards (only synced writes, all writes, a random subset of the unsynced
//! ones, torn sectors) must pass `qemu-img check` (exit 0 or 3; a DIRTY image after
//! `check -r all`), have the old or the new size (the new one once `resize` returned), and
//! read back every sector synced and not touched since.

mod common;

use common::crash::{check_crashed, read_all};
use std::collections::BTreeMap;
use std::io::IoSlice;
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

const K: u64 = 1024;
const M: u64 = 1 << 20;
/// 1 KiB clusters: an L2 table covers 128 KiB, an L1 cluster holds 128 entries (16 MiB).
const CLUSTER_BITS: u32 = 10;
const START: u64 = 16 * M;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Flush,
    Resize(u64),
}

fn script() -> Vec<Op> {
    use Op::*;
    vec![
        Write(0, 4 * K, 1),
        Write(5 * M, 3 * K, 2),
        Flush,
        Write(9 * M + 512, K, 3), // a new L2 table, not flushed before the L1 moves
        Resize(20 * M),           // 160 entries: the table moves to 2 clusters
        Write(START - K, 2 * K, 4), // across the old end
        Write(19 * M, 4 * K, 5),  // past the old end
        Flush,
        Resize(24 * M + 512), // 193 entries: in place, in the new clusters
        Write(24 * M - K, K + 512, 6), // the new last sector
        Write(K, K, 7),
        Flush,
    ]
}

/// The guest's data as the script wrote it, sector by sector (unwritten sectors read zeros).
#[derive(Clone, Default)]
struct Model {
    sectors: BTreeMap<u64, u8>,
    size: u64,
}

fn run(st: Arc<FaultStorage>, dedup: DedupMode, lazy: bool) -> (Model, Vec<u64>) {
    let mut model = Model {
        size: START,
        ..Default::default()
    };
    let mut durable = model.clone();
    let mut touched = Vec::new();
    let opts = OpenOptions {
        lazy_refcounts: Some(lazy),
        dedup_mode: Some(dedup),
        ..Default::default()
    };
    let Ok(q) = Qcow2::open_storage(st, &opts, None, 0) else {
        return (durable, touched);
    };
    for op in script() {
        let r = match op {
            Op::Write(o, l, v) => {
                for s in o / 512..(o + l).div_ceil(512) {
                    model.sectors.insert(s, v);
                    touched.push(s);
                }
                q.write_vectored(o, &[IoSlice::new(&vec![v; l as usize])])
            }
            Op::Flush => q.flush(),
            Op::Resize(n) => {
                let r = BlockDevice::resize(&q, n);
                if r.is_ok() {
                    model.size = n;
                    // A resize is durable when it returns (the size and the L1 table).
                    durable.size = n;
                }
                r
            }
        };
        if r.is_err() {
            break;
        }
        if let Op::Flush = op {
            durable = model.clone();
            touched.clear();
        }
    }
    let _ = q.close();
    (durable, touched)
}

fn crash_points(dedup: DedupMode, lazy: bool) {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: START,
        cluster_bits: CLUSTER_BITS,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let image = mem.snapshot();
    let what = format!("dedup {dedup:?}, lazy {lazy}");
    let dry = Arc::new(FaultStorage::new(image.clone(), None));
    let (end, _) = run(dry.clone(), dedup, lazy);
    assert_eq!(end.size, 24 * M + 512, "{what}: the script ran through");
    let total = dry.writes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    let all = dry.crashed_image(CrashMode::AllWrites);
    let l1 = |b: &[u8]| u64::from_be_bytes(b[40..48].try_into().unwrap());
    assert_ne!(
        l1(&all),
        l1(&image),
        "{what}: the script moves the L1 table"
    );
    std::fs::write(&path, &all).unwrap();
    common::assert_check_clean(&path);
    verify(&read_all(all), &end, &[], &what);
    for n in 0..=total {
        let st = Arc::new(FaultStorage::new(image.clone(), Some(n)));
        let (durable, touched) = run(st.clone(), dedup, lazy);
        for cm in [
            CrashMode::FlushedOnly,
            CrashMode::AllWrites,
            CrashMode::RandomSubset(n * 7 + 1),
            CrashMode::TornSectors(n * 11 + 3),
        ] {
            let what = format!("{what}: crash after write {n} ({cm:?})");
            let (_, disk) = check_crashed(&path, st.crashed_image(cm), &what);
            verify(&disk, &durable, &touched, &what);
        }
    }
}

/// The image's size (the guest's view `disk`) is one the script had, at least the durable one,
/// and every durable sector not touched since reads back.
fn verify(disk: &[u8], durable: &Model, touched: &[u64], what: &str) {
    let size = disk.len() as u64;
    assert!(
        [START, 20 * M, 24 * M + 512].contains(&size) && size >= durable.size,
        "{what}: size {size}, durable {}",
        durable.size
    );
    for (&s, &v) in &durable.sectors {
        let r = (s * 512) as usize..(s * 512 + 512) as usize;
        assert!(
            touched.contains(&s) || disk[r].iter().all(|&x| x == v),
            "{what}: synced sector {s} lost"
        );
    }
}

#[test]
fn every_crash_point_of_a_resize_strict() {
    crash_points(DedupMode::Off, false);
}

#[test]
fn every_crash_point_of_a_resize_lazy() {
    crash_points(DedupMode::Off, true);
}

#[test]
fn every_crash_point_of_a_resize_with_inline_dedup() {
    crash_points(DedupMode::Inline, true);
}
