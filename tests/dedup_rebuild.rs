//! The dedup index rebuilt in the background after a crash (`dedup_rebuild_in_background`, what
//! `serve` does): the open returns without hashing the data; writes during the rebuild are right;
//! afterwards old data is found as duplicates; a cluster that changes while the rebuild has read
//! it is never linked on the strength of what was read; a clean close stops the rebuild and the
//! next open goes on where it stopped.

mod common;

use common::hooked::Hooked;
use rand::{Rng, SeedableRng};
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::{
    DedupExtension, DedupMode, AUTOCLEAR_DEDUP, EXT_DEDUP,
};
use vhost_user_qcow2::qcow2::format::Header;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

const CS: u64 = 65536;

fn pattern(k: u32) -> Vec<u8> {
    (0..CS as u32)
        .map(|i| (i.wrapping_mul(k | 1).wrapping_add(k * 11) >> 3) as u8)
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

/// A dedup image whose guest clusters `0..n` hold `content(gc)`, closed cleanly, then opened
/// again by a process that was killed (the autoclear bit cleared at open, no close): the next
/// open must rebuild the index.
fn crashed_image(img: &Path, size: u64, n: u64, mode: DedupMode, content: impl Fn(u64) -> Vec<u8>) {
    common::new_dedup_image(img, size);
    let opts = OpenOptions {
        dedup_mode: Some(mode),
        ..Default::default()
    };
    let q = Qcow2::open_with(img, &opts).unwrap();
    for gc in 0..n {
        write(&q, gc, &content(gc));
    }
    q.close().unwrap();
    drop(q);
    let q = Qcow2::open_with(img, &opts).unwrap();
    q.flush().unwrap();
    std::mem::forget(q);
}

/// Opens with dedup inline, the index rebuilt in the background, over a storage `hook` sets up.
fn open_bg(img: &Path, hook: impl FnOnce(&mut Hooked<FileStorage>)) -> Qcow2 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut st = Hooked::new(FileStorage::new(f));
    hook(&mut st);
    let opts = OpenOptions {
        dedup: Some(true),
        dedup_rebuild_in_background: true,
        ..Default::default()
    };
    Qcow2::open_storage(Arc::new(st), &opts, img.parent(), 0).unwrap()
}

fn on_worker() -> bool {
    std::thread::current().name() == Some("dedup-worker")
}

/// Host offset of guest cluster `gc`, from the image file (its tables as last flushed).
fn host_of(img: &Path, gc: u64) -> u64 {
    const MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let b = std::fs::read(img).unwrap();
    let h = Header::decode(&b[..CS as usize]).unwrap();
    let be = |at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    let per = CS / 8;
    let l2 = be(h.l1_table_offset + gc / per * 8) & MASK;
    be(l2 + gc % per * 8) & MASK
}

fn ext(img: &Path) -> (Header, DedupExtension) {
    let b = std::fs::read(img).unwrap();
    let h = Header::decode(&b[..CS as usize]).unwrap();
    let e = DedupExtension::decode(h.extension(EXT_DEDUP).unwrap()).unwrap();
    (h, e)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}: timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn rebuild_all(q: &Qcow2) {
    while q.dedup_rebuild_step().unwrap() {}
    assert!(!q.dedup_rebuilding());
}

