//! Replays of fuzz findings (and a few plain inputs) through the fuzz harnesses themselves:
//! `fuzz/src/harness` is included here by path, so each test runs exactly the code path its
//! target ran under libFuzzer (`./run fuzz`), only under plain `cargo test`.
//!
//! A finding's minimized input lives in `tests/fuzz_inputs/TARGET-NAME` (or inline when tiny);
//! the test names say what went wrong before the fix.

#[path = "../fuzz/src/harness/mod.rs"]
mod harness;

use std::path::Path;

/// The bytes of `tests/fuzz_inputs/NAME`.
fn input(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_inputs")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fresh 1 MiB image with 4 KiB clusters, as an image container (see `harness::image_bytes`).
fn fresh_container() -> Vec<u8> {
    container_of(1 << 20, 12, 4)
}

/// A fresh image as an image container (see `harness::image_bytes`).
fn container_of(size: u64, cluster_bits: u32, refcount_order: u32) -> Vec<u8> {
    use vhost_user_qcow2::qcow2::{create, CreateOptions};
    use vhost_user_qcow2::storage::{MemStorage, Storage};
    let s = MemStorage::new();
    let o = CreateOptions {
        size,
        cluster_bits,
        refcount_order,
        ..Default::default()
    };
    create(&s, &o).unwrap();
    let img = s.snapshot();
    let sectors = (s.len().unwrap() / 512) as u32;
    let mut v = sectors.to_le_bytes()[..3].to_vec();
    v.extend_from_slice(&img);
    v
}

#[test]
fn harnesses_run_plain_inputs() {
    // Empty and short inputs reach every harness's early exits.
    for data in [&[][..], &[0u8][..], &[1, 2, 3][..]] {
        harness::image::run(data);
        harness::check::run(data);
        harness::virtio::run(data);
        harness::qmp::run(data);
        harness::dedup::run(data);
    }
    // A real image through open, every op kind, and close; and through check and repair.
    let mut ops = Vec::new();
    for (kind, fill, n, off) in [
        (1u8, 0xaau8, 8u16, 0u32),
        (0, 0, 16, 0),
        (8, 0xbb, 24, 100),
        (2, 0, 16, 256),
        (4, 0, 8, 80),
        (3, 0, 4, 3),
        (6, 0, 0, 0),
        (5, 0, 0, 0),
        (7, 0, 40, 0),
    ] {
        ops.extend_from_slice(&[kind, fill]);
        ops.extend_from_slice(&n.to_le_bytes());
        ops.extend_from_slice(&off.to_le_bytes());
    }
    ops.resize(harness::image::MAX_OPS * harness::image::OP_BYTES, 0);
    for flags in [0u8, 1, 0x14, 0x78] {
        let mut data = vec![flags];
        data.extend_from_slice(&ops);
        data.extend_from_slice(&fresh_container());
        harness::image::run(&data);
    }
    for flags in [0u8, 1, 6] {
        let mut data = vec![flags];
        data.extend_from_slice(&fresh_container());
        harness::check::run(&data);
    }
    harness::qmp::run(b"\x07{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-dedup\"}");
}

/// An `image` target input: flags, then ops (kind, fill, sectors, offset in sectors), then the
/// image container.
fn image_input(flags: u8, ops: &[(u8, u8, u16, u32)], container: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    for &(kind, fill, n, off) in ops {
        v.extend_from_slice(&[kind, fill]);
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&off.to_le_bytes());
    }
    v.resize(1 + harness::image::MAX_OPS * harness::image::OP_BYTES, 0);
    v.extend_from_slice(container);
    v
}

/// Found by `image` (a slow unit: 12 s for one 642 KiB write on a 512-byte-cluster image).
/// A write allocates its new clusters as one contiguous run, and fresh space only ever had runs
/// of (entries per refcount block - 1) clusters: each new refcount block takes the first cluster
/// of the range it covers. A longer run was never found: the allocator created block after
/// block, restarting its scan each time, until the storage refused to grow (on a file: until
/// the disk filled). 512-byte clusters with 64-bit refcounts give 64 entries per block, so a
/// 32 KiB guest write was enough.
#[test]
fn a_write_longer_than_a_refcount_block_covers_allocates_in_fresh_space() {
    let t = std::time::Instant::now();
    // 128 clusters (64 KiB) written, then read back; flags: read-write, defaults.
    let c = container_of(4 << 20, 9, 6);
    harness::image::run(&image_input(0, &[(1, 0x5a, 128, 0), (0, 0, 128, 0)], &c));
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());

    // The same through the engine directly: the data must read back.
    use std::io::{IoSlice, IoSliceMut};
    use std::sync::Arc;
    use vhost_user_qcow2::block::BlockDevice;
    use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
    use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
    use vhost_user_qcow2::storage::MemStorage;
    for (cb, order) in [(9, 6), (9, 4), (10, 6)] {
        let s = Arc::new(MemStorage::with_cap(Vec::new(), 64 << 20));
        let o = CreateOptions {
            size: 8 << 20,
            cluster_bits: cb,
            refcount_order: order,
            ..Default::default()
        };
        create(s.as_ref(), &o).unwrap();
        let q = Qcow2::open_storage(s.clone(), &OpenOptions::default(), None, 0).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512 * 13 + 7) as u8).collect();
        q.write_vectored(512 * 3, &[IoSlice::new(&data)]).unwrap();
        let mut back = vec![0u8; data.len()];
        q.read_vectored(512 * 3, &mut [IoSliceMut::new(&mut back)])
            .unwrap();
        assert!(back == data, "cluster_bits {cb} refcount_order {order}");
        q.close().unwrap();
        drop(q);
        let r = check(s.as_ref(), &CheckOptions::default()).unwrap();
        assert!(r.is_clean(), "{r:?}");
        // 1 MiB of data and metadata, the file grown in steps of 4 MiB.
        assert!(
            s.snapshot().len() <= 8 << 20,
            "image grew to {}",
            s.snapshot().len()
        );
    }
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
}

/// Reported by `dedup` as a timeout (122 s) during a long run, together with a 171 s "slowest
/// unit" logged at the same instant by both `dedup` and `qmp`, which ran side by side: the
/// machine stalled, not the code. The input (records through `encode_records` and `load`) runs
/// in about 25 ms; kept to show that it stays fast.
#[test]
fn dedup_stall_timeout_input_runs_fast() {
    let t = std::time::Instant::now();
    harness::dedup::run(&input("dedup-stall-timeout"));
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
}
