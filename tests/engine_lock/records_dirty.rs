//! Dedup records and candidates read without the metadata lock (a dedup write, a discard, the
//! background worker), a new refcount block written without it, and the DIRTY bit: its sync
//! outside the lock and a CORRUPT mark set meanwhile.
use super::*;

/// A dedup image whose records spread over many index clusters (one unique cluster per MiB
/// at +8 KiB, 40 of them, and byte 1 at 0), reopened with a cache of four index clusters
/// that hold others, with reads of the index cluster holding guest cluster `slow_gc`'s record
/// gated (the gate open until `set(false)`).
fn records_image(slow_gc: u64) -> (Arc<Qcow2>, Gate) {
    use vhost_user_qcow2::qcow2::format::dedup::{DedupExtension, EXT_DEDUP};
    use vhost_user_qcow2::qcow2::format::Header;
    let mem = new_image(128 << 20, true);
    let opts = OpenOptions {
        dedup_mode: Some(DedupMode::Inline),
        // Four index clusters of records (127 guest clusters each) in the cache.
        dedup_cache_bytes: Some(4 * 4096),
        ..Default::default()
    };
    {
        let q = Qcow2::open_storage(mem.clone(), &opts, None, 0).unwrap();
        q.write_vectored(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        // Records spread over many index clusters (unique contents).
        for i in 0..40u64 {
            let off = i * (1 << 20) + 8192;
            q.write_vectored(off, &[IoSlice::new(&[i as u8 + 10; 4096])])
                .unwrap();
        }
        q.close().unwrap();
    }
    let img = mem.snapshot();
    let h = Header::decode(&img[..4096]).unwrap();
    let e = DedupExtension::decode(h.extension(EXT_DEDUP).unwrap()).unwrap();
    let slow_record = e.index_offset + slow_gc / 127 * 4096;
    let (storage, gate) = Gate::storage(img, slow_record, true);
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    // The cache holds other index clusters now.
    for i in 30..40u64 {
        let off = i * (1 << 20) + 8192;
        q.write_vectored(off, &[IoSlice::new(&[i as u8 + 100; 4096])])
            .unwrap();
    }
    (q, gate)
}

/// A dedup write whose record (the dedup index cluster) is not cached reads it without the
/// metadata lock; evicted dirty index clusters are written without it too.
#[test]
fn a_dedup_write_reads_a_missing_record_without_the_metadata_lock() {
    let b = 8u64 << 20;
    let (q, gate) = records_image((b + 4096) / 4096);
    let (took, first, r) = read_while_gated(&q, &gate, 0, move |q| {
        q.write_vectored(b + 4096, &[IoSlice::new(&[3u8; 4096])])
    });
    r.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a dedup write's record read"
    );
    assert_eq!(first, 1);
    let mut buf = [0u8; 4096];
    assert_eq!(gate.held(), 1, "the write read its record");
    q.read_vectored(b + 4096, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert_eq!(buf[0], 3, "the dedup write landed");
    q.close().unwrap();
}

/// A dedup write whose duplicate's record is not cached reads it without the metadata lock
/// (the lookup under the lock needs it, and so does marking it verified after the compare),
/// then links.
#[test]
fn a_dedup_write_reads_its_candidates_record_without_the_metadata_lock() {
    // The candidate: a unique cluster `records_image` wrote at 5 MiB + 8 KiB (content 15),
    // its record in an index cluster the cache lacks. The writer's own record is cached.
    let cand = (5u64 << 20) + 8192;
    let mine = (35u64 << 20) + 3 * 4096;
    let (q, gate) = records_image(cand / 4096);
    let (took, first, r) = read_while_gated(&q, &gate, 0, move |q| {
        q.write_vectored(mine, &[IoSlice::new(&[15u8; 4096])])
    });
    r.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a dedup write's candidate record read"
    );
    assert_eq!(first, 1);
    assert_eq!(gate.held(), 1, "the write read its candidate's record");
    let st = q.dedup_stats().unwrap();
    assert_eq!(st.clusters_deduplicated, 1, "linked");
    // A record read from the image is not verified: the data was compared.
    assert_eq!(st.links_without_read, 0);
    let mut buf = [0u8; 4096];
    q.read_vectored(mine, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf.iter().all(|&x| x == 15));
    q.close().unwrap();
}

