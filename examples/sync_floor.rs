//! The floor under the lazy-refcount benchmark row (4 KiB allocating writes, a FLUSH after each):
//! the file-system calls each mode needs per guest write, timed with nothing else around them
//! (no daemon, no virtio, no client). The ratio printed last is the most that lazy refcounts can
//! gain over strict ones on this file system, whatever the daemon does; the daemon's own request
//! overhead (two round trips per write + flush) only brings the ratio closer to 1.
//!
//! The calls are the engine's own (see them with `strace -e pwrite64,pwritev,fdatasync` on the
//! daemon during that row), with 64 KiB clusters:
//! - lazy: the 4 KiB of data at the start of a new cluster at the end of the file, the L2 table
//!   (one cluster) written back, then one `fdatasync`;
//! - strict: the data and the refcount block (one cluster), `fdatasync` (refcounts reach the disk
//!   before the L2 entry that needs them), the L2 table, `fdatasync`.
//!
//! Both also run over a file whose tail was written with zeros beforehand (no new blocks for the
//! file system to allocate), to show how much of the sync cost is the file system's allocation.
//!
//! `cargo run --release --example sync_floor -- [--writes N] [--rounds R] [--dir DIR]
//! [--table-bytes B]` (defaults: 400 writes, median of 5 rounds, the directory /var/tmp, table
//! writes of one cluster; `--table-bytes 4096` shows what writing back only the changed page of
//! a table would give). `./run bench` runs it after the lazy-refcount rows.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "util/args.rs"]
mod args;
use args::arg;

const CLUSTER: u64 = 64 << 10;
/// Metadata sits in the first clusters (header, L1, refcount block, L2 table).
const META: u64 = 4 * CLUSTER;
const REFBLOCK: u64 = 2 * CLUSTER;
const L2: u64 = 3 * CLUSTER;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Lazy,
    Strict,
}

/// Microseconds per write of `mode`, `writes` of them, on a new file in `dir`.
fn run(dir: &Path, mode: Mode, writes: u64, prefilled: bool) -> std::io::Result<f64> {
    let path = dir.join(format!("sync_floor.{}.tmp", std::process::id()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let r = timed(&f, mode, writes, prefilled);
    let _ = std::fs::remove_file(&path);
    r
}

fn timed(f: &File, mode: Mode, writes: u64, prefilled: bool) -> std::io::Result<f64> {
    let zeros = vec![0u8; 1 << 20];
    let end = if prefilled {
        META + writes * CLUSTER
    } else {
        META
    };
    let mut off = 0;
    while off < end {
        let n = (end - off).min(zeros.len() as u64);
        f.write_all_at(&zeros[..n as usize], off)?;
        off += n;
    }
    f.sync_all()?;
    let data = vec![0x5au8; 4096];
    let table = vec![0xa5u8; arg("--table-bytes", CLUSTER) as usize];
    let t = Instant::now();
    for i in 0..writes {
        f.write_all_at(&data, META + i * CLUSTER)?;
        if mode == Mode::Strict {
            f.write_all_at(&table, REFBLOCK)?;
            f.sync_data()?;
        }
        f.write_all_at(&table, L2)?;
        f.sync_data()?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / writes as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let writes = arg("--writes", 400).max(1);
    let rounds = arg("--rounds", 5).max(1);
    let a: Vec<String> = std::env::args().collect();
    let dir = a
        .iter()
        .position(|x| x == "--dir")
        .and_then(|i| a.get(i + 1))
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    println!(
        "File-system floor of a 4 KiB allocating write + flush, {} ({writes} writes, median of {rounds})\n",
        dir.display()
    );
    println!("| file | lazy µs/write | strict µs/write | strict / lazy |");
    println!("|---|---|---|---|");
    for prefilled in [false, true] {
        let (mut lazy, mut strict) = (Vec::new(), Vec::new());
        // Interleaved, so that a drift of the machine favours neither.
        for _ in 0..rounds {
            lazy.push(run(&dir, Mode::Lazy, writes, prefilled)?);
            strict.push(run(&dir, Mode::Strict, writes, prefilled)?);
        }
        let (l, s) = (median(lazy), median(strict));
        let name = if prefilled {
            "tail written with zeros first"
        } else {
            "growing (as the benchmark row)"
        };
        println!("| {name} | {l:.0} | {s:.0} | {:.2}x |", s / l);
    }
    Ok(())
}
