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
#[allow(dead_code)]
fn input(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_inputs")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A fresh 1 MiB image with 4 KiB clusters, as an image container (see `harness::image_bytes`).
fn fresh_container() -> Vec<u8> {
    use vhost_user_qcow2::qcow2::{create, CreateOptions};
    use vhost_user_qcow2::storage::{MemStorage, Storage};
    let s = MemStorage::new();
    let o = CreateOptions {
        size: 1 << 20,
        cluster_bits: 12,
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