/// The refcount block the allocator needs next is created (written, synced, linked into the
/// table, synced) without the metadata lock: a read and an in-place write go on while its
/// syncs are slow. Then the image is consistent and the new block in use.
#[test]
fn a_new_refcount_block_is_written_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    let (storage, gate) = SyncGate::new(mem.snapshot());
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    q.write_vectored(0, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    q.flush_all().unwrap();
    // 4 KiB clusters, 16-bit refcounts: a block covers 2048 clusters. Allocating 2500 more
    // needs the second block; the first sync with the gate closed is its creation's.
    gate.close();
    let took = time_while_writer_held(
        q,
        2500,
        || gate.held(),
        || gate.release(),
        || gate.snapshot(),
    );
    assert!(
        took < Duration::from_secs(2),
        "a read and an in-place write waited {took:?} for a refcount block's creation"
    );
}

/// A dedup write whose duplicate lives under a table the cache lacks reads that table without
/// the metadata lock before it looks the candidate up, and still links to it.
#[test]
fn a_dedup_write_reads_its_candidates_table_without_the_metadata_lock() {
    let cand = 8u64 << 20; // under table 4
    let (q, gate) = dedup_image_over_64_tables(&[(cand, 7)], cand);
    // The cache holds the last tables (the writer's own among them), not the candidate's.
    let (mine, other) = ((63u64 << 21) + 3 * 4096, (62u64 << 21) + 8192);
    for t in 48..64u64 {
        let mut buf = [0u8; 4096];
        q.read_vectored(t << 21, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
    }
    // The write waits in its candidate's table read while `other` is read.
    let (took, first, r) = read_while_gated(&q, &gate, other, move |q| {
        q.write_vectored(mine, &[IoSlice::new(&[7u8; 4096])])
    });
    r.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a dedup write's candidate table read"
    );
    assert_eq!(first, 62 + 10);
    assert_eq!(gate.held(), 1, "the write read its candidate's table");
    let mut buf = [0u8; 4096];
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 1, "linked");
    q.read_vectored(mine, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf.iter().all(|&x| x == 7));
    q.close().unwrap();
}

/// The sync that sets DIRTY (once per DIRTY window: lazy refcounts' flush, a persister's first
/// batch) runs without the metadata lock: while it is held, a read and an in-place write of
/// another cluster go on. Then everything is in the file across a clean close.
#[test]
fn setting_dirty_syncs_without_the_metadata_lock() {
    for (lazy, ack) in [(true, AckDurability::Memory), (false, AckDurability::File)] {
        dirty_set_with_slow_syncs(lazy, ack);
    }
}