#[test]
fn the_open_returns_before_the_rebuild_which_then_finds_the_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    crashed_image(&img, 64 << 20, 200, DedupMode::Inline, |gc| {
        pattern(gc as u32)
    });
    // The worker's reads take 30 ms each: 200 clusters in batches of 1 MiB take 0.4 s or more.
    let q = Arc::new(open_bg(&img, |st| {
        st.on_read = Some(Box::new(|_| {
            if on_worker() {
                std::thread::sleep(Duration::from_millis(30));
            }
        }))
    }));
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "rebuilt", "{rep:?}");
    assert!(
        rep.reason.as_ref().unwrap().contains("autoclear"),
        "{rep:?}"
    );
    assert!(rep.background, "{rep:?}");
    assert_eq!(
        (rep.clusters_hashed, rep.hints),
        (0, 0),
        "nothing hashed by the open"
    );
    assert!(q.dedup_rebuilding());
    let worker = q.start_dedup_worker().unwrap();

    // Served meanwhile: an overwrite in place, its duplicate, a new cluster near the end.
    write(&q, 3, &pattern(1000));
    write(&q, 500, &pattern(1000));
    write(&q, 190, &pattern(2000));
    let s = q.dedup_stats().unwrap();
    assert!(
        s.rebuild_running,
        "the writes ran during the rebuild: {s:?}"
    );
    assert!(s.rebuild_clusters_done < s.rebuild_clusters_total, "{s:?}");
    assert_eq!(s.rebuild_clusters_total, 1024);
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (1, 2),
        "{s:?}"
    );
    assert_eq!(read(&q, 3), pattern(1000));
    assert_eq!(read(&q, 500), pattern(1000));
    assert_eq!(read(&q, 4), pattern(4));

    wait_until("the rebuild", || !q.dedup_rebuilding());
    let rep = q.dedup_open_report().unwrap();
    assert!(rep.background_millis.is_some(), "{rep:?}");
    // Every old cluster but the two rewritten first.
    assert_eq!(rep.clusters_hashed, 198, "{rep:?}");
    assert_eq!(rep.pending, 0, "{rep:?}");
    let s = q.dedup_stats().unwrap();
    assert!(!s.rebuild_running);
    assert_eq!(s.rebuild_clusters_total, 0);

    // Old data is found now, and proven by its verified record (no read back).
    write(&q, 600, &pattern(10));
    // The old content of the cluster overwritten in place is gone: unique.
    write(&q, 601, &pattern(3));
    let s = q.dedup_stats().unwrap();
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (2, 3),
        "{s:?}"
    );
    assert_eq!(s.links_without_read, 2, "{s:?}");
    for gc in 0..200 {
        let want = match gc {
            3 => pattern(1000),
            190 => pattern(2000),
            _ => pattern(gc as u32),
        };
        assert!(read(&q, gc) == want, "cluster {gc}");
    }
    assert_eq!(read(&q, 600), pattern(10));
    assert_eq!(read(&q, 601), pattern(3));
    drop(worker);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 201);
    let (h, e) = ext(&img);
    assert_ne!(h.autoclear_features & AUTOCLEAR_DEDUP, 0);
    assert_eq!(e.rebuild_from, None, "done: nothing to go on with");
}

/// The rebuild has read cluster 0 (content A) when the guest overwrites it in place with B.
/// What the rebuild read must not become cluster 0's record: a later write of A would link to
/// it without a read and read back B.
#[test]
fn a_cluster_overwritten_after_the_rebuild_read_it_is_never_linked_wrongly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    let (a, b, c) = (pattern(1), pattern(2), pattern(3));
    crashed_image(&img, 16 << 20, 2, DedupMode::Inline, |gc| {
        if gc == 0 {
            a.clone()
        } else {
            c.clone()
        }
    });
    let target = host_of(&img, 0);
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((read_tx, go_rx))));
    let g = gate.clone();
    let q = Arc::new(open_bg(&img, move |st| {
        st.after_read = Some(Box::new(move |off| {
            if off != target || std::thread::current().name() != Some("rebuild") {
                return;
            }
            // Once: tell the test the data is read, wait until it has overwritten it.
            if let Some((read_tx, go_rx)) = g.lock().unwrap().take() {
                read_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
        }))
    }));
    let rebuild = {
        let q = q.clone();
        std::thread::Builder::new()
            .name("rebuild".into())
            .spawn(move || rebuild_all(&q))
            .unwrap()
    };
    read_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the rebuild reads cluster 0");
    write(&q, 0, &b);
    go_tx.send(()).unwrap();
    rebuild.join().unwrap();
    assert!(gate.lock().unwrap().is_none(), "the race was run");
    write(&q, 5, &a);
    assert!(
        read(&q, 5) == a,
        "linked to a cluster that no longer holds A"
    );
    assert_eq!(
        q.dedup_open_report().unwrap().clusters_hashed,
        1,
        "cluster 1"
    );
    write(&q, 6, &b);
    write(&q, 7, &c);
    let s = q.dedup_stats().unwrap();
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (2, 2),
        "{s:?}"
    );
    assert_eq!(read(&q, 0), b);
    assert_eq!(read(&q, 6), b);
    assert_eq!(read(&q, 7), c);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
}

