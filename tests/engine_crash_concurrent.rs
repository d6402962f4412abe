//! Crash consistency with many requests in flight. Four threads write, overwrite, discard,
//! zero and flush at once, each in its own 16 KiB chunks of one image (interleaved, so every
//! L2 table and refcount block is shared by all of them), with contents that repeat across
//! threads (dedup links between them). The fault-injecting storage delays each write and sync
//! by a random few µs, so requests complete in a different order from run to run, and crashes
//! after the N-th write or sync, for every N up to the count of a run without a crash. Each
//! image a disk could then hold (only synced writes, all writes, a random subset, torn
//! sectors) must pass `qemu-img check` (repaired first when DIRTY, and then only refcounts
//! may be behind), and every sector a thread wrote before its last completed flush and did
//! not touch since must read back.

mod common;

use std::io::IoSlice;
use std::sync::Arc;
use vhost_user_qcow2::block::{BlockDevice, BlockError};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

const SIZE: u64 = 8 << 20;
const THREADS: u64 = 4;
/// Each thread owns the chunks `c` with `c % THREADS == thread`.
const CHUNK: u64 = 16 << 10;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Zero(u64, u64),
    Flush,
    /// The lazy-refcount timer's work (`flush_refcounts`).
    Refcounts,
}

/// xorshift64 for the scripts (fixed seeds: the same scripts every run).
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Thread `t`'s script: `n` operations in its own chunks.
fn script(t: u64, n: usize) -> Vec<Op> {
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let chunks = SIZE / CHUNK / THREADS;
    let mut ops = Vec::new();
    for i in 0..n {
        let chunk = (next(&mut x) % chunks) * THREADS + t;
        let base = chunk * CHUNK;
        let op = match next(&mut x) % 10 {
            // Whole clusters of a content other threads write too: dedup links between them.
            0..=2 => {
                let c = next(&mut x) % 3;
                Op::Write(
                    base + c * 4096,
                    4096 * (1 + next(&mut x) % 2),
                    1 + (i % 3) as u8,
                )
            }
            // Partial clusters: COW of a shared cluster, sub-cluster allocation, in place.
            3..=5 => {
                let off = (next(&mut x) % (CHUNK / 512 - 8)) * 512;
                let len = 512 * (1 + next(&mut x) % 8);
                Op::Write(base + off, len, 10 + (t * 16) as u8 + i as u8)
            }
            6 => Op::Discard(base + 4096 * (next(&mut x) % 3), 4096),
            7 => Op::Zero(base + 4096 * (next(&mut x) % 3), 4096),
            8 if t == 0 => Op::Refcounts,
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops.push(Op::Flush);
    ops
}

#[derive(Clone, Copy, Debug)]
struct Mode {
    lazy: bool,
    dedup: DedupMode,
    ack: AckDurability,
}

/// What one thread saw: the guest's view of its chunks as of its last completed flush, and
/// the sectors it touched since.
struct Seen {
    durable: Vec<u8>,
    touched: Vec<bool>,
}

fn apply(q: &Qcow2, model: &mut [u8], op: Op) -> Result<(), BlockError> {
    match op {
        Op::Write(o, l, v) => {
            model[o as usize..(o + l) as usize].fill(v);
            q.write_vectored(o, &[IoSlice::new(&model[o as usize..(o + l) as usize])])
        }
        Op::Discard(o, l) => {
            model[o as usize..(o + l) as usize].fill(0);
            q.discard(o, l)
        }
        Op::Zero(o, l) => {
            model[o as usize..(o + l) as usize].fill(0);
            q.write_zeroes(o, l, true)
        }
        Op::Flush => q.flush(),
        Op::Refcounts => q.flush_refcounts().map_err(BlockError::from),
    }
}

/// Run every thread's script until the storage fails.
fn run(st: Arc<FaultStorage>, scripts: &[Vec<Op>], mode: Mode) -> Vec<Seen> {
    let opts = OpenOptions {
        lazy_refcounts: Some(mode.lazy),
        dedup_mode: Some(mode.dedup),
        ack_durability: mode.ack,
        ..Default::default()
    };
    let q = match Qcow2::open_storage(st, &opts, None, 0) {
        Ok(q) => Arc::new(q),
        Err(_) => {
            return scripts
                .iter()
                .map(|_| Seen {
                    durable: vec![0; SIZE as usize],
                    touched: vec![false; (SIZE / 512) as usize],
                })
                .collect()
        }
    };
    let handles: Vec<_> = scripts
        .iter()
        .cloned()
        .map(|ops| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut model = vec![0u8; SIZE as usize];
                let mut seen = Seen {
                    durable: model.clone(),
                    touched: vec![false; (SIZE / 512) as usize],
                };
                for op in ops {
                    if let Op::Write(o, l, _) | Op::Discard(o, l) | Op::Zero(o, l) = op {
                        for s in o / 512..(o + l).div_ceil(512) {
                            seen.touched[s as usize] = true;
                        }
                    }
                    if apply(&q, &mut model, op).is_err() {
                        break;
                    }
                    if let Op::Flush | Op::Refcounts = op {
                        seen.durable.copy_from_slice(&model);
                        seen.touched.fill(false);
                    }
                }
                seen
            })
        })
        .collect();
    let seen = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let _ = q.close();
    seen
}

