//! What persist before ack costs (docs/design.md, "Acknowledged writes outlive the process"),
//! and what a restart after a crash costs. The engine alone, no virtio.
//!
//! `cargo run --release --example ack_cost -- writes [--rounds 3] [--count 40000] [--dir D]
//!   [--cluster-size 65536|4096] [--threads 1|32]` (default: both)
//!   4 KiB writes, each into a cluster never written before (a fresh 8 GiB image; the clusters
//!   in a pseudo-random order), from 1 and from 32 threads (synchronous calls: the daemon runs
//!   allocating writes on its pool threads), with `AckDurability::File` and `::Memory`
//!   interleaved, per cluster size and lazy refcounts: IOPS and CPU time per write (median of
//!   the rounds, and the spread).
//!
//! `cargo run --release --example ack_cost -- restart [--clusters 1048576]
//!   [--cluster-size 8192] [--dedup 0|1] [--lazy 0|1] [--dir D]` (default: both)
//!   fills an image with unique data (1 MiB writes; the strict runs flush every 256 MiB, as a
//!   guest would now and then, the last one 128 MiB before the end), abandons the engine as a
//!   SIGKILL would (DIRTY set), and times the read-write open that repairs it: lazy refcounts
//!   on and off, dedup off and inline.

use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

#[path = "util/args.rs"]
mod args;
#[path = "util/fill.rs"]
mod fill;
use args::arg;

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn new_image(path: &Path, size: u64, cs: u64, lazy: bool, dedup: bool) {
    let _ = std::fs::remove_file(path);
    let o = CreateOptions {
        size,
        cluster_bits: cs.trailing_zeros(),
        lazy_refcounts: lazy,
        dedup,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(path).unwrap()), &o).unwrap();
}

#[derive(Clone, Copy, Debug)]
struct WriteLoad {
    cs: u64,
    lazy: bool,
    threads: u64,
}

