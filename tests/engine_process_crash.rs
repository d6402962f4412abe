//! Acknowledged writes outlive the process (docs/design.md): the daemon is killed, the host is
//! not, so everything the process wrote into the image file is still there (the page cache
//! survives), synced or not. Random scripts (allocating and partial writes, rewrites in place,
//! write-zeroes, discards, flushes; dedup off, inline and background; lazy refcounts on and off;
//! one to three threads, each in its own part of the disk) run on fault storage that stops
//! taking writes at a random point (`CrashMode::AllWrites`: nothing written before it is lost);
//! the engine is then abandoned without a flush or a close. The image is reopened read-write
//! (a DIRTY image is repaired first): every write, write-zeroes and flush that returned Ok must
//! read back exactly, and the checker must find no corruption (before the reopen too when the
//! image is not DIRTY).
//!
//! The control (`without_persist_before_ack_acked_writes_are_lost`) runs the same scripts with
//! `AckDurability::Memory`: the metadata of a write then stays in the process until a flush, and
//! some runs must lose acknowledged writes, or this test could not see the loss.

mod common;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

const SECTOR: u64 = 512;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Whole clusters of a shared content (dedup links across threads).
    Content {
        gc: u64,
        n: u64,
        id: u64,
    },
    /// Sectors of unique content (partial clusters: COW, padding, in place).
    Unique {
        off: u64,
        len: u64,
    },
    /// One sector of unique content in the shared half of the disk, where the threads own
    /// alternate sectors of the same clusters: one thread's write in place goes through the
    /// entry another thread has just linked.
    Shared {
        off: u64,
    },
    Zero {
        off: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    cluster_bits: u32,
    refcount_order: u32,
    size: u64,
    lazy: bool,
    dedup: DedupMode,
    threads: usize,
    ack: AckDurability,
}

/// The tag a sector of a write carries (0: zeros). Content tags depend on the content and the
/// sector's place in its cluster only, so equal clusters are equal bytes.
/// Content `ZEROS` is all zeros (a zero cluster under dedup).
fn content_tag(id: u64, sector_in_cluster: u64) -> u64 {
    if id == ZEROS {
        return 0;
    }
    (1 << 62) | (id << 24) | sector_in_cluster
}

const ZEROS: u64 = 6;

fn unique_tag(thread: usize, op: usize, sector: u64) -> u64 {
    (2 << 62) | ((thread as u64) << 56) | ((op as u64) << 28) | sector
}

fn sector_bytes(tag: u64, out: &mut [u8]) {
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&tag.to_le_bytes());
    }
}

/// The tag a sector read back carries, or None when it is no tag at all.
fn read_tag(b: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(b[..8].try_into().unwrap());
    b.chunks_exact(8)
        .all(|c| u64::from_le_bytes(c.try_into().unwrap()) == first)
        .then_some(first)
}

