//! Inline deduplication against a model: duplicate-heavy random workloads, then `qemu-img check`
//! exit 0 (no leaks either), `qemu-img compare` equal, and one physical cluster per distinct
//! content. Also two threads writing the same content at once, QEMU snapshots of a dedup image,
//! and an image changed behind our back by qemu-io.

mod common;

use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::{Arc, Barrier};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

const CS: u64 = 65536;

fn new_image(path: &Path, size: u64) {
    let o = CreateOptions {
        size,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(path).unwrap()), &o).unwrap();
}

fn open(path: &Path) -> Qcow2 {
    Qcow2::open_with(
        path,
        &OpenOptions {
            dedup: Some(true),
            ..Default::default()
        },
    )
    .unwrap()
}

fn pattern(k: u8) -> Vec<u8> {
    (0..CS as usize)
        .map(|i| (i as u8).wrapping_mul(k | 1).wrapping_add(k))
        .collect()
}

#[test]
fn duplicate_heavy_random_workload_matches_the_model() {
    for seed in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let raw = dir.path().join("d.raw");
        let size = 32 << 20;
        new_image(&img, size);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pats: Vec<Vec<u8>> = (0..6).map(pattern).collect();
        let mut model = vec![0u8; size as usize];
        let mut q = open(&img);
        let mut deduplicated = 0;
        let clusters = size / CS;
        for _ in 0..600 {
            let gc = rng.random_range(0..clusters);
            match rng.random_range(0..100) {
                0..=59 => {
                    // Whole clusters of one of a few contents (sometimes zeros), one or more.
                    let n = rng.random_range(1..=3u64).min(clusters - gc);
                    let mut data = Vec::new();
                    for _ in 0..n {
                        if rng.random_range(0..10) == 0 {
                            data.extend(std::iter::repeat_n(0u8, CS as usize));
                        } else {
                            data.extend_from_slice(&pats[rng.random_range(0..pats.len())]);
                        }
                    }
                    q.write_vectored(gc * CS, &[IoSlice::new(&data)]).unwrap();
                    model[(gc * CS) as usize..(gc * CS) as usize + data.len()]
                        .copy_from_slice(&data);
                }
                60..=74 => {
                    // Partial writes: the rest of the cluster is read first.
                    let off = gc * CS + rng.random_range(0..CS / 512) * 512;
                    let len = (rng.random_range(1..=16u64) * 512).min(size - off);
                    let v: u8 = rng.random_range(1..4);
                    let data = vec![v; len as usize];
                    q.write_vectored(off, &[IoSlice::new(&data)]).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                75..=84 => {
                    let mut buf = vec![0u8; CS as usize];
                    q.read_vectored(gc * CS, &mut [IoSliceMut::new(&mut buf)])
                        .unwrap();
                    assert!(
                        buf == model[(gc * CS) as usize..((gc + 1) * CS) as usize],
                        "seed {seed}: cluster {gc}"
                    );
                }
                85..=89 => {
                    q.discard(gc * CS, CS).unwrap();
                    model[(gc * CS) as usize..((gc + 1) * CS) as usize].fill(0);
                }
                90..=94 => {
                    q.write_zeroes(gc * CS, CS, rng.random_bool(0.5)).unwrap();
                    model[(gc * CS) as usize..((gc + 1) * CS) as usize].fill(0);
                }
                95..=97 => q.flush().unwrap(),
                _ => {
                    deduplicated += q.dedup_stats().unwrap().clusters_deduplicated;
                    q.close().unwrap();
                    drop(q);
                    common::assert_check_clean(&img);
                    q = open(&img);
                }
            }
        }
        let stats = q.dedup_stats().unwrap();
        q.close().unwrap();
        drop(q);
        deduplicated += stats.clusters_deduplicated;
        assert!(
            deduplicated > 50,
            "{deduplicated} links; last session {stats:?}"
        );
        std::fs::write(&raw, &model).unwrap();
        common::assert_check_clean(&img);
        common::assert_same_as_raw(&img, &raw);
        let distinct: HashSet<&[u8]> = model
            .chunks(CS as usize)
            .filter(|c| c.iter().any(|&b| b != 0))
            .collect();
        assert_eq!(
            common::physical_clusters(&img, CS),
            distinct.len(),
            "seed {seed}: one cluster per content; {stats:?}"
        );
    }
}

