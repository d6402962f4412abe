//! The persistent dedup index across sessions: loaded at open without reading data after a clean
//! close; rebuilt after a crash or after QEMU opened the image writable (and moved off the area
//! when QEMU allocated into it); and never trusted for the data when QEMU wrote in place behind a
//! bit it kept (the `qemu-img commit` pattern): no false link, no skipped write.

mod common;

use common::hooked::Hooked;
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::{DedupExtension, AUTOCLEAR_DEDUP, EXT_DEDUP};
use vhost_user_qcow2::qcow2::format::Header;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

const CS: u64 = 65536;

/// Data that starts with these bytes is written slowly by `open_counting`'s storage.
const SLOW: &[u8] = b"SLOWSLOW";

/// Opens the image over a storage that counts reads (the counter is returned) and writes data
/// that starts with `SLOW` slowly (keeping that write in flight while another thread runs).
fn open_counting(path: &Path) -> (Qcow2, Arc<AtomicU64>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let reads = Arc::new(AtomicU64::new(0));
    let mut st = Hooked::new(FileStorage::new(f));
    let r = reads.clone();
    st.on_read = Some(Box::new(move |_| {
        r.fetch_add(1, Ordering::Relaxed);
    }));
    st.on_write = Some(Box::new(|buf, _| {
        if buf.starts_with(SLOW) {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }));
    let opts = OpenOptions {
        dedup: Some(true),
        ..Default::default()
    };
    let q = Qcow2::open_storage(Arc::new(st), &opts, path.parent(), 0).unwrap();
    (q, reads)
}

fn pattern(k: u32) -> Vec<u8> {
    (0..CS as u32)
        .map(|i| (i.wrapping_mul(k | 1).wrapping_add(k * 7) >> 3) as u8)
        .collect()
}

fn write(q: &Qcow2, gc: u64, data: &[u8]) {
    q.write_vectored(gc * CS, &[IoSlice::new(data)]).unwrap();
}

fn read(q: &Qcow2, gc: u64) -> Vec<u8> {
    let mut b = vec![0u8; CS as usize];
    q.read_vectored(gc * CS, &mut [IoSliceMut::new(&mut b)])
        .unwrap();
    b
}

/// What `qemu-img commit` does to an image: open it read-only, reopen it writable (which keeps
/// autoclear bit 63 and our seal), and write cluster 0 in place with `byte`.
fn qemu_commit_style_write(img: &str, byte: u8) {
    let w = format!("write -P {byte:#x} 0 64k");
    let (c, out) = common::run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "reopen -w", "-c", &w, img],
    );
    assert_eq!(c, 0, "{out}");
}

fn ext(img: &Path) -> (Header, DedupExtension) {
    let b = std::fs::read(img).unwrap();
    let h = Header::decode(&b[..CS as usize]).unwrap();
    let e = DedupExtension::decode(h.extension(EXT_DEDUP).unwrap()).unwrap();
    (h, e)
}

#[test]
fn clean_close_then_open_loads_the_index_without_reading_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.qcow2");
    common::new_dedup_image(&img, 64 << 20);
    let (q, _) = open_counting(&img);
    assert_eq!(q.dedup_open_report().unwrap().how, "rebuilt");
    for gc in 0..40 {
        write(&q, gc, &pattern(gc as u32));
    }
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    let (h, e) = ext(&img);
    assert_ne!(h.autoclear_features & AUTOCLEAR_DEDUP, 0, "index sealed");
    assert!(e.index_offset > 0 && e.index_clusters == 1, "{e:?}");

    let (q, st) = open_counting(&img);
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "loaded", "{rep:?}");
    assert_eq!(rep.clusters_hashed, 0);
    assert_eq!(rep.hints, 40);
    // A duplicate of a loaded content links (after a byte compare: loaded records are hints).
    write(&q, 50, &pattern(7));
    let s = q.dedup_stats().unwrap();
    assert_eq!((s.clusters_deduplicated, s.clusters_unique), (1, 0));
    assert_eq!(s.links_without_read, 0);
    // Records proven this session stand for the data: the next duplicate links without a read,
    // and rewriting a cluster with its own content costs no I/O at all.
    let before = st.load(Ordering::Relaxed);
    write(&q, 51, &pattern(7));
    write(&q, 7, &pattern(7));
    write(&q, 51, &pattern(7));
    assert_eq!(st.load(Ordering::Relaxed), before, "no reads");
    let s = q.dedup_stats().unwrap();
    assert_eq!(s.links_without_read, 1);
    assert_eq!(s.identical_rewrites, 2);
    assert_eq!(read(&q, 51), pattern(7));
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 40);
}