fn crash_points(mode: Mode, ops_per_thread: usize) {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: SIZE,
        cluster_bits: 12,
        dedup: mode.dedup != DedupMode::Off,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let image = mem.snapshot();
    let scripts: Vec<Vec<Op>> = (0..THREADS).map(|t| script(t, ops_per_thread)).collect();
    let dry = Arc::new(FaultStorage::new(image.clone(), None).with_jitter(1));
    let seen = run(dry.clone(), &scripts, mode);
    let total = dry.writes();
    assert!(total > 60, "{mode:?}: too little work ({total} writes)");
    eprintln!("{mode:?}: {total} crash points");
    // Without a crash: exactly clean, and every thread's data is there.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crashed.qcow2");
    let all = dry.crashed_image(CrashMode::AllWrites);
    std::fs::write(&path, &all).unwrap();
    common::assert_check_clean(&path);
    let disk = common::crash::read_all(all);
    for (t, s) in seen.iter().enumerate() {
        assert_same(&disk, s, t as u64, &format!("{mode:?}: no crash"));
    }
    for n in 0..=total {
        let st = Arc::new(FaultStorage::new(image.clone(), Some(n)).with_jitter(n + 2));
        let seen = run(st.clone(), &scripts, mode);
        for cm in [
            CrashMode::FlushedOnly,
            CrashMode::AllWrites,
            CrashMode::RandomSubset(n * 7 + 1),
            CrashMode::TornSectors(n * 11 + 3),
        ] {
            let what = format!("{mode:?}: crash after write {n} ({cm:?})");
            let (_, disk) = common::crash::check_crashed(&path, st.crashed_image(cm), &what);
            for (t, s) in seen.iter().enumerate() {
                assert_same(&disk, s, t as u64, &what);
            }
        }
    }
}

/// Every sector of thread `t`'s chunks that it flushed and did not touch since reads back.
fn assert_same(disk: &[u8], s: &Seen, t: u64, what: &str) {
    for (i, touched) in s.touched.iter().enumerate() {
        let off = i as u64 * 512;
        if *touched || (off / CHUNK) % THREADS != t {
            continue;
        }
        let r = off as usize..off as usize + 512;
        assert!(
            disk[r.clone()] == s.durable[r.clone()],
            "{what}: thread {t}'s flushed sector {i} lost (reads {:#x}, flushed {:#x})",
            disk[r.start],
            s.durable[r.start]
        );
    }
}

#[test]
fn every_crash_point_with_writes_in_flight_strict() {
    let m = Mode {
        lazy: false,
        dedup: DedupMode::Off,
        ack: AckDurability::File,
    };
    crash_points(m, 14);
    // Tables kept in memory until a flush: the flush's own ordered writes.
    crash_points(
        Mode {
            ack: AckDurability::Memory,
            ..m
        },
        14,
    );
}

#[test]
fn every_crash_point_with_writes_in_flight_lazy() {
    crash_points(
        Mode {
            lazy: true,
            dedup: DedupMode::Off,
            ack: AckDurability::Memory,
        },
        14,
    );
}

#[test]
fn every_crash_point_with_writes_in_flight_dedup() {
    for lazy in [false, true] {
        crash_points(
            Mode {
                lazy,
                dedup: DedupMode::Inline,
                ack: AckDurability::File,
            },
            14,
        );
    }
}
