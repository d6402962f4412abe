//! The lazy-refcount timer (`Qcow2::flush_refcounts`) writes the refcount blocks it held back
//! without the metadata lock: a read on another queue goes on while those writes are slow
//! (with `--cache none` each is a trip to the disk).

use super::*;

/// The host offset of refcount block 0 (from the header's refcount table).
fn refcount_block_0(img: &[u8]) -> u64 {
    let be = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    be(be(48) as usize)
}

#[test]
fn the_refcount_timer_writes_blocks_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    let block = refcount_block_0(&mem.snapshot());
    assert_ne!(block, 0);
    let open = Arc::new(AtomicBool::new(true));
    let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(mem.snapshot()));
    let (g, n) = (open.clone(), held.clone());
    hooked.on_write = Some(Box::new(move |_, off| {
        if off == block && !g.load(Ordering::SeqCst) {
            n.fetch_add(1, Ordering::SeqCst);
            hold(&g);
        }
    }));
    let hooked = Arc::new(hooked);
    let opts = OpenOptions {
        lazy_refcounts: Some(true),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(hooked.clone(), &opts, None, 0).unwrap());
    // Cluster 0 allocated and durable, then 8 more: refcount block 0 is dirty (lazy).
    q.write_vectored(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
    q.flush_refcounts().unwrap();
    for i in 1..9u64 {
        q.write_vectored(i * 4096, &[IoSlice::new(&[2u8; 4096])])
            .unwrap();
    }
    q.flush_all().unwrap();
    open.store(false, Ordering::SeqCst);
    let q2 = q.clone();
    let timer = std::thread::spawn(move || q2.flush_refcounts());
    let t0 = Instant::now();
    while held.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(held.load(Ordering::SeqCst), 1, "the timer writes the block");
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    let took = t0.elapsed();
    open.store(true, Ordering::SeqCst);
    timer.join().unwrap().unwrap();
    assert_eq!(buf[0], 1);
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for the timer's refcount-block write"
    );
    // The block reached the file: the image is clean without a repair.
    q.close().unwrap();
    drop(q);
    use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
    let img = MemStorage::from_vec(hooked.inner.snapshot());
    let r = check(&img, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}
