//! Model-based random test of the qcow2 engine: random writes, reads, discards, write-zeroes,
//! flushes and reopens checked against an in-memory model, then `qemu-img check` (exit 0) and
//! `qemu-img compare` against the model written out as a raw file.

mod common;

use rand::{Rng, SeedableRng};
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

struct Variant {
    cluster_bits: u32,
    refcount_order: u32,
    version: u32,
    size: u64,
    backing: bool,
    ops: usize,
}

fn new_image(path: &Path, v: &Variant, backing: Option<(&str, &str)>) {
    let f = std::fs::File::create(path).unwrap();
    let o = CreateOptions {
        size: v.size,
        cluster_bits: v.cluster_bits,
        refcount_order: v.refcount_order,
        version: v.version,
        backing: backing.map(|(a, b)| (a.to_string(), b.to_string())),
        ..Default::default()
    };
    create(&FileStorage::new(f), &o).unwrap();
}

fn run_variant(v: Variant, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let raw = dir.path().join("model.raw");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; v.size as usize];
    if v.backing {
        // A raw backing file with a pattern over its first part only (shorter than the disk).
        let base = dir.path().join("base.raw");
        let blen = (v.size / 2) as usize;
        let mut data = vec![0u8; blen];
        rng.fill(&mut data[..]);
        std::fs::write(&base, &data).unwrap();
        model[..blen].copy_from_slice(&data);
        new_image(&img, &v, Some(("base.raw", "raw")));
    } else {
        new_image(&img, &v, None);
    }
    let cs = 1u64 << v.cluster_bits;
    let mut q = Qcow2::open(&img, false).unwrap();
    let sectors = v.size / 512;
    for op in 0..v.ops {
        let start = rng.random_range(0..sectors) * 512;
        let max_len = (v.size - start).min(4 * cs + 4096);
        let len = (rng.random_range(1..=max_len / 512)) * 512;
        match rng.random_range(0..100) {
            0..=44 => {
                let mut data = vec![0u8; len as usize];
                if rng.random_bool(0.5) {
                    rng.fill(&mut data[..]);
                } else {
                    data.fill(rng.random());
                }
                // Split into up to 3 iovecs at random points.
                let a = rng.random_range(0..=data.len());
                let b = rng.random_range(a..=data.len());
                let iov = [
                    IoSlice::new(&data[..a]),
                    IoSlice::new(&data[a..b]),
                    IoSlice::new(&data[b..]),
                ];
                q.write_vectored(start, &iov).unwrap();
                model[start as usize..(start + len) as usize].copy_from_slice(&data);
            }
            45..=74 => {
                let mut buf = vec![0xeeu8; len as usize];
                let a = rng.random_range(0..=buf.len());
                {
                    let (x, y) = buf.split_at_mut(a);
                    q.read_vectored(start, &mut [IoSliceMut::new(x), IoSliceMut::new(y)])
                        .unwrap();
                }
                assert!(
                    buf == model[start as usize..(start + len) as usize],
                    "op {op}: read {start}+{len} differs from the model (seed {seed})"
                );
            }
            75..=82 => {
                // Whole-cluster discards read back as zeros (partial ones are ignored).
                let s = start.div_ceil(cs) * cs;
                let e = ((start + len) / cs * cs).max(s);
                q.discard(start, len).unwrap();
                if !v.backing || v.version >= 3 {
                    model[s as usize..e as usize].fill(0);
                } else {
                    // v2 with a backing file: discarded clusters show the backing file again.
                    let base = std::fs::read(dir.path().join("base.raw")).unwrap();
                    for i in s..e {
                        model[i as usize] = base.get(i as usize).copied().unwrap_or(0);
                    }
                }
            }
            83..=92 => {
                let unmap = rng.random_bool(0.5);
                q.write_zeroes(start, len, unmap).unwrap();
                model[start as usize..(start + len) as usize].fill(0);
            }
            93..=96 => q.flush().unwrap(),
            _ => {
                q.close().unwrap();
                drop(q);
                common::assert_check_clean(&img);
                q = Qcow2::open(&img, false).unwrap();
            }
        }
    }
    q.close().unwrap();
    drop(q);
    std::fs::write(&raw, &model).unwrap();
    common::assert_check_clean(&img);
    common::assert_same_as_raw(&img, &raw);
}

#[test]
fn model_64k_clusters() {
    run_variant(
        Variant {
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
            size: 64 << 20,
            backing: false,
            ops: 600,
        },
        1,
    );
}

#[test]
fn model_512b_clusters_1bit_refcounts_grow_refcount_table() {
    // 512-byte clusters and 1-bit refcounts force new refcount blocks and refcount table growth.
    run_variant(
        Variant {
            cluster_bits: 9,
            refcount_order: 0,
            version: 3,
            size: 16 << 20,
            backing: false,
            ops: 800,
        },
        2,
    );
}

#[test]
fn model_4k_clusters_64bit_refcounts() {
    run_variant(
        Variant {
            cluster_bits: 12,
            refcount_order: 6,
            version: 3,
            size: 32 << 20,
            backing: false,
            ops: 600,
        },
        3,
    );
}

#[test]
fn model_2m_clusters() {
    run_variant(
        Variant {
            cluster_bits: 21,
            refcount_order: 4,
            version: 3,
            size: 128 << 20,
            backing: false,
            ops: 200,
        },
        4,
    );
}

#[test]
fn model_v2_image() {
    run_variant(
        Variant {
            cluster_bits: 16,
            refcount_order: 4,
            version: 2,
            size: 32 << 20,
            backing: false,
            ops: 500,
        },
        5,
    );
}

#[test]
fn model_with_raw_backing_file() {
    run_variant(
        Variant {
            cluster_bits: 16,
            refcount_order: 4,
            version: 3,
            size: 32 << 20,
            backing: true,
            ops: 500,
        },
        6,
    );
}

#[test]
fn model_v2_with_backing_file() {
    run_variant(
        Variant {
            cluster_bits: 12,
            refcount_order: 4,
            version: 2,
            size: 8 << 20,
            backing: true,
            ops: 500,
        },
        7,
    );
}
