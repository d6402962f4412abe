//! Benchmark of the qcow2 engine alone (no virtio), side by side with `qemu-img bench` on the same
//! kind of image with the same access pattern: request i goes to offset (i * step) mod size, as
//! qemu-img bench does; a step of 7919 blocks visits the image in a pseudo-random order.
//! Ours runs the requests from `depth` threads (synchronous calls); qemu-img bench keeps `depth`
//! requests in flight with its AIO. Both go through the host page cache (cache=writeback).
//!
//! Usage: cargo run --release --example engine_bench -- [--rounds 3] [--size-mb 256] [--dir DIR]

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};

#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    write: bool,
    fresh: bool,
    bs: u64,
    step_blocks: u64,
    depth: u64,
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed (./run test installs it)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn prepare(path: &Path, size: u64, fill: bool) {
    let _ = std::fs::remove_file(path);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    if fill {
        // Allocate everything with one sequential pass.
        qemu_img(&[
            "bench",
            "-q",
            "-w",
            "-c",
            &(size >> 20).to_string(),
            "-s",
            "1M",
            "-S",
            "1M",
            path.to_str().unwrap(),
        ]);
    }
}

fn count(l: &Load, size: u64) -> u64 {
    if l.bs >= 1 << 20 {
        size / l.bs
    } else {
        (size / l.bs).min(40_000)
    }
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn run_ours(path: &Path, l: Load, size: u64) -> f64 {
    run_ours_with(path, l, size, OverlapMode::All).0
}

/// IOPS and CPU microseconds per request.
fn run_ours_with(path: &Path, l: Load, size: u64, mode: OverlapMode) -> (f64, f64) {
    let opts = OpenOptions {
        read_only: !l.write,
        overlap_check: mode,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_with(path, &opts).expect("open"));
    let cpu0 = cpu_seconds();
    let n = count(&l, size);
    let step = l.step_blocks * l.bs;
    let start = Instant::now();
    let hs: Vec<_> = (0..l.depth)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0xa5u8; l.bs as usize];
                let mut i = t;
                while i < n {
                    let off = (i * step) % size;
                    if l.write {
                        q.write_vectored(off, &[IoSlice::new(&buf)]).expect("write");
                    } else {
                        q.read_vectored(off, &mut [IoSliceMut::new(&mut buf)])
                            .expect("read");
                    }
                    i += l.depth;
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("bench thread");
    }
    // Like qemu-img bench, the clock stops before the image is closed (flushed).
    let iops = n as f64 / start.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds() - cpu0) * 1e6 / n as f64;
    q.close().expect("close");
    (iops, cpu_us)
}

