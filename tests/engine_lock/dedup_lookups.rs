//! Dedup's lookups of tables the cache dropped: after a byte compare, and when a free leaves
//! one user of a shared cluster; read without the metadata lock.
use super::*;

/// The host offset of guest cluster `gc`'s data (4 KiB clusters).
fn data_offset(img: &[u8], gc: u64) -> u64 {
    let be = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    be(l2_offset(img, gc) + (gc % 512) * 8) & 0x00ff_ffff_ffff_fe00
}

/// A write of a content the image has under another table (an unverified record: loaded,
/// not computed this session) compares it. While the compare's read waits, 16 other tables
/// are read: the cache (16 tables) drops the writer's table and the candidate's. The writer's
/// table read that follows is gated: a read of a cached table on another thread goes on
/// meanwhile, and the write still links.
#[test]
fn a_table_dropped_during_a_compare_is_read_again_without_the_metadata_lock() {
    let cand = 8u64 << 20; // under table 4
    let mine = (63u64 << 21) + 3 * 4096;
    let img = dedup_bytes_over_64_tables(&[(cand, 7)]);
    let (data_at, table_at) = (data_offset(&img, cand / 4096), l2_offset(&img, mine / 4096));
    let data_gate = Arc::new(AtomicBool::new(true));
    let table_gate = Arc::new(AtomicBool::new(true));
    let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(img));
    let (dg, tg, n) = (data_gate.clone(), table_gate.clone(), held.clone());
    hooked.on_read = Some(Box::new(move |off| {
        let g = if off == data_at {
            &dg
        } else if off == table_at {
            &tg
        } else {
            return;
        };
        if !g.load(Ordering::SeqCst) {
            n.fetch_add(1, Ordering::SeqCst);
            hold(g);
        }
    }));
    let opts = dedup_over_64_tables_opts();
    let q = Arc::new(Qcow2::open_storage(Arc::new(hooked), &opts, None, 0).unwrap());
    // The open leaves the last tables cached (the writer's among them); the candidate's too.
    let mut buf = [0u8; 4096];
    q.read_vectored(cand, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert_eq!(buf[0], 7);
    data_gate.store(false, Ordering::SeqCst);
    let q2 = q.clone();
    let writer = std::thread::spawn(move || q2.write_vectored(mine, &[IoSlice::new(&[7u8; 4096])]));
    let t0 = Instant::now();
    while held.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        held.load(Ordering::SeqCst),
        1,
        "the compare reads the candidate"
    );
    // 16 other tables: the writer's and the candidate's leave the cache.
    for t in 32..48u64 {
        q.read_vectored((t << 21) + 8192, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert_eq!(buf[0], t as u8 + 10);
    }
    table_gate.store(false, Ordering::SeqCst);
    data_gate.store(true, Ordering::SeqCst);
    while held.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        held.load(Ordering::SeqCst),
        2,
        "the writer reads its table again"
    );
    let t1 = Instant::now();
    q.read_vectored((40u64 << 21) + 8192, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    let took = t1.elapsed();
    table_gate.store(true, Ordering::SeqCst);
    writer.join().unwrap().unwrap();
    assert_eq!(buf[0], 50);
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a table read after a compare"
    );
    let stats = q.dedup_stats().unwrap();
    assert_eq!(stats.clusters_deduplicated, 1, "linked after the compare");
    q.read_vectored(mine, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    q.close().unwrap();
}

/// A flush whose frees leave one user of a shared cluster looks that user's entry up (it
/// gets COPIED back). Its table, dropped from the cache, is read before the frees are
/// applied, without the lock: a read on another thread goes on while that read is gated.
#[test]
fn the_table_of_the_last_user_of_a_freed_shared_cluster_is_read_without_the_metadata_lock() {
    let cand = 8u64 << 20; // under table 4, whose reads are gated
    let mine = (63u64 << 21) + 3 * 4096;
    let (q, gate) = dedup_image_over_64_tables(&[(cand, 7)], cand);
    q.write_vectored(mine, &[IoSlice::new(&[7u8; 4096])])
        .unwrap();
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 1, "linked");
    let mut buf = [0u8; 4096];
    for t in 32..48u64 {
        q.read_vectored((t << 21) + 8192, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
    }
    q.discard(mine, 4096).unwrap();
    let reads = gate.held();
    let (took, first, r) = read_while_gated(&q, &gate, (40u64 << 21) + 8192, |q| q.flush_all());
    r.unwrap();
    assert_eq!(first, 50);
    assert_eq!(
        gate.held(),
        reads + 1,
        "the flush read the survivor's table"
    );
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a flush's survivor lookup"
    );
    q.read_vectored(cand, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    q.close().unwrap();
}