#[test]
fn a_crash_means_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let (q, _) = open_counting(&img);
    write(&q, 0, &pattern(1));
    q.close().unwrap();
    drop(q);
    let (q, _) = open_counting(&img);
    write(&q, 1, &pattern(2));
    q.flush().unwrap();
    // The process dies: no close.
    std::mem::forget(q);
    let (h, _) = ext(&img);
    assert_eq!(
        h.autoclear_features & AUTOCLEAR_DEDUP,
        0,
        "bit cleared at open"
    );
    let (q, _) = open_counting(&img);
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "rebuilt");
    assert!(rep.reason.unwrap().contains("autoclear"));
    assert_eq!(rep.clusters_hashed, 2);
    write(&q, 2, &pattern(2));
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 1);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
}

#[test]
fn qemu_writing_in_place_behind_the_kept_bit_is_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let (q, _) = open_counting(&img);
    write(&q, 0, &pattern(1));
    write(&q, 1, &pattern(2));
    q.close().unwrap();
    drop(q);
    // The qemu-img commit pattern: read-only open reopened writable keeps bit 63 and the seal,
    // while cluster 0 changes in place.
    let p = img.to_str().unwrap();
    qemu_commit_style_write(p, 0x77);
    let (q, _) = open_counting(&img);
    assert_eq!(q.dedup_open_report().unwrap().how, "loaded");
    // Its record says pattern 1: a rewrite with pattern 1 must really write.
    write(&q, 0, &pattern(1));
    assert_eq!(read(&q, 0), pattern(1));
    // And a duplicate of pattern 2 still links right.
    write(&q, 3, &pattern(2));
    q.close().unwrap();
    drop(q);
    // Another round: QEMU changes cluster 0 again; a write of pattern 1 elsewhere must not link
    // to it.
    qemu_commit_style_write(p, 0x66);
    let (q, _) = open_counting(&img);
    write(&q, 5, &pattern(1));
    let s = q.dedup_stats().unwrap();
    assert_eq!(s.clusters_deduplicated, 0);
    assert!(s.stale_hints_rejected >= 1);
    assert_eq!(read(&q, 5), pattern(1));
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    common::qemu_io(&img, "qcow2", &["read -P 0x66 0 64k"]);
    let q = Qcow2::open(&img, true).unwrap();
    assert_eq!(read(&q, 3), pattern(2));
    assert_eq!(read(&q, 1), pattern(2));
}

#[test]
fn qemu_allocating_into_the_area_moves_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    common::new_dedup_image(&img, 16 << 20);
    let (q, _) = open_counting(&img);
    write(&q, 0, &pattern(1));
    q.close().unwrap();
    drop(q);
    let (_, e1) = ext(&img);
    // A writable QEMU open: clears bit 63, and its new cluster lands in the refcount-0 area.
    common::qemu_io(&img, "qcow2", &["write -P 9 8M 64k"]);
    let (h, _) = ext(&img);
    assert_eq!(h.autoclear_features & AUTOCLEAR_DEDUP, 0);
    let (q, _) = open_counting(&img);
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "rebuilt");
    assert_eq!(rep.clusters_hashed, 2);
    write(&q, 1, &pattern(1));
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 1);
    q.close().unwrap();
    drop(q);
    let (_, e2) = ext(&img);
    assert_ne!(e1.index_offset, e2.index_offset, "QEMU took the old area");
    assert!(e2.generation > e1.generation);
    common::assert_check_clean(&img);
    let (q, _) = open_counting(&img);
    assert_eq!(q.dedup_open_report().unwrap().how, "loaded");
    assert_eq!(read(&q, 1), pattern(1));
    q.close().unwrap();
    drop(q);
    // (qemu-io opens writable: last.)
    common::qemu_io(&img, "qcow2", &["read -P 9 8M 64k"]);
}