/// (IOPS, IOPS counting the flush that ends the run, CPU µs per write (flush included),
/// persist batches per write).
fn run_writes(path: &Path, l: WriteLoad, ack: AckDurability, count: u64) -> [f64; 4] {
    const SIZE: u64 = 8 << 30;
    new_image(path, SIZE, l.cs, l.lazy, false);
    let opts = OpenOptions {
        ack_durability: ack,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_with(path, &opts).unwrap());
    let clusters = SIZE / l.cs;
    // A prime step: every request goes to a cluster of its own, in a scattered order.
    let step = 1_000_003 % clusters;
    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let hs: Vec<_> = (0..l.threads)
        .map(|_| {
            let (q, next) = (q.clone(), next.clone());
            std::thread::spawn(move || {
                let buf = vec![0xa5u8; 4096];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let off = (i * step) % clusters * l.cs;
                    q.write_vectored(off, &[IoSlice::new(&buf)]).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    // What memory mode left for later: the tables (and refcounts) a guest flush writes.
    q.flush_all().unwrap();
    let with_flush = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let st = q.stats();
    q.close().unwrap();
    drop(q);
    let _ = std::fs::remove_file(path);
    [
        count as f64 / secs,
        count as f64 / with_flush,
        cpu * 1e6 / count as f64,
        st.persist_batches as f64 / count as f64,
    ]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> f64 {
    let (lo, hi) = (v[0], v[v.len() - 1]);
    (hi - lo) / v[v.len() / 2] * 100.0
}

fn writes(dir: &Path) {
    let rounds = arg("--rounds", 3);
    let count = arg("--count", 40_000);
    let path = dir.join("ack-cost.qcow2");
    println!(
        "4 KiB writes into fresh clusters of an 8 GiB image, {count} per run, {rounds} rounds \
         (median, spread)"
    );
    println!(
        "{:<34} {:>26} {:>26} {:>22} {:>8}",
        "load", "IOPS file / memory", "incl. final flush", "CPU µs/write f / m", "batches"
    );
    // 0: both.
    let (only_cs, only_threads) = (arg("--cluster-size", 0), arg("--threads", 0));
    for cs in [65536u64, 4096] {
        for lazy in [false, true] {
            for threads in [1u64, 32] {
                if (only_cs != 0 && cs != only_cs) || (only_threads != 0 && threads != only_threads)
                {
                    continue;
                }
                let l = WriteLoad { cs, lazy, threads };
                // [file, memory] x [IOPS, IOPS with the flush, CPU]
                let mut v: [[Vec<f64>; 3]; 2] = Default::default();
                let mut b = vec![];
                for _ in 0..rounds {
                    for (k, ack) in [AckDurability::File, AckDurability::Memory]
                        .into_iter()
                        .enumerate()
                    {
                        let r = run_writes(&path, l, ack, count);
                        for j in 0..3 {
                            v[k][j].push(r[j]);
                        }
                        if k == 0 {
                            b.push(r[3]);
                        }
                    }
                }
                let m: Vec<Vec<f64>> = v
                    .iter_mut()
                    .map(|x| x.iter_mut().map(|y| median(y)).collect())
                    .collect();
                let pct = |a: f64, b: f64| (a / b - 1.0) * 100.0;
                println!(
                    "{:<34} {:>7.0} / {:>7.0} ({:+4.0}%) {:>7.0} / {:>7.0} ({:+4.0}%) \
                     {:>5.1} / {:>5.1} ({:+4.0}%) {:>6.2}  spread {:.0}%/{:.0}%",
                    format!(
                        "{} KiB clusters, lazy {}, {} threads",
                        cs >> 10,
                        if lazy { "on" } else { "off" },
                        threads
                    ),
                    m[0][0],
                    m[1][0],
                    pct(m[0][0], m[1][0]),
                    m[0][1],
                    m[1][1],
                    pct(m[0][1], m[1][1]),
                    m[0][2],
                    m[1][2],
                    pct(m[0][2], m[1][2]),
                    median(&mut b),
                    spread(&v[0][0]),
                    spread(&v[1][0]),
                );
            }
        }
    }
}

fn restart(dir: &Path) {
    let n = arg("--clusters", 1 << 20);
    let cs = arg("--cluster-size", 8192);
    let path = dir.join("restart.qcow2");
    println!(
        "restart after a kill: {n} clusters of {cs} B written (unique data), {} GiB virtual",
        (n * cs) >> 30
    );
    // 2: both.
    let (only_dedup, only_lazy) = (arg("--dedup", 2), arg("--lazy", 2));
    for dedup in [false, true] {
        for lazy in [false, true] {
            if (only_dedup < 2 && dedup != (only_dedup == 1))
                || (only_lazy < 2 && lazy != (only_lazy == 1))
            {
                continue;
            }
            new_image(&path, n * cs, cs, lazy, dedup);
            let opts = OpenOptions {
                lazy_refcounts: Some(lazy),
                dedup_mode: Some(if dedup {
                    DedupMode::Inline
                } else {
                    DedupMode::Off
                }),
                ..Default::default()
            };
            let t = Instant::now();
            let q = Qcow2::open_with(&path, &opts).unwrap();
            fill::write_unique(&q, n, cs, |gc| {
                // (Not at the end: the kill comes 128 MiB after the last flush.)
                if !lazy && (gc * cs) % (256 << 20) == 128 << 20 {
                    q.flush()?;
                }
                Ok(())
            })
            .unwrap();
            let fill = t.elapsed();
            // The process dies: no flush, no close.
            std::mem::forget(q);
            let mut hdr = [0u8; 80];
            std::os::unix::fs::FileExt::read_exact_at(
                &std::fs::File::open(&path).unwrap(),
                &mut hdr,
                0,
            )
            .unwrap();
            let dirty = hdr[79] & 1 != 0;
            // Where the time goes: the checker's walk alone (read only), then the open.
            let f = std::fs::File::open(&path).unwrap();
            let t = Instant::now();
            let r = check(&FileStorage::new(f), &CheckOptions::default()).unwrap();
            let walk = t.elapsed();
            let t = Instant::now();
            let q = Qcow2::open_with(&path, &opts).unwrap();
            let open = t.elapsed();
            let index_ms = q.dedup_open_report().map_or(0, |r| r.millis);
            q.close().unwrap();
            drop(q);
            println!(
                "dedup {:<3} lazy {:<3}: filled in {fill:.1?}; dirty {dirty}, {} corruptions \
                 {} leaks before repair; check walk {walk:.2?}; read-write open {open:.2?} \
                 (of which dedup index rebuild {index_ms} ms)",
                if dedup { "on" } else { "off" },
                if lazy { "on" } else { "off" },
                r.corruptions,
                r.leaks
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = a
        .iter()
        .position(|x| x == "--dir")
        .and_then(|i| a.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    match a.get(1).map(String::as_str) {
        Some("restart") => restart(&dir),
        _ => writes(&dir),
    }
}