fn dirty_set_with_slow_syncs(lazy: bool, ack: AckDurability) {
    let what = format!("lazy {lazy}, ack {ack:?}");
    let mem = new_image(64 << 20, false);
    let (a, b) = (0u64, 8u64 << 20);
    let (storage, gate) = SyncGate::new(mem.snapshot());
    let opts = OpenOptions {
        lazy_refcounts: Some(lazy),
        ack_durability: ack,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    assert!(q.needs_refcount_timer(), "{what}: a DIRTY window");
    q.write_vectored(b, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    // The timer ends the DIRTY window: the next table write opens another.
    q.flush_refcounts().unwrap();
    assert_eq!(
        gate.snapshot().snapshot()[79] & 1,
        0,
        "{what}: DIRTY cleared"
    );
    let q2 = q.clone();
    let writer = move || {
        // New clusters: tables ahead of their refcounts (lazy), or a persister (file).
        for i in 0..8u64 {
            q2.write_vectored(a + i * 4096, &[IoSlice::new(&[1u8; 4096])])
                .unwrap();
        }
        q2.flush_all()
    };
    gate.close();
    let other = std::thread::spawn(writer);
    std::thread::sleep(Duration::from_millis(100)); // DIRTY's sync waits now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(b, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    q.write_vectored(b, &[IoSlice::new(&[3u8; 4096])]).unwrap();
    let took = t0.elapsed();
    let blocked = !other.is_finished();
    let dirty = gate.snapshot().snapshot()[79] & 1;
    gate.release();
    other.join().unwrap().unwrap();
    assert!(blocked && gate.held() >= 1, "{what}: no sync was held");
    assert_eq!(dirty, 1, "{what}: DIRTY was not written before its sync");
    assert_eq!(buf[0], 2);
    assert!(
        took < Duration::from_secs(2),
        "{what}: a read and an in-place write waited {took:?} for the sync that sets DIRTY"
    );
    q.close().unwrap();
    drop(q);
    let img = gate.snapshot().snapshot();
    assert_eq!(img[79] & 1, 0, "{what}: DIRTY left set after a clean close");
    let q = Qcow2::open_storage(
        Arc::new(MemStorage::from_vec(img)),
        &OpenOptions::default(),
        None,
        0,
    )
    .unwrap();
    assert_reads(&q, &[(a, 1), (a + 7 * 4096, 1), (b, 3)], &what);
}

/// A discard on an image with dedup records forgets the records of the clusters it drops; the
/// index clusters holding them are read without the metadata lock.
#[test]
fn a_discard_reads_the_records_it_forgets_without_the_metadata_lock() {
    let (a, b) = (0u64, 8u64 << 20);
    let (q, gate) = records_image((b + 8192) / 4096);
    let (took, first, r) = read_while_gated(&q, &gate, 0, move |q| q.discard(b, 1 << 20));
    r.unwrap();
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a discard's record read"
    );
    assert_eq!(first, 1);
    let mut buf = [0u8; 4096];
    assert_eq!(gate.held(), 1, "the discard read the records it forgets");
    q.read_vectored(b + 8192, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert_eq!(buf[0], 0, "the discard dropped the cluster");
    // Its record is gone: the same content written elsewhere is not linked to it.
    q.write_vectored(a + 4096, &[IoSlice::new(&[18u8; 4096])])
        .unwrap();
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 0);
    q.close().unwrap();
}

/// While a flush sets DIRTY without the metadata lock, another request trips an overlap check
/// and marks the image CORRUPT; the flush's header write lands after that mark. The CORRUPT
/// bit must still be in the file in the end (the flush writes the bits again under the lock).
#[test]
fn a_corrupt_mark_during_the_dirty_set_stays_in_the_file() {
    corrupt_mark_during_header_write(
        "the flush set DIRTY",
        |q, a| q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap(),
        |q| q.flush_all(),
    );
}

/// The same while the refcount timer clears DIRTY without the metadata lock: its header write
/// lands after the mark, and the timer writes the bits again under the lock.
#[test]
fn a_corrupt_mark_during_the_timers_dirty_clear_stays_in_the_file() {
    corrupt_mark_during_header_write(
        "the timer cleared DIRTY",
        |q, a| {
            q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap();
            // Tables ahead of their refcounts: DIRTY set in the file for the timer to clear.
            q.flush_all().unwrap();
        },
        |q| q.flush_refcounts(),
    );
}

/// `prepare(q, a)`, then `slow` on another thread: its first header write waits while a write
/// trips an overlap check (CORRUPT marked under the lock), then lands. CORRUPT must stay.
fn corrupt_mark_during_header_write(
    what: &str,
    prepare: impl FnOnce(&Qcow2, u64),
    slow: impl FnOnce(Arc<Qcow2>) -> vhost_user_qcow2::qcow2::error::Result<()> + Send + 'static,
) {
    let mem = new_image(64 << 20, false);
    let (a, b, x) = (0u64, 8u64 << 20, 16u64 << 20);
    {
        let q = Qcow2::open_storage(mem.clone(), &OpenOptions::default(), None, 0).unwrap();
        q.write_vectored(x, &[IoSlice::new(&[7u8; 4096])]).unwrap();
        q.close().unwrap();
    }
    // Guest cluster x now claims to be the refcount table (COPIED): a write there trips the
    // overlap check.
    let mut img = mem.snapshot();
    let be = |img: &[u8], at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    let rt = be(&img, 48);
    let at = (l2_offset(&img, x / 4096) + (x / 4096 % 512) * 8) as usize;
    img[at..at + 8].copy_from_slice(&(rt | 1 << 63).to_be_bytes());
    // The first header write after arming waits for the gate.
    let (armed, open) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut hooked = Hooked::new(MemStorage::from_vec(img));
    let (arm, g) = (armed.clone(), open.clone());
    hooked.on_write = Some(Box::new(move |_, off| {
        if off == 72 && arm.swap(false, Ordering::SeqCst) {
            hold(&g);
        }
    }));
    let hooked = Arc::new(hooked);
    let storage: Arc<dyn Storage> = hooked.clone();
    let opts = OpenOptions {
        lazy_refcounts: Some(true),
        ack_durability: AckDurability::Memory,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    q.write_vectored(b, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    q.flush_refcounts().unwrap();
    assert_eq!(
        hooked.inner.snapshot()[79] & 3,
        0,
        "DIRTY and CORRUPT clear"
    );
    prepare(&q, a);
    armed.store(true, Ordering::SeqCst);
    let q2 = q.clone();
    let flusher = std::thread::spawn(move || slow(q2));
    std::thread::sleep(Duration::from_millis(100)); // its header write waits now
    assert!(!armed.load(Ordering::SeqCst), "{what}");
    let r = q.write_vectored(x, &[IoSlice::new(&[9u8; 4096])]);
    assert!(r.is_err() && q.is_corrupt(), "the overlap check fired");
    open.store(true, Ordering::SeqCst);
    let _ = flusher.join().unwrap();
    let bits = hooked.inner.snapshot()[79];
    assert_eq!(bits & 2, 2, "CORRUPT lost from the file (bits {bits:#x})");
    drop(q);
    assert_eq!(hooked.inner.snapshot()[79] & 2, 2, "CORRUPT lost at close");
}

/// The background dedup worker reads the L2 table of the cluster it processes, when the
/// cache lacks it, without the metadata lock (`hold_cluster` loads it): a guest read goes on
/// meanwhile.
#[test]
fn the_background_worker_reads_a_missing_table_without_the_metadata_lock() {
    let mem = new_image(128 << 20, true);
    // 4 KiB clusters: a table maps 2 MiB. Tables 0..24 exist.
    {
        let opts = OpenOptions {
            dedup_mode: Some(DedupMode::Off),
            ..Default::default()
        };
        let q = Qcow2::open_storage(mem.clone(), &opts, None, 0).unwrap();
        for i in 0..24u64 {
            q.write_vectored(i << 21, &[IoSlice::new(&[i as u8 + 1; 4096])])
                .unwrap();
        }
        q.close().unwrap();
    }
    let target = (20u64 << 21) + 8192;
    let img = mem.snapshot();
    let (storage, gate) = Gate::storage(img.clone(), l2_offset(&img, target / 4096), true);
    let opts = OpenOptions {
        dedup_mode: Some(DedupMode::Background),
        l2_cache_bytes: Some(16 * 4096),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    q.write_vectored(target, &[IoSlice::new(&[0x5au8; 4096])])
        .unwrap();
    assert_eq!(q.dedup_pending(), 1);
    // Clean (a dirty table stays cached), then pushed out of the 16-table cache; table 0 is
    // read last.
    q.flush_all().unwrap();
    let mut buf = [0u8; 4096];
    for i in (0..18u64).rev() {
        q.read_vectored(i << 21, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
    }
    let misses = q.stats().l2_misses;
    let (took, first, r) = read_while_gated(&q, &gate, 0, |q| q.dedup_step());
    assert!(r.unwrap(), "the worker processed the cluster");
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for the worker's table read"
    );
    assert_eq!(first, 1);
    assert_eq!(gate.held(), 1, "the worker read the table");
    assert_eq!(q.dedup_pending(), 0);
    assert_eq!(q.stats().l2_misses, misses + 1, "the table was not cached");
    q.close().unwrap();
}
