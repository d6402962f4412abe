//! Several threads writing into the same unallocated clusters at once must never both allocate:
//! every write survives, nothing leaks, and qemu-img check passes.

mod common;

use std::io::IoSlice;
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

#[test]
fn concurrent_writers_into_one_unallocated_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let raw = dir.path().join("c.raw");
    let size = 64u64 << 20;
    let o = CreateOptions {
        size,
        cluster_bits: 16,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(&img).unwrap()), &o).unwrap();
    let q = Arc::new(Qcow2::open(&img, false).unwrap());
    let threads = 4u64;
    let mut hs = Vec::new();
    for t in 0..threads {
        let q = q.clone();
        hs.push(std::thread::spawn(move || {
            // Thread t writes sector t of every 4-sector group of the first 256 clusters,
            // clusters taken in a different order per thread to maximise collisions.
            for i in 0..256u64 {
                let cl = if t % 2 == 0 { i } else { 255 - i };
                for g in 0..4u64 {
                    let off = cl * 65536 + g * 4 * 512 * 8 + t * 512;
                    q.write_vectored(off, &[IoSlice::new(&[(t as u8 + 1) * 16 + g as u8; 512])])
                        .unwrap();
                }
                if i % 64 == 0 {
                    q.flush().unwrap();
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    q.close().unwrap();
    let stats = q.stats();
    drop(q);
    let mut model = vec![0u8; size as usize];
    for t in 0..threads {
        for cl in 0..256u64 {
            for g in 0..4u64 {
                let off = (cl * 65536 + g * 4 * 512 * 8 + t * 512) as usize;
                model[off..off + 512].fill((t as u8 + 1) * 16 + g as u8);
            }
        }
    }
    std::fs::write(&raw, &model).unwrap();
    common::assert_check_clean(&img);
    common::assert_same_as_raw(&img, &raw);
    // 256 data clusters and one L2 table: nothing allocated twice.
    assert_eq!(stats.clusters_allocated, 257, "{stats:?}");
}