/// A write to cluster 0 made while dedup was paused (it forgot the record, then writes B in
/// place, plainly) is still in flight when dedup is resumed and the rebuild looks at the
/// cluster: the rebuild must not read it (it would read A, and no later record change would
/// tell). (A dedup write in flight has recorded its content already, verified: the rebuild
/// leaves such a cluster alone for that reason too.)
#[test]
fn a_cluster_being_written_when_the_rebuild_looks_is_left_to_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    let (a, b) = (pattern(1), pattern(2));
    crashed_image(&img, 16 << 20, 1, DedupMode::Inline, |_| a.clone());
    let target = host_of(&img, 0);
    let q = Arc::new(open_bg(&img, move |st| {
        st.on_writev = Some(Box::new(move |off| {
            if off == target {
                std::thread::sleep(Duration::from_millis(400));
            }
        }))
    }));
    q.set_dedup_paused(true).unwrap();
    let writer = {
        let (q, b) = (q.clone(), b.clone());
        std::thread::spawn(move || write(&q, 0, &b))
    };
    std::thread::sleep(Duration::from_millis(100));
    q.set_dedup_paused(false).unwrap();
    assert!(!writer.is_finished(), "the write is still in flight");
    rebuild_all(&q);
    writer.join().unwrap();
    write(&q, 5, &a);
    assert!(
        read(&q, 5) == a,
        "linked to a cluster that no longer holds A"
    );
    write(&q, 6, &b);
    let s = q.dedup_stats().unwrap();
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (0, 2),
        "{s:?}"
    );
    assert_eq!(read(&q, 0), b);
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
}

#[test]
fn a_clean_close_stops_the_rebuild_and_the_next_open_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    crashed_image(&img, 64 << 20, 100, DedupMode::Inline, |gc| {
        pattern(gc as u32)
    });
    // The worker's reads take 100 ms: the close comes while one is in flight.
    let q = Arc::new(open_bg(&img, |st| {
        st.on_read = Some(Box::new(|_| {
            if on_worker() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }))
    }));
    let worker = q.start_dedup_worker().unwrap();
    wait_until("the first batch", || {
        q.dedup_stats().unwrap().rebuild_clusters_done > 0
    });
    let t = Instant::now();
    q.close().unwrap();
    drop(worker);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "close and worker stop took {:?}",
        t.elapsed()
    );
    drop(q);
    common::assert_check_clean(&img);
    let (h, e) = ext(&img);
    assert_ne!(h.autoclear_features & AUTOCLEAR_DEDUP, 0, "sealed");
    let from = e.rebuild_from.expect("the rest is to do");
    assert!(from > 0 && from < 100 && from % 16 == 0, "{from}");

    // The next open loads what was done and hashes the rest (test thread: fast reads).
    let q = open_bg(&img, |_| {});
    let rep = q.dedup_open_report().unwrap();
    assert_eq!(rep.how, "loaded", "{rep:?}");
    assert!(rep.background);
    assert_eq!(rep.hints, from, "{rep:?}");
    let s = q.dedup_stats().unwrap();
    assert_eq!(s.rebuild_clusters_total, 1024 - from, "{s:?}");
    rebuild_all(&q);
    assert_eq!(q.dedup_open_report().unwrap().clusters_hashed, 100 - from);
    // One from each part: a loaded hint (compared) and a record of this session (not).
    write(&q, 700, &pattern(1));
    write(&q, 701, &pattern(99));
    let s = q.dedup_stats().unwrap();
    assert_eq!(
        (s.clusters_deduplicated, s.clusters_unique),
        (2, 0),
        "{s:?}"
    );
    assert_eq!(s.links_without_read, 1, "{s:?}");
    assert_eq!(read(&q, 700), pattern(1));
    assert_eq!(read(&q, 701), pattern(99));
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(ext(&img).1.rebuild_from, None);
    assert_eq!(common::physical_clusters(&img, CS), 100);
}

