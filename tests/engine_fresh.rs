//! New clusters that were never written read as zeros: an allocating write into one writes
//! only its own bytes and needs no sync before its L2 entry. Creating a refcount block ahead
//! of the allocator (far past the allocations) must not change that for the clusters between.

mod common;

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::hooked::Hooked;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{MemStorage, Storage};

#[test]
fn clusters_below_a_refcount_block_created_ahead_stay_fresh() {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: 64 << 20,
        cluster_bits: 12,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let syncs = Arc::new(AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(mem.snapshot()));
    let n = syncs.clone();
    hooked.on_flush = Some(Box::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
    }));
    let hooked = Arc::new(hooked);
    let storage: Arc<dyn Storage> = hooked.clone();
    let q = Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap();
    // 4 KiB clusters, 16-bit refcounts: a block covers 2048 clusters (8 MiB). Past the middle
    // of the first block's range the next block is created ahead, at cluster 2048.
    let write = |c: u64| {
        q.write_vectored(
            c * 4096 + 1024,
            &[IoSlice::new(&[(c % 251) as u8 | 1; 512])],
        )
        .unwrap();
    };
    for c in 0..1400 {
        write(c);
    }
    let s0 = syncs.load(Ordering::SeqCst);
    for c in 1400..1900 {
        write(c);
    }
    let s1 = syncs.load(Ordering::SeqCst);
    assert!(
        s1 - s0 <= 4,
        "500 writes into never-written clusters below the new block synced {} times",
        s1 - s0
    );
    q.close().unwrap();
    drop(q);
    let img = MemStorage::from_vec(hooked.inner.snapshot());
    let r = check(&img, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    // Every write reads back, and the rest of each cluster reads as zeros.
    let q = Qcow2::open_storage(Arc::new(img), &OpenOptions::default(), None, 0).unwrap();
    for c in [0u64, 1399, 1400, 1899] {
        let mut buf = vec![0xeeu8; 4096];
        q.read_vectored(c * 4096, &mut [std::io::IoSliceMut::new(&mut buf)])
            .unwrap();
        let v = (c % 251) as u8 | 1;
        assert!(buf[..1024].iter().all(|&b| b == 0), "cluster {c} head");
        assert!(buf[1024..1536].iter().all(|&b| b == v), "cluster {c} data");
        assert!(buf[1536..].iter().all(|&b| b == 0), "cluster {c} tail");
    }
}
