//! The refcount table grown without the metadata lock: its writes, syncs and header switch
//! happen while other requests read and write in place.
use super::*;

/// The table of a 512-byte-cluster image covers 8 MiB per table cluster (64 blocks of 256
/// refcounts); writing past that grows it. The sync after the header switch is held: a read
/// and an in-place write go on meanwhile. Then the image is consistent, with every write in it.
#[test]
fn the_refcount_table_grows_without_the_metadata_lock() {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: 32 << 20,
        cluster_bits: 9,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let open = Arc::new(AtomicBool::new(true));
    let switched = Arc::new(AtomicBool::new(false));
    let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(mem.snapshot()));
    // A write of the header's refcount-table fields (offset 48, 12 bytes): its sync waits.
    let sw = switched.clone();
    hooked.on_write = Some(Box::new(move |buf, off| {
        if off == 48 && buf.len() == 12 {
            sw.store(true, Ordering::SeqCst);
        }
    }));
    let (g, sw, n) = (open.clone(), switched.clone(), held.clone());
    hooked.on_flush = Some(Box::new(move || {
        if sw.swap(false, Ordering::SeqCst) {
            n.fetch_add(1, Ordering::SeqCst);
            hold(&g);
        }
    }));
    let hooked = Arc::new(hooked);
    let storage: Arc<dyn Storage> = hooked.clone();
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    q.write_vectored(0, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    open.store(false, Ordering::SeqCst);
    // 12 MiB of new data: past the first table cluster's 8 MiB.
    let took = time_while_writer_held(
        q,
        3072,
        || held.load(Ordering::SeqCst),
        || open.store(true, Ordering::SeqCst),
        || MemStorage::from_vec(hooked.inner.snapshot()),
    );
    assert!(
        took < Duration::from_secs(2),
        "a read and an in-place write waited {took:?} for the refcount table's growth"
    );
}