/// One thread's script: its region `base..base + len` (cluster aligned) and its sectors of the
/// shared half.
fn script(rng: &mut StdRng, cfg: &Config, t: usize, base: u64, len: u64, n_ops: usize) -> Vec<Op> {
    let cs = 1u64 << cfg.cluster_bits;
    let clusters = len / cs;
    let spc = cs / SECTOR;
    let mut ops = Vec::new();
    for _ in 0..n_ops {
        // This thread's sectors in a cluster of the shared half.
        let slots = spc.saturating_sub(t as u64).div_ceil(cfg.threads as u64);
        if cfg.threads > 1 && slots > 0 && rng.random_bool(0.2) {
            let shared = cfg.size / 2 / cs;
            let c = shared + rng.random_range(0..shared.min(8));
            let k = rng.random_range(0..slots);
            ops.push(Op::Shared {
                off: c * cs + (k * cfg.threads as u64 + t as u64) * SECTOR,
            });
            continue;
        }
        let op = match rng.random_range(0..100) {
            0..=39 => {
                let n = rng.random_range(1..=3.min(clusters));
                let gc = base / cs + rng.random_range(0..=clusters - n);
                Op::Content {
                    gc,
                    n,
                    id: rng.random_range(0..=ZEROS),
                }
            }
            40..=74 => {
                let sectors = len / SECTOR;
                let n = rng.random_range(1..=(2 * cs / SECTOR).min(sectors));
                let first = rng.random_range(0..=sectors - n);
                Op::Unique {
                    off: base + first * SECTOR,
                    len: n * SECTOR,
                }
            }
            75..=86 => {
                let sectors = len / SECTOR;
                let n = rng.random_range(1..=(3 * cs / SECTOR).min(sectors));
                let first = rng.random_range(0..=sectors - n);
                Op::Zero {
                    off: base + first * SECTOR,
                    len: n * SECTOR,
                    unmap: rng.random_bool(0.5),
                }
            }
            87..=94 => {
                let n = rng.random_range(1..=2.min(clusters));
                let gc = rng.random_range(0..=clusters - n);
                Op::Discard {
                    off: base + gc * cs,
                    len: n * cs,
                }
            }
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

/// Run `op` (number `i` of thread `t`).
fn apply(q: &Qcow2, cfg: &Config, t: usize, i: usize, op: Op) -> bool {
    let cs = 1u64 << cfg.cluster_bits;
    match op {
        Op::Content { gc, n, id } => {
            let mut buf = vec![0u8; (n * cs) as usize];
            for (k, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
                sector_bytes(content_tag(id, k as u64 % (cs / SECTOR)), s);
            }
            q.write(gc * cs, &[IoSlice::new(&buf)]).is_ok()
        }
        Op::Shared { off } => {
            let mut buf = vec![0u8; SECTOR as usize];
            sector_bytes(unique_tag(t, i, off / SECTOR), &mut buf);
            q.write(off, &[IoSlice::new(&buf)]).is_ok()
        }
        Op::Unique { off, len } => {
            let mut buf = vec![0u8; len as usize];
            for (k, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
                sector_bytes(unique_tag(t, i, off / SECTOR + k as u64), s);
            }
            q.write(off, &[IoSlice::new(&buf)]).is_ok()
        }
        Op::Zero { off, len, unmap } => {
            vhost_user_qcow2::block::BlockDevice::write_zeroes(q, off, len, unmap).is_ok()
        }
        Op::Discard { off, len } => {
            vhost_user_qcow2::block::BlockDevice::discard(q, off, len).is_ok()
        }
        Op::Flush => q.flush_all().is_ok(),
    }
}

/// What each sector may read back: the tags it may carry.
struct Model {
    allowed: Vec<Vec<u64>>,
}

impl Model {
    fn set(&mut self, sector: u64, tag: u64) {
        self.allowed[sector as usize] = vec![tag];
    }
    fn add(&mut self, sector: u64, tag: u64) {
        let a = &mut self.allowed[sector as usize];
        if !a.contains(&tag) {
            a.push(tag);
        }
    }
    /// Apply op `i` of thread `t`: `acked` (it returned Ok), or maybe landed (it failed).
    fn apply(&mut self, cfg: &Config, t: usize, i: usize, op: Op, acked: bool) {
        let cs = 1u64 << cfg.cluster_bits;
        let put = |m: &mut Model, s: u64, tag: u64| {
            if acked {
                m.set(s, tag)
            } else {
                m.add(s, tag)
            }
        };
        match op {
            Op::Content { gc, n, id } => {
                for s in gc * cs / SECTOR..(gc + n) * cs / SECTOR {
                    put(self, s, content_tag(id, s % (cs / SECTOR)));
                }
            }
            Op::Unique { off, len } => {
                for s in off / SECTOR..(off + len) / SECTOR {
                    put(self, s, unique_tag(t, i, s));
                }
            }
            Op::Shared { off } => put(self, off / SECTOR, unique_tag(t, i, off / SECTOR)),
            Op::Zero { off, len, .. } => {
                for s in off / SECTOR..(off + len) / SECTOR {
                    put(self, s, 0);
                }
            }
            // A discard promises nothing about the content until it is flushed (the old content
            // may come back); whole clusters only.
            Op::Discard { off, len } => {
                for s in off / SECTOR..(off + len) / SECTOR {
                    self.add(s, 0);
                }
            }
            Op::Flush => {}
        }
    }
}

/// What one crash run found: None when everything held, else a description of the first loss.
fn run_once(seed: u64, cfg: Config) -> Option<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cs = 1u64 << cfg.cluster_bits;
    let mem = MemStorage::new();
    create(
        &mem,
        &CreateOptions {
            size: cfg.size,
            cluster_bits: cfg.cluster_bits,
            refcount_order: cfg.refcount_order,
            lazy_refcounts: cfg.lazy,
            dedup: cfg.dedup != DedupMode::Off,
            ..Default::default()
        },
    )
    .unwrap();
    let image = mem.snapshot();
    // The first half: a region per thread; the second: clusters all threads write.
    let region = cfg.size / 2 / cfg.threads as u64 / cs * cs;
    let n_ops = rng.random_range(10..60);
    let scripts: Vec<Vec<Op>> = (0..cfg.threads)
        .map(|t| script(&mut rng, &cfg, t, t as u64 * region, region, n_ops))
        .collect();
    let opts = OpenOptions {
        lazy_refcounts: Some(cfg.lazy),
        dedup_mode: Some(cfg.dedup),
        ack_durability: cfg.ack,
        ..Default::default()
    };
    // How many writes the whole run makes, to pick the crash point among them.
    let dry = Arc::new(FaultStorage::new(image.clone(), None));
    let total = {
        let q = Arc::new(Qcow2::open_storage(dry.clone(), &opts, None, 0).unwrap());
        let (_, _) = execute(&q, &cfg, &scripts);
        let w = dry.writes();
        kill(&dry, q);
        w
    };
    let crash_after = rng.random_range(0..=total + total / 8);
    let st = Arc::new(FaultStorage::new(image, Some(crash_after)));
    let q = match Qcow2::open_storage(st.clone(), &opts, None, 0) {
        Ok(q) => Arc::new(q),
        Err(_) => return None, // crashed while opening: nothing was acknowledged
    };
    let (done, _) = execute(&q, &cfg, &scripts);
    // The process is gone: the file holds every write it made.
    kill(&st, q);
    let bytes = st.crashed_image(CrashMode::AllWrites);

    let mut model = Model {
        allowed: vec![vec![0]; (cfg.size / SECTOR) as usize],
    };
    for (t, (ops, &(n_ok, failed))) in scripts.iter().zip(&done).enumerate() {
        for (i, &op) in ops.iter().enumerate().take(n_ok) {
            model.apply(&cfg, t, i, op, true);
        }
        if failed {
            model.apply(&cfg, t, n_ok, ops[n_ok], false);
        }
    }

    let what = format!("seed {seed}, {cfg:?}, crash after write {crash_after} of {total}");
    let dirty = bytes[79] & 1 != 0;
    let r = check(
        &MemStorage::from_vec(bytes.clone()),
        &CheckOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    if dirty {
        common::assert_only_refcount_errors(&r.messages.join("\n"), &what);
    } else {
        assert_eq!(
            r.corruptions, 0,
            "{what}: clean-looking image with corruptions: {:?}",
            r.messages
        );
    }
    // Restart: a read-write open (repairs a DIRTY image), then read everything back.
    let after = Arc::new(MemStorage::from_vec(bytes));
    let q = Qcow2::open_storage(after.clone(), &opts, None, 0)
        .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    let mut disk = vec![0u8; cfg.size as usize];
    q.read(0, &mut [IoSliceMut::new(&mut disk)]).unwrap();
    q.close().unwrap();
    drop(q);
    let r = check(after.as_ref(), &CheckOptions::default()).unwrap();
    assert_eq!(
        r.corruptions, 0,
        "{what}: corruptions after the restart: {:?}",
        r.messages
    );
    let mut lost = Vec::new();
    for (s, b) in disk.chunks_exact(SECTOR as usize).enumerate() {
        let tag = read_tag(b);
        if !tag.is_some_and(|t| model.allowed[s].contains(&t)) {
            lost.push((s, tag, model.allowed[s].clone()));
        }
    }
    if lost.is_empty() {
        return None;
    }
    let (s, tag, allowed) = &lost[0];
    Some(format!(
        "{what} (dirty {dirty}): {} sectors wrong; sector {s} reads {tag:x?}, expected one of \
         {allowed:x?}",
        lost.len()
    ))
}

/// Run the scripts, one thread each, each stopping at its first error. Returns per thread
/// (operations that returned Ok, whether the next one failed), and whether the dedup worker ran.
fn execute(q: &Arc<Qcow2>, cfg: &Config, scripts: &[Vec<Op>]) -> (Vec<(usize, bool)>, bool) {
    let mut worker = if cfg.dedup == DedupMode::Background {
        q.start_dedup_worker()
    } else {
        None
    };
    let done = std::thread::scope(|sc| {
        let handles: Vec<_> = scripts
            .iter()
            .enumerate()
            .map(|(t, ops)| {
                let q = q.clone();
                let cfg = *cfg;
                sc.spawn(move || {
                    for (i, &op) in ops.iter().enumerate() {
                        if !apply(&q, &cfg, t, i, op) {
                            return (i, true);
                        }
                    }
                    (ops.len(), false)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let ran = worker.is_some();
    if let Some(w) = worker.as_mut() {
        w.stop();
    }
    (done, ran)
}

/// Abandon the engine as a killed process would: no flush, no close. (The storage fails
/// everything from now on, so the drop's close reaches nothing; unlike `mem::forget`, the
/// memory comes back.)
fn kill(st: &FaultStorage, q: Arc<Qcow2>) {
    st.crash_now();
    drop(q);
}

fn config(rng: &mut StdRng, ack: AckDurability) -> Config {
    let (cluster_bits, refcount_order, size) = match rng.random_range(0..3) {
        // 1 KiB clusters, 64-bit refcounts: a refcount block per 128 KiB, a table per 128 KiB.
        0 => (10, 6, 2 << 20),
        1 => (12, 4, 8 << 20),
        _ => (16, 4, 16 << 20),
    };
    Config {
        cluster_bits,
        refcount_order,
        size,
        lazy: rng.random_bool(0.5),
        dedup: match rng.random_range(0..4) {
            0 | 1 => DedupMode::Off,
            2 => DedupMode::Inline,
            _ => DedupMode::Background,
        },
        threads: rng.random_range(1..=3),
        ack,
    }
}

fn runs(seed: u64, n: u64, ack: AckDurability) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .filter_map(|i| {
            let cfg = config(&mut rng, ack);
            run_once(seed * 1_000_003 + i, cfg)
        })
        .collect()
}

/// Iterations per test (`PROCESS_CRASH_RUNS` overrides, for longer soaks).
fn iterations(default: u64) -> u64 {
    std::env::var("PROCESS_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn acknowledged_writes_survive_a_process_crash_at_any_point() {
    let n = iterations(300);
    let lost = runs(17, n, AckDurability::File);
    assert!(
        lost.is_empty(),
        "{} of {n} runs lost acknowledged writes; first: {}",
        lost.len(),
        lost[0]
    );
}

/// The control: with the metadata kept in memory until a flush, the same runs lose writes.
#[test]
fn without_persist_before_ack_acked_writes_are_lost() {
    let n = iterations(300);
    let lost = runs(17, n, AckDurability::Memory);
    eprintln!(
        "AckDurability::Memory: {} of {n} runs lost acknowledged writes; first: {}",
        lost.len(),
        lost.first().map_or("-", |s| s.as_str())
    );
    assert!(
        lost.len() as u64 >= n / 10,
        "the test should see the loss without persist before ack ({} of {n} runs)",
        lost.len()
    );
}

/// A write in place through an entry another writer linked and is still writing into the file
/// returns only after that write: its data would be unreachable after a crash otherwise. And no
/// direct plan (the request layer's io_uring path) is made through such an entry. (The random
/// runs above reach this interleaving too rarely to be sure of it.)
#[test]
fn a_write_in_place_waits_for_the_entry_it_goes_through() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Mutex};
    use vhost_user_qcow2::block::{BlockDevice, Direction};
    use vhost_user_qcow2::storage::FileStorage;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.qcow2");
    let f = std::fs::File::create(&path).unwrap();
    create(
        &FileStorage::new(f),
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut st = common::hooked::Hooked::new(FileStorage::new(file));
    st.direct = true;
    // Armed: the next 512-byte metadata write (a persister's piece of an L2 table) waits
    // until the test lets it go.
    let armed = Arc::new(AtomicBool::new(false));
    let (at_hook, hooked) = mpsc::channel::<()>();
    let (go, wait_go) = mpsc::channel::<()>();
    let wait_go = Mutex::new(wait_go);
    let at_hook = Mutex::new(at_hook);
    let a2 = armed.clone();
    st.on_write = Some(Box::new(move |buf, _off| {
        if buf.len() == 512 && a2.swap(false, Ordering::SeqCst) {
            at_hook.lock().unwrap().send(()).unwrap();
            wait_go.lock().unwrap().recv().unwrap();
        }
    }));
    let q = Arc::new(Qcow2::open_storage(Arc::new(st), &OpenOptions::default(), None, 0).unwrap());
    // The L2 table exists (and is in the file) before the test: the link below changes one
    // piece of it.
    q.write(0, &[IoSlice::new(&[1u8; 512])]).unwrap();
    q.flush_all().unwrap();
    let cs = q.cluster_size();
    armed.store(true, Ordering::SeqCst);
    let qa = q.clone();
    let a = std::thread::spawn(move || qa.write(5 * cs, &[IoSlice::new(&[2u8; 512])]));
    hooked.recv().unwrap();
    // A has linked cluster 5 and is writing the table piece: its entry is not in the file yet.
    assert!(
        q.plan_direct(Direction::Write, 5 * cs + 512, 512)
            .unwrap()
            .is_none(),
        "a direct plan through an entry not in the file"
    );
    let done = Arc::new(AtomicBool::new(false));
    let (qb, d2) = (q.clone(), done.clone());
    let b = std::thread::spawn(move || {
        let r = qb.write(5 * cs + 512, &[IoSlice::new(&[3u8; 512])]);
        d2.store(true, Ordering::SeqCst);
        r
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !done.load(Ordering::SeqCst),
        "the write in place returned before the entry it went through was in the file"
    );
    go.send(()).unwrap();
    a.join().unwrap().unwrap();
    b.join().unwrap().unwrap();
    assert!(done.load(Ordering::SeqCst));
    // Now the entry is in the file: the direct path is open again.
    let plan = q
        .plan_direct(Direction::Write, 5 * cs + 512, 512)
        .unwrap()
        .expect("a direct plan once the entry is in the file");
    q.end_direct(plan.seq, Direction::Write, true);
}
