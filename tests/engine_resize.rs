//! Growing a disk with the engine (`Qcow2::resize`, QMP `block_resize`): within the L1
//! table's clusters, with the table moved, with dedup and lazy refcounts, with writes running
//! meanwhile; what is refused. Each image must pass `qemu-img check` and show the new size in
//! `qemu-img info`.

mod common;

use common::{assert_check_clean, qemu_img, qemu_io};
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vhost_user_qcow2::block::{BlockDevice, BlockError};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn new_image(path: &Path, size: u64, cluster_bits: u32, dedup: bool) {
    let o = CreateOptions {
        size,
        cluster_bits,
        dedup,
        ..Default::default()
    };
    let f = std::fs::File::create(path).unwrap();
    create(&FileStorage::new(f), &o).unwrap();
}

fn open(path: &Path, lazy: bool, dedup: Option<DedupMode>) -> Qcow2 {
    let opts = OpenOptions {
        lazy_refcounts: Some(lazy),
        dedup_mode: dedup,
        ..Default::default()
    };
    Qcow2::open_with(path, &opts).unwrap()
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31))
        .collect()
}

fn write(img: &Qcow2, off: u64, data: &[u8]) {
    img.write_vectored(off, &[IoSlice::new(data)]).unwrap();
}

fn read(img: &Qcow2, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    img.read_vectored(off, &mut [IoSliceMut::new(&mut b)])
        .unwrap();
    b
}

/// `qemu-img info`'s virtual size and (for qcow2) the header's l1_size as qemu-img sees them.
fn virtual_size(path: &Path) -> u64 {
    let (code, out) = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn header_l1(path: &Path) -> (u32, u64) {
    let b = std::fs::read(path).unwrap();
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap());
    let l1_off = u64::from_be_bytes(b[40..48].try_into().unwrap());
    (l1_size, l1_off)
}

/// Write before, grow, write at the new last cluster and in between, read all back; after
/// close: check clean, the new size, and qemu-io reads the same bytes.
fn grow_and_verify(path: &Path, cs: u64, old: u64, new: u64, lazy: bool, dedup: Option<DedupMode>) {
    let img = open(path, lazy, dedup);
    let a = fill(1, 3 * cs as usize);
    write(&img, 0, &a);
    write(&img, old - cs, &a[..cs as usize]);
    img.resize(new).unwrap();
    assert_eq!(img.capacity(), new);
    assert_eq!(img.size(), new);
    // The new area reads as zeros.
    assert!(read(&img, old, cs as usize).iter().all(|&b| b == 0));
    let last = new - cs;
    let b = fill(7, cs as usize);
    write(&img, last, &b);
    // A duplicate of `a`'s first cluster in the new area (a dedup link with dedup on).
    write(&img, old + cs, &a[..cs as usize]);
    assert_eq!(read(&img, 0, a.len()), a);
    assert_eq!(read(&img, old - cs, cs as usize), &a[..cs as usize]);
    assert_eq!(read(&img, last, cs as usize), b);
    assert_eq!(read(&img, old + cs, cs as usize), &a[..cs as usize]);
    let past = img.write_vectored(new, &[IoSlice::new(&b[..512])]);
    assert!(matches!(past, Err(BlockError::OutOfRange { .. })));
    img.close().unwrap();
    drop(img);
    assert_check_clean(path);
    assert_eq!(virtual_size(path), new);
    let p = path.to_str().unwrap();
    let (code, out) = qemu_img(&["compare", "-f", "qcow2", p, p]);
    assert_eq!(code, 0, "{out}");
    // qemu-io sees the data at the new end.
    let out = qemu_io(path, "qcow2", &[&format!("read -P {} {} 512", b[0], last)]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Opened again by us: the data is there.
    let img = open(path, lazy, dedup);
    assert_eq!(img.capacity(), new);
    assert_eq!(read(&img, last, cs as usize), b);
    assert_eq!(read(&img, 0, a.len()), a);
}

#[test]
fn grow_within_the_l1_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    // 64 KiB clusters: 2 L1 entries for 1 GiB, 8192 fit in the table's cluster.
    new_image(&path, GIB, 16, false);
    let (l1_before, off_before) = header_l1(&path);
    grow_and_verify(&path, 64 << 10, GIB, 5 * GIB + 512 * 1024, false, None);
    let (l1_after, off_after) = header_l1(&path);
    assert_eq!(off_after, off_before, "the table stays where it was");
    assert_eq!(l1_before, 2);
    assert_eq!(l1_after, 11);
}

#[test]
fn grow_that_moves_the_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    // 4 KiB clusters: an L2 table covers 2 MiB, an L1 cluster holds 512 entries (1 GiB).
    new_image(&path, 512 * MIB, 12, false);
    let (_, off_before) = header_l1(&path);
    grow_and_verify(&path, 4096, 512 * MIB, 3 * GIB, false, None);
    let (l1_after, off_after) = header_l1(&path);
    assert_ne!(off_after, off_before, "the table moved");
    assert_eq!(l1_after, 1536);
    // And again, within the new table's clusters, then past them once more.
    let img = open(&path, false, None);
    img.resize(3 * GIB + 4096).unwrap();
    img.resize(5 * GIB).unwrap();
    write(&img, 5 * GIB - 4096, &fill(3, 4096));
    drop(img);
    assert_check_clean(&path);
    assert_eq!(virtual_size(&path), 5 * GIB);
    assert_eq!(header_l1(&path).0, 2560);
}

