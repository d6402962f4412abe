//! Crash consistency: a scripted workload runs on fault-injecting storage that "crashes" after
//! the N-th write, for every N. What a disk could hold afterwards (only flushed writes, all
//! writes, or a random subset of the unflushed ones) must pass `qemu-img check` with no
//! corruption (leaks allowed), and every sector written before the last completed flush and not
//! touched since must read back.

mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage, Storage};

const SIZE: u64 = 8 << 20;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Flush,
    Discard(u64, u64),
    Zero(u64, u64, bool),
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
        Flush,
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

/// Run the script until the storage fails. Returns the model as of the last completed flush and
/// the sectors touched since.
fn run(storage: Arc<FaultStorage>, lazy: bool, dedup: bool) -> (Vec<u8>, Vec<bool>) {
    let mut model = vec![0u8; SIZE as usize];
    let mut durable = model.clone();
    let mut touched = vec![false; (SIZE / 512) as usize];
    let opts = OpenOptions {
        lazy_refcounts: Some(lazy),
        dedup: Some(dedup),
        ..Default::default()
    };
    let q = match Qcow2::open_storage(storage, &opts, None, 0) {
        Ok(q) => q,
        Err(_) => return (durable, touched),
    };
    for op in script() {
        let (off, len) = match op {
            Op::Write(o, l, _) | Op::Discard(o, l) | Op::Zero(o, l, _) => (o, l),
            Op::Flush => (0, 0),
        };
        for s in off / 512..(off + len).div_ceil(512) {
            touched[s as usize] = true;
        }
        let r = match op {
            Op::Write(o, l, v) => {
                let data = vec![v; l as usize];
                model[o as usize..(o + l) as usize].fill(v);
                q.write_vectored(o, &[IoSlice::new(&data)])
            }
            Op::Discard(o, l) => {
                model[o as usize..(o + l) as usize].fill(0);
                q.discard(o, l)
            }
            Op::Zero(o, l, u) => {
                model[o as usize..(o + l) as usize].fill(0);
                q.write_zeroes(o, l, u)
            }
            Op::Flush => q.flush().map(|_| {
                durable = model.clone();
                touched.fill(false);
            }),
        };
        if r.is_err() {
            break;
        }
    }
    let _ = q.close();
    (durable, touched)
}

#[test]
fn every_crash_point_leaves_a_consistent_image() {
    crash_points(false, false);
}

/// Dedup links, COPIED cleared and given back when a refcount falls to 1: the same guarantees.
#[test]
fn every_crash_point_with_dedup_leaves_a_consistent_image() {
    crash_points(false, true);
    crash_points(true, true);
}

/// With lazy refcounts a crash may leave the image DIRTY with refcounts behind the tables: then
/// `qemu-img check -r all` must make it clean with the data intact. Without DIRTY it must be as
/// consistent as in strict mode.
#[test]
fn every_crash_point_with_lazy_refcounts_is_repairable() {
    crash_points(true, false);
}

fn crash_points(lazy: bool, dedup: bool) {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: SIZE,
        cluster_bits: 12,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let initial = mem.snapshot();

    let dry = Arc::new(FaultStorage::new(initial.clone(), None));
    run(dry.clone(), lazy, dedup);
    let total = dry.writes();
    // Without a crash the image is exactly clean: no leak, no COPIED flag out of step.
    let dir0 = tempfile::tempdir().unwrap();
    let clean = dir0.path().join("clean.qcow2");
    std::fs::write(&clean, dry.crashed_image(CrashMode::AllWrites)).unwrap();
    common::assert_check_clean(&clean);
    assert!(
        total > 30,
        "the script should do real metadata work ({total} writes)"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    let mut checked = 0;
    for n in 0..=total {
        let st = Arc::new(FaultStorage::new(initial.clone(), Some(n)));
        let (durable, touched) = run(st.clone(), lazy, dedup);
        for mode in [
            CrashMode::FlushedOnly,
            CrashMode::AllWrites,
            CrashMode::RandomSubset(n * 7 + 1),
            CrashMode::TornSectors(n * 11 + 3),
        ] {
            let bytes = st.crashed_image(mode);
            std::fs::write(&path, &bytes).unwrap();
            let dirty = bytes[79] & 1 != 0;
            assert!(lazy || dedup || !dirty, "strict mode never sets DIRTY");
            let bytes = if dirty {
                let (code, out) = common::qemu_img(&["check", "-r", "all", path.to_str().unwrap()]);
                assert_eq!(code, 0, "crash after write {n} ({mode:?}): repair:\n{out}");
                std::fs::read(&path).unwrap()
            } else {
                bytes
            };
            let (code, out) = common::qemu_img(&["check", path.to_str().unwrap()]);
            assert!(
                code == 0 || code == 3,
                "crash after write {n} ({mode:?}, dirty {dirty}): qemu-img check exit {code}\n{out}"
            );
            // Every flushed sector not touched since reads back.
            let q = Qcow2::open_storage(
                Arc::new(MemStorage::from_vec(bytes)),
                &OpenOptions::read_only(true),
                None,
                0,
            )
            .unwrap_or_else(|e| panic!("crash after write {n} ({mode:?}): reopen: {e}"));
            let mut disk = vec![0u8; SIZE as usize];
            q.read_vectored(0, &mut [IoSliceMut::new(&mut disk)])
                .unwrap();
            for (s, t) in touched.iter().enumerate() {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    *t || disk[r.clone()] == durable[r.clone()],
                    "crash after write {n} ({mode:?}): flushed sector {s} lost"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * (total + 1));
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
    let q = Qcow2::open_storage(st.clone(), &OpenOptions::default(), None, 0).unwrap();
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