/// Copies written in background mode (not merged yet) and a crash: the rebuild in the
/// background finds them again (pending) and the worker merges them: one cluster per content.
#[test]
fn copies_found_by_the_background_rebuild_are_merged() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    crashed_image(&img, 16 << 20, 48, DedupMode::Background, |gc| {
        pattern(gc as u32 % 12)
    });
    let q = Arc::new(open_bg(&img, |_| {}));
    let worker = q.start_dedup_worker().unwrap();
    wait_until("the rebuild and the worker", || {
        !q.dedup_rebuilding() && q.dedup_pending() == 0 && !q.dedup_worker_running()
    });
    let rep = q.dedup_open_report().unwrap();
    assert_eq!((rep.clusters_hashed, rep.pending), (48, 36), "{rep:?}");
    drop(worker);
    for gc in 0..48 {
        assert!(read(&q, gc) == pattern(gc as u32 % 12), "cluster {gc}");
    }
    q.close().unwrap();
    drop(q);
    common::assert_check_clean(&img);
    assert_eq!(common::physical_clusters(&img, CS), 12);
}

/// Two guests overwrite clusters at random (contents from a small set, zeros too) while the
/// rebuild runs and the worker merges what it finds: no write is lost, nothing is linked
/// wrongly, the image stays consistent.
#[test]
fn guests_writing_during_the_rebuild_lose_nothing() {
    for seed in 1..=3u64 {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("w.qcow2");
        let raw = dir.path().join("w.raw");
        let clusters = 192u64;
        crashed_image(&img, clusters * CS, clusters, DedupMode::Background, |gc| {
            pattern(gc as u32 % 8)
        });
        // The worker's reads are slow, so that the rebuild runs through most of the writes.
        let q = Arc::new(open_bg(&img, |st| {
            st.on_read = Some(Box::new(|_| {
                if on_worker() {
                    std::thread::sleep(Duration::from_millis(15));
                }
            }))
        }));
        let worker = q.start_dedup_worker().unwrap();
        let handles: Vec<_> = (0..2u64)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    let half = clusters / 2;
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 10 + t);
                    let mut last: Vec<Option<u32>> = (0..half)
                        .map(|i| Some(((t * half + i) % 8) as u32))
                        .collect();
                    let mut during = 0;
                    for _ in 0..200 {
                        let i = rng.random_range(0..half);
                        let k = rng.random_range(0..12u32);
                        let p = if k == 11 {
                            vec![0u8; CS as usize]
                        } else {
                            pattern(k)
                        };
                        write(&q, t * half + i, &p);
                        last[i as usize] = (k != 11).then_some(k);
                        during += u32::from(q.dedup_rebuilding());
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    (last, during)
                })
            })
            .collect();
        let mut model = Vec::new();
        let mut during = 0;
        for h in handles {
            let (last, d) = h.join().unwrap();
            during += d;
            for l in last {
                match l {
                    Some(k) => model.extend(pattern(k)),
                    None => model.extend(vec![0u8; CS as usize]),
                }
            }
        }
        assert!(during > 20, "only {during} writes ran during the rebuild");
        wait_until("the rebuild", || !q.dedup_rebuilding());
        let rep = q.dedup_open_report().unwrap();
        assert!(rep.clusters_hashed > 0, "{rep:?}");
        drop(worker);
        q.close().unwrap();
        drop(q);
        std::fs::write(&raw, &model).unwrap();
        common::assert_check_clean(&img);
        common::assert_same_as_raw(&img, &raw);
    }
}