/// A link that must byte-compare its candidate first waits for the data I/O older than it. When
/// the oldest I/O in flight is another dedup write, the end of that write has to wake it: once it
/// did not, and the waiting queue hung for ever (found by `./run bench`, 0% duplicates).
#[test]
fn a_compare_waiting_for_a_dedup_write_is_woken() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.qcow2");
    common::new_dedup_image(&img, 64 << 20);
    let (q, _) = open_counting(&img);
    write(&q, 0, &pattern(7));
    q.close().unwrap();
    drop(q);

    // Loaded records are hints: a duplicate of gc 0's content is compared before it links.
    let (q, _) = open_counting(&img);
    assert_eq!(q.dedup_open_report().unwrap().how, "loaded");
    let q = Arc::new(q);
    let mut slow = pattern(99);
    slow[..SLOW.len()].copy_from_slice(SLOW);
    let writer = {
        let q = q.clone();
        std::thread::spawn(move || write(&q, 5, &slow))
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (tx, rx) = std::sync::mpsc::channel();
    let linker = {
        let q = q.clone();
        std::thread::spawn(move || {
            write(&q, 1, &pattern(7));
            tx.send(()).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(),
        "the duplicate write hung waiting for the slow dedup write"
    );
    linker.join().unwrap();
    writer.join().unwrap();
    let s = q.dedup_stats().unwrap();
    assert_eq!((s.clusters_deduplicated, s.clusters_unique), (1, 1));
    assert_eq!(read(&q, 1), pattern(7));
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
}

/// A record cache far smaller than the index area (`OpenOptions::dedup_cache_bytes`, the
/// daemon's `--dedup-cache-size`): records are written back on eviction and read again, and
/// every decision that rests on them (links, identical rewrites, the index loaded at the next
/// open) stays right.
#[test]
fn a_record_cache_smaller_than_the_area_evicts_and_reloads_right() {
    const CS4: u64 = 4096;
    // 127 records per 4 KiB index cluster: 16384 guest clusters need 130 index clusters.
    const RPC: u64 = 127;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    common::new_dedup_image_with(&img, 64 << 20, 12);
    let content = |k: u64| -> Vec<u8> {
        (0..CS4)
            .map(|i| (i.wrapping_mul(k * 2 + 1) ^ (k << 3)) as u8)
            .collect()
    };
    let open = |cache: Option<u64>| {
        let opts = OpenOptions {
            dedup: Some(true),
            dedup_cache_bytes: cache,
            ..Default::default()
        };
        Qcow2::open_with(&img, &opts).unwrap()
    };
    let wr = |q: &Qcow2, gc: u64, d: &[u8]| {
        q.write_vectored(gc * CS4, &[IoSlice::new(d)]).unwrap();
    };
    let rd = |q: &Qcow2, gc: u64| {
        let mut b = vec![0u8; CS4 as usize];
        q.read_vectored(gc * CS4, &mut [IoSliceMut::new(&mut b)])
            .unwrap();
        b
    };
    // Room for 4 index clusters (the least the cache keeps).
    let q = open(Some(16 << 10));
    // 60 unique contents, each in its own index cluster.
    for k in 0..60 {
        wr(&q, k * 2 * RPC, &content(k));
    }
    // Their duplicates, each in yet another index cluster, and identical rewrites: every one
    // needs a record that was evicted long ago.
    for k in 0..60 {
        wr(&q, k * 2 * RPC + RPC, &content(k));
        wr(&q, k * 2 * RPC, &content(k));
    }
    let s = q.dedup_stats().unwrap();
    assert_eq!(s.clusters_unique, 60, "{s:?}");
    assert_eq!(s.clusters_deduplicated, 60, "{s:?}");
    assert_eq!(s.identical_rewrites, 60, "{s:?}");
    assert!(
        s.record_cache_bytes < 64 << 10,
        "the cache stayed bounded: {s:?}"
    );
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS4), 60);

    // Loaded again (default cache): the records written on eviction are all there.
    let q = open(None);
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "loaded", "{rep:?}");
    assert_eq!(rep.clusters_hashed, 0);
    wr(&q, 7, &content(59));
    let s = q.dedup_stats().unwrap();
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (1, 0),
        "{s:?}"
    );
    for k in 0..60 {
        assert_eq!(rd(&q, k * 2 * RPC), content(k), "cluster of content {k}");
        assert_eq!(rd(&q, k * 2 * RPC + RPC), content(k), "its duplicate");
    }
    assert_eq!(rd(&q, 7), content(59));
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS4), 60);
}