#[test]
fn two_writers_of_the_same_content_at_once_share_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    new_image(&img, 64 << 20);
    let q = Arc::new(open(&img));
    let rounds = 100u64;
    let barrier = Arc::new(Barrier::new(2));
    let hs: Vec<_> = (0..2u64)
        .map(|t| {
            let (q, barrier) = (q.clone(), barrier.clone());
            std::thread::spawn(move || {
                for r in 0..rounds {
                    let data = pattern((r % 200) as u8 + 7);
                    barrier.wait();
                    q.write_vectored((t * rounds + r) * CS, &[IoSlice::new(&data)])
                        .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(
        common::physical_clusters(&img, CS),
        rounds as usize,
        "each content once, refcount 2"
    );
    let mut args = vec!["-f", "qcow2"];
    let cmds: Vec<String> = (0..rounds)
        .flat_map(|r| [r, rounds + r].map(|gc| format!("read -P 0 {} 0", gc * CS)))
        .collect();
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    let q = Qcow2::open(&img, true).unwrap();
    for r in 0..rounds {
        for gc in [r, rounds + r] {
            let mut buf = vec![0u8; CS as usize];
            q.read_vectored(gc * CS, &mut [IoSliceMut::new(&mut buf)])
                .unwrap();
            assert!(buf == pattern((r % 200) as u8 + 7), "cluster {gc}");
        }
    }
}

#[test]
fn qemu_snapshot_of_a_dedup_image_then_more_dedup_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let raw = dir.path().join("s.raw");
    new_image(&img, 16 << 20);
    let mut model = vec![0u8; 16 << 20];
    let mut put = |q: &Qcow2, gc: u64, k: u8| {
        let d = pattern(k);
        q.write_vectored(gc * CS, &[IoSlice::new(&d)]).unwrap();
        model[(gc * CS) as usize..((gc + 1) * CS) as usize].copy_from_slice(&d);
    };
    let q = open(&img);
    for gc in 0..20 {
        put(&q, gc, (gc % 3) as u8);
    }
    q.close().unwrap();
    drop(q);
    let (c, o) = common::qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    assert_eq!(c, 0, "{o}");
    let q = open(&img);
    for gc in 10..40 {
        put(&q, gc, (gc % 5) as u8);
    }
    q.discard(0, 2 * CS).unwrap();
    model[..2 * CS as usize].fill(0);
    q.close().unwrap();
    drop(q);
    std::fs::write(&raw, &model).unwrap();
    common::assert_check_clean(&img);
    common::assert_same_as_raw(&img, &raw);
}

#[test]
fn image_changed_by_qemu_io_between_sessions_is_never_linked_wrongly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    new_image(&img, 16 << 20);
    let a = pattern(1);
    let q = open(&img);
    q.write_vectored(0, &[IoSlice::new(&a)]).unwrap();
    q.close().unwrap();
    drop(q);
    // QEMU rewrites cluster 0 in place (it is COPIED) with other content.
    common::qemu_io(&img, "qcow2", &["write -P 0x77 0 64k"]);
    let q = open(&img);
    q.write_vectored(CS, &[IoSlice::new(&a)]).unwrap();
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    common::qemu_io(&img, "qcow2", &["read -P 0x77 0 64k"]);
    let q = Qcow2::open(&img, true).unwrap();
    let mut buf = vec![0u8; CS as usize];
    q.read_vectored(CS, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf == a);
}

#[test]
fn offline_dedup_of_a_converted_image() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let img = dir.path().join("c.qcow2");
    let mut data = Vec::new();
    for i in 0..128u8 {
        match i % 4 {
            0 => data.extend(std::iter::repeat_n(0u8, CS as usize)),
            1 | 2 => data.extend_from_slice(&pattern(i % 3)),
            _ => data.extend_from_slice(&pattern(100 + i)),
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let (c, o) = common::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{o}");
    assert_eq!(
        common::physical_clusters(&img, CS),
        96,
        "qemu-img convert keeps every non-zero cluster"
    );
    let (c, out) = common::run(
        env!("CARGO_BIN_EXE_vhost-user-qcow2"),
        &["dedup", img.to_str().unwrap()],
    );
    assert_eq!(c, 0, "{out}");
    assert!(out.contains("MiB saved"), "{out}");
    common::assert_check_clean(&img);
    common::assert_same_as_raw(&img, &raw);
    let distinct: HashSet<&[u8]> = data
        .chunks(CS as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    assert_eq!(common::physical_clusters(&img, CS), distinct.len());
}

/// Two writers swapping the contents of two clusters at the same moment, over and over: each
/// holds its own cluster while the other's is the hint for its new content. They once waited for
/// each other's cluster for ever.
#[test]
fn writers_swapping_contents_never_wait_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    new_image(&img, 64 << 20);
    let q = Arc::new(open(&img));
    q.write_vectored(0, &[IoSlice::new(&pattern(1))]).unwrap();
    q.write_vectored(CS, &[IoSlice::new(&pattern(2))]).unwrap();
    let rounds = 400u64;
    let barrier = Arc::new(Barrier::new(2));
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..2u64 {
        let (q, barrier, tx) = (q.clone(), barrier.clone(), tx.clone());
        std::thread::spawn(move || {
            for r in 0..rounds {
                // Round r: cluster 0 gets the content cluster 1 had, and the other way round.
                let data = pattern(if (r + t) % 2 == 0 { 2 } else { 1 });
                barrier.wait();
                q.write_vectored(t * CS, &[IoSlice::new(&data)]).unwrap();
            }
            tx.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        assert!(
            rx.recv_timeout(std::time::Duration::from_secs(60)).is_ok(),
            "the writers hang, each waiting for the cluster the other holds"
        );
    }
    // After an even number of swaps each cluster has its first content again.
    for (gc, k) in [(0u64, 1u8), (1, 2)] {
        let mut buf = vec![0u8; CS as usize];
        q.read_vectored(gc * CS, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert!(buf == pattern(k), "cluster {gc}");
    }
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 2);
}

/// Offline dedup run again over clusters that share copies at the refcount cap (4-bit
/// refcounts here) adds no hint per cluster: the index stays as the first pass left it (the
/// second pass once grew it by a hint per cluster and went quadratic: 1 GiB of one content at
/// 4 KiB clusters took 131 s instead of 0.4 s).
#[test]
fn a_second_offline_pass_over_capped_copies_adds_no_hints() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("cap.qcow2");
    let o = CreateOptions {
        size: 2 << 20,
        cluster_bits: 12,
        refcount_order: 2,
        dedup: true,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(&img).unwrap()), &o).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
    {
        // Written without dedup: every cluster its own copy.
        let plain = OpenOptions {
            dedup: Some(false),
            ..Default::default()
        };
        let q = Qcow2::open_with(&img, &plain).unwrap();
        for gc in 0..512u64 {
            q.write_vectored(gc * 4096, &[IoSlice::new(&data)]).unwrap();
        }
        q.close().unwrap();
    }
    let pass = || {
        let q = open(&img);
        let st = q.dedup_existing(&mut |_, _, _| {}).unwrap();
        let entries = q.dedup_stats().unwrap().index_entries;
        q.close().unwrap();
        (st.clusters_deduplicated, entries)
    };
    let (linked, first) = pass();
    assert!(linked > 400, "the first pass links ({linked})");
    let (again, second) = pass();
    assert_eq!(again, 0, "nothing left to link");
    assert!(
        second <= first,
        "the second pass grew the index from {first} to {second} hints"
    );
    common::assert_check_clean(&img);
    let q = open(&img);
    let mut buf = vec![0u8; 4096];
    for gc in (0..512u64).step_by(37) {
        q.read_vectored(gc * 4096, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert!(buf == data, "cluster {gc}");
    }
}
