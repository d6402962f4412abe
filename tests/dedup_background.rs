//! Background deduplication: writes complete plain and are recorded as pending; the worker merges
//! them later, also across a clean restart (pending records in the image) and a crash (the
//! rebuild finds the duplicates again); the mode and the pause state survive restarts; and the
//! worker racing guest writes never loses a write or links wrongly.

mod common;

use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};

const CS: u64 = 65536;

fn open(path: &Path, mode: Option<DedupMode>) -> Qcow2 {
    Qcow2::open_with(
        path,
        &OpenOptions {
            dedup_mode: mode,
            ..Default::default()
        },
    )
    .unwrap()
}

fn pattern(k: u32) -> Vec<u8> {
    (0..CS as u32)
        .map(|i| (i.wrapping_mul(k | 1).wrapping_add(k * 13) >> 2) as u8)
        .collect()
}

/// Clusters 0..n: content `i % distinct` (so each content `n / distinct` times).
fn write_dups(q: &Qcow2, n: u64, distinct: u32) {
    for gc in 0..n {
        let p = pattern(gc as u32 % distinct);
        q.write_vectored(gc * CS, &[IoSlice::new(&p)]).unwrap();
    }
}

fn check_dups(img: &Path, n: u64, distinct: u32) {
    let q = Qcow2::open(img, true).unwrap();
    let mut b = vec![0u8; CS as usize];
    for gc in 0..n {
        q.read_vectored(gc * CS, &mut [IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(b == pattern(gc as u32 % distinct), "cluster {gc}");
    }
}

fn drain(q: &Qcow2) -> u64 {
    let mut n = 0;
    while q.dedup_step().unwrap() {
        n += 1;
    }
    n
}

#[test]
fn writes_complete_plain_then_the_worker_merges_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let q = open(&img, Some(DedupMode::Background));
    assert_eq!(q.dedup_mode(), DedupMode::Background);
    write_dups(&q, 64, 32);
    let s = q.dedup_stats().unwrap();
    assert_eq!((s.clusters_deduplicated, s.pending_clusters), (0, 64));
    assert_eq!(drain(&q), 64);
    let s = q.dedup_stats().unwrap();
    assert_eq!(s.pending_clusters, 0);
    assert_eq!(s.clusters_deduplicated, 32, "{s:?}");
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 32);
    check_dups(&img, 64, 32);
}

#[test]
fn pending_work_mode_and_pause_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let q = open(&img, Some(DedupMode::Background));
    write_dups(&q, 40, 10);
    q.set_dedup_paused(true).unwrap();
    assert!(!q.dedup_step().unwrap(), "paused: no work");
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    // Reopened with the image's own setting.
    let q = open(&img, None);
    assert_eq!(q.dedup_mode(), DedupMode::Background);
    assert!(q.dedup_paused());
    assert_eq!(q.dedup_stats().unwrap().pending_clusters, 40);
    assert_eq!(q.dedup_open_report().unwrap().clusters_hashed, 0);
    assert!(!q.dedup_step().unwrap());
    q.set_dedup_paused(false).unwrap();
    assert_eq!(drain(&q), 40);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 10);
    check_dups(&img, 40, 10);
    // Switched to inline at run time: recorded at once, and kept.
    let q = open(&img, None);
    q.set_dedup_mode(DedupMode::Inline).unwrap();
    std::mem::forget(q);
    let q = open(&img, None);
    assert_eq!(q.dedup_mode(), DedupMode::Inline);
}

#[test]
fn a_crash_in_background_mode_loses_no_pending_work() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let q = open(&img, Some(DedupMode::Background));
    write_dups(&q, 48, 12);
    q.flush().unwrap();
    std::mem::forget(q); // killed: no close
    let q = open(&img, None);
    assert_eq!(
        q.dedup_mode(),
        DedupMode::Background,
        "mode recorded at open"
    );
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "rebuilt");
    assert_eq!(rep.pending, 36, "{rep:?}");
    assert_eq!(drain(&q), 36);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 12);
    check_dups(&img, 48, 12);
}

#[test]
fn the_worker_racing_guest_writes_loses_nothing() {
    for seed in 1..=2u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("w.qcow2");
        let raw = dir.path().join("w.raw");
        let clusters = 96u64;
        common::new_dedup_image(&img, clusters * CS);
        let q = Arc::new(open(&img, Some(DedupMode::Background)));
        let worker = q.start_dedup_worker().unwrap();
        // Two writers on disjoint halves (so the model is exact), contents from a small set.
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 10 + t);
                    let mut last = vec![None; (clusters / 2) as usize];
                    for _ in 0..400 {
                        let i = rng.random_range(0..clusters / 2);
                        let gc = t * (clusters / 2) + i;
                        let k = rng.random_range(0..8u32);
                        let p = if k == 7 {
                            vec![0u8; CS as usize]
                        } else {
                            pattern(k)
                        };
                        q.write_vectored(gc * CS, &[IoSlice::new(&p)]).unwrap();
                        last[i as usize] = Some(k);
                    }
                    last
                })
            })
            .collect();
        let lasts: Vec<Vec<Option<u32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let t0 = Instant::now();
        while q.dedup_pending() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(60), "worker stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(worker);
        q.close().unwrap();
        drop(q);
        let mut model = Vec::new();
        let mut distinct = HashSet::new();
        for l in lasts.iter().flatten() {
            match l {
                Some(k) if *k != 7 => {
                    model.extend(pattern(*k));
                    distinct.insert(*k);
                }
                _ => model.extend(vec![0u8; CS as usize]),
            }
        }
        std::fs::write(&raw, &model).unwrap();
        common::assert_check_clean(&img);
        common::assert_same_as_raw(&img, &raw);
        assert_eq!(common::physical_clusters(&img, CS), distinct.len());
    }
}