#[test]
fn grow_an_image_qemu_made() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.qcow2");
    let p = path.to_str().unwrap();
    let (code, out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p,
        "100M",
    ]);
    assert_eq!(code, 0, "{out}");
    qemu_io(&path, "qcow2", &["write -P 0x5a 0 1M"]);
    grow_and_verify(&path, 4096, 100 * MIB, 2 * GIB, false, None);
    let out = qemu_io(&path, "qcow2", &["read -P 0x5a 512k 512k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn grow_with_inline_dedup_and_lazy_refcounts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    // 4 KiB clusters: 127 records per index cluster, so the index area grows too.
    new_image(&path, 64 * MIB, 12, true);
    grow_and_verify(&path, 4096, 64 * MIB, GIB, true, Some(DedupMode::Inline));
    // The dedup link in the new area shares the first cluster's host cluster.
    let img = open(&path, true, Some(DedupMode::Inline));
    let rep = img.dedup_open_report().unwrap();
    assert_eq!(
        rep.how, "loaded",
        "the grown index area loads after a clean close: {rep:?}"
    );
    // A duplicate of the first cluster written now links (the index knows it).
    let before = img.dedup_stats().unwrap().clusters_deduplicated;
    write(&img, GIB - 3 * 4096, &fill(1, 4096));
    assert_eq!(img.dedup_stats().unwrap().clusters_deduplicated, before + 1);
    drop(img);
    assert_check_clean(&path);
}

#[test]
fn grow_with_background_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.qcow2");
    new_image(&path, 32 * MIB, 12, true);
    grow_and_verify(
        &path,
        4096,
        32 * MIB,
        700 * MIB,
        false,
        Some(DedupMode::Background),
    );
    let img = open(&path, false, Some(DedupMode::Background));
    // Clusters written plain past the old end are pending background work, none lost.
    assert!(img.dedup_pending() > 0);
    while img.dedup_step().unwrap() {}
    assert_eq!(img.dedup_pending(), 0);
    assert_eq!(read(&img, 32 * MIB + 4096, 4096), fill(1, 4096));
    drop(img);
    assert_check_clean(&path);
}

#[test]
fn shrink_unaligned_and_read_only_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    new_image(&path, 64 * MIB, 16, false);
    let img = open(&path, false, None);
    let e = img.resize(32 * MIB).unwrap_err().to_string();
    assert!(e.contains("shrinking is not supported"), "{e}");
    let e = img.resize(64 * MIB + 100).unwrap_err().to_string();
    assert!(e.contains("not a multiple of 512"), "{e}");
    // Through the block-device trait the refusals are `Invalid`, with the same text.
    let e = BlockDevice::resize(&img, MIB).unwrap_err();
    assert!(
        matches!(&e, BlockError::Invalid(m) if m.contains("shrinking")),
        "{e}"
    );
    img.resize(64 * MIB).unwrap();
    let e = img.resize(1 << 62).unwrap_err().to_string();
    assert!(e.contains("32 MiB"), "{e}");
    assert_eq!(img.capacity(), 64 * MIB);
    drop(img);
    assert_check_clean(&path);
    assert_eq!(virtual_size(&path), 64 * MIB);
    let ro = Qcow2::open(&path, true).unwrap();
    assert!(matches!(
        BlockDevice::resize(&ro, 128 * MIB),
        Err(BlockError::ReadOnly)
    ));
}

#[test]
fn grow_a_v2_image_and_refuse_one_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.qcow2");
    let o = CreateOptions {
        size: 100 * MIB,
        cluster_bits: 12,
        version: 2,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(&path).unwrap()), &o).unwrap();
    grow_and_verify(&path, 4096, 100 * MIB, 1536 * MIB, false, None);
    let p = path.to_str().unwrap();
    let (code, out) = qemu_img(&["snapshot", "-c", "s1", p]);
    assert_eq!(code, 0, "{out}");
    let img = open(&path, false, None);
    let e = img.resize(2 * GIB).unwrap_err().to_string();
    assert!(e.contains("internal snapshots"), "{e}");
    drop(img);
    assert_check_clean(&path);
    assert_eq!(virtual_size(&path), 1536 * MIB);
}

/// Writers on the old area keep going while the disk grows (and the L1 table moves); every
/// write they completed reads back.
#[test]
fn writes_during_a_resize_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    new_image(&path, 256 * MIB, 12, false);
    let img = Arc::new(open(&path, false, None));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let (img, stop) = (img.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Spread over many L2 tables, so L1 entries change while the table moves.
                    let off = ((n * 2 + t) * 2 * MIB) % (256 * MIB);
                    let data = fill((n * 2 + t) as u8, 4096);
                    img.write_vectored(off, &[IoSlice::new(&data)]).unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    img.resize(2 * GIB).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    img.resize(4 * GIB).unwrap();
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    // The last write to each offset wins: recompute what each offset must hold.
    let mut want = std::collections::BTreeMap::new();
    for (t, &n) in counts.iter().enumerate() {
        for i in 0..n {
            let k = i * 2 + t as u64;
            let off = (k * 2 * MIB) % (256 * MIB);
            let e = want.entry(off).or_insert(k);
            *e = (*e).max(k);
        }
    }
    for (&off, &k) in &want {
        assert_eq!(read(&img, off, 4096), fill(k as u8, 4096), "at {off}");
    }
    write(&img, 4 * GIB - 4096, &fill(9, 4096));
    drop(img);
    assert_check_clean(&path);
    assert_eq!(virtual_size(&path), 4 * GIB);
}