fn run_qemu(path: &Path, l: Load, size: u64) -> f64 {
    let n = count(&l, size);
    let step = (l.step_blocks * l.bs).to_string();
    let (cnt, bs, depth) = (n.to_string(), l.bs.to_string(), l.depth.to_string());
    let mut args = vec!["bench", "-c", &cnt, "-d", &depth, "-s", &bs, "-S", &step];
    if l.write {
        args.push("-w");
    }
    args.push(path.to_str().unwrap());
    let out = qemu_img(&args);
    let secs: f64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .expect("qemu-img bench output");
    n as f64 / secs
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: &str| -> String {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let rounds: usize = get("--rounds", "3").parse().expect("--rounds");
    let size: u64 = get("--size-mb", "256").parse::<u64>().expect("--size-mb") << 20;
    let dir = PathBuf::from(get("--dir", &std::env::temp_dir().to_string_lossy()));
    let img = dir.join(format!("engine-bench-{}.qcow2", std::process::id()));
    let loads = [
        Load {
            name: "4K rand write alloc QD1",
            write: true,
            fresh: true,
            bs: 4096,
            step_blocks: 7919,
            depth: 1,
        },
        Load {
            name: "4K rand write overwrite QD1",
            write: true,
            fresh: false,
            bs: 4096,
            step_blocks: 7919,
            depth: 1,
        },
        Load {
            name: "4K rand read QD1",
            write: false,
            fresh: false,
            bs: 4096,
            step_blocks: 7919,
            depth: 1,
        },
        Load {
            name: "4K rand read QD4",
            write: false,
            fresh: false,
            bs: 4096,
            step_blocks: 7919,
            depth: 4,
        },
        Load {
            name: "4K rand write overwrite QD4",
            write: true,
            fresh: false,
            bs: 4096,
            step_blocks: 7919,
            depth: 4,
        },
        Load {
            name: "1M seq write alloc QD1",
            write: true,
            fresh: true,
            bs: 1 << 20,
            step_blocks: 1,
            depth: 1,
        },
    ];
    println!("engine alone vs qemu-img bench, {} MiB image, 64 KiB clusters, {rounds} rounds interleaved", size >> 20);
    println!(
        "{:<30} {:>12} {:>12} {:>12} {:>7}",
        "workload", "ours IOPS", "qemu IOPS", "ours MB/s", "ratio"
    );
    for l in loads {
        let (mut ours, mut peer) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            prepare(&img, size, !l.fresh);
            ours.push(run_ours(&img, l, size));
            prepare(&img, size, !l.fresh);
            peer.push(run_qemu(&img, l, size));
        }
        let spread = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
            (hi - lo) / hi.max(1.0) * 100.0
        };
        let (so, sp) = (spread(&ours), spread(&peer));
        let (mo, mp) = (median(&mut ours), median(&mut peer));
        println!(
            "{:<30} {:>12.0} {:>12.0} {:>12.1} {:>6.2}x   (spread ours {so:.0}%, qemu {sp:.0}%)",
            l.name,
            mo,
            mp,
            mo * l.bs as f64 / 1e6,
            mo / mp
        );
    }
    overlap_table(&img, size, rounds);
    let _ = std::fs::remove_file(&img);
}

/// Overlap checks none vs all: 4 KiB random allocating writes and overwrites from 4 threads, and
/// the open time of an image with 1M allocated clusters (4 KiB clusters, 2048 L2 tables).
fn overlap_table(img: &Path, size: u64, rounds: usize) {
    println!();
    println!("overlap checks, engine alone, 4 threads, {rounds} rounds interleaved (median)");
    println!(
        "{:<30} {:>12} {:>12} {:>10} {:>10} {:>7}",
        "workload", "none IOPS", "all IOPS", "none us", "all us", "ratio"
    );
    for (name, fresh) in [
        ("4K rand write alloc", true),
        ("4K rand write overwrite", false),
    ] {
        let l = Load {
            name,
            write: true,
            fresh,
            bs: 4096,
            step_blocks: 7919,
            depth: 4,
        };
        let (mut a, mut b, mut ca, mut cb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            prepare(img, size, !fresh);
            let (i, c) = run_ours_with(img, l, size, OverlapMode::None);
            a.push(i);
            ca.push(c);
            prepare(img, size, !fresh);
            let (i, c) = run_ours_with(img, l, size, OverlapMode::All);
            b.push(i);
            cb.push(c);
        }
        let (ma, mb) = (median(&mut a), median(&mut b));
        println!(
            "{:<30} {:>12.0} {:>12.0} {:>10.2} {:>10.2} {:>6.3}x",
            name,
            ma,
            mb,
            median(&mut ca),
            median(&mut cb),
            mb / ma
        );
    }
    let _ = std::fs::remove_file(img);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,preallocation=metadata",
        img.to_str().unwrap(),
        "4G",
    ]);
    let mut t = [Vec::new(), Vec::new()];
    for _ in 0..5 {
        for (i, mode) in [OverlapMode::None, OverlapMode::All]
            .into_iter()
            .enumerate()
        {
            let t0 = Instant::now();
            let q = Qcow2::open_with(
                img,
                &OpenOptions {
                    overlap_check: mode,
                    ..Default::default()
                },
            )
            .expect("open");
            t[i].push(t0.elapsed().as_secs_f64() * 1e3);
            drop(q);
        }
    }
    let (n, a) = (median(&mut t[0]), median(&mut t[1]));
    println!("open, 1M allocated clusters (2048 L2 tables): {n:.2} ms without the map, {a:.2} ms with it");
}
