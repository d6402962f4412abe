//! Open time of a dedup image with many unique clusters: the persistent index loaded after a
//! clean close, against a rebuild that hashes all data (what a crash or a writable QEMU open
//! costs), once in the open (the library default) and once in the background as `serve` does
//! it (when the open returns, when the rebuild is done, and the latency of guest reads and
//! writes meanwhile). Also the RAM of the hint index per unique cluster.
//!
//! `cargo run --release --example dedup_open -- [--clusters N] [--cluster-size BYTES] [--dir D]`
//! (`RUST_LOG=info` shows the engine's log lines about the index)
//! (defaults: 1M clusters of 4 KiB, a temporary directory; needs N x cluster size of disk).

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::time::Instant;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

#[path = "util/args.rs"]
mod args;
#[path = "util/fill.rs"]
mod fill;
use args::arg;

fn main() -> anyhow::Result<()> {
    // RUST_LOG=info shows the engine's lines about the index.
    let _ = env_logger::try_init();
    let n = arg("--clusters", 1 << 20);
    let cs = arg("--cluster-size", 4096);
    let a: Vec<String> = std::env::args().collect();
    let tmp = tempfile::tempdir()?;
    let dir = a
        .iter()
        .position(|x| x == "--dir")
        .and_then(|i| a.get(i + 1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let img = dir.join("dedup-open.qcow2");
    let o = CreateOptions {
        size: n * cs,
        cluster_bits: cs.trailing_zeros(),
        dedup: true,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(&img)?), &o)?;
    let opts = OpenOptions {
        dedup: Some(true),
        ..Default::default()
    };
    let t = Instant::now();
    let q = Qcow2::open_with(&img, &opts)?;
    // Unique clusters, 1 MiB per request.
    fill::write_unique(&q, n, cs, |_| Ok(()))?;
    let st = q.dedup_stats().unwrap_or_default();
    q.close()?;
    drop(q);
    println!(
        "wrote {n} unique clusters of {cs} B in {:.2?} ({} unique)",
        t.elapsed(),
        st.clusters_unique
    );
    let t = Instant::now();
    let q = Qcow2::open_with(&img, &opts)?;
    let load = t.elapsed();
    let rep = q.dedup_open_report().unwrap_or_default();
    let st = q.dedup_stats().unwrap_or_default();
    q.close()?;
    drop(q);
    println!(
        "open, index loaded: {load:.2?} ({} hints, {} clusters hashed); index RAM {} B = {:.2} B per unique cluster",
        rep.hints,
        rep.clusters_hashed,
        st.index_ram_bytes,
        st.index_ram_bytes as f64 / n as f64
    );
    // Clear the autoclear bit as a crash (or a writable QEMU open) leaves it: a rebuild.
    let crash = || -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(&img)?;
        std::os::unix::fs::FileExt::write_at(&f, &0u64.to_be_bytes(), 88)?;
        Ok(())
    };
    crash()?;
    let t = Instant::now();
    let q = Qcow2::open_with(&img, &opts)?;
    let rebuild = t.elapsed();
    let rep = q.dedup_open_report().unwrap_or_default();
    q.close()?;
    drop(q);
    println!(
        "open, index rebuilt in the open: {rebuild:.2?} ({} clusters hashed; page cache warm)",
        rep.clusters_hashed
    );

    // As `serve` opens: the data is hashed by the dedup worker while the image is served.
    crash()?;
    let bg = OpenOptions {
        dedup_rebuild_in_background: true,
        ..opts.clone()
    };
    let t = Instant::now();
    let q = Arc::new(Qcow2::open_with(&img, &bg)?);
    let opened = t.elapsed();
    let worker = q.start_dedup_worker();
    // Served meanwhile: one 4 KiB read and one whole-cluster write of new data at a time, at
    // random places, until the rebuild is done.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut pair = |i: u64| -> anyhow::Result<std::time::Duration> {
        let mut rd = [0u8; 4096];
        let mut wr = vec![0u8; cs as usize];
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let gc = rng % n;
        let t1 = Instant::now();
        q.read_vectored(gc * cs, &mut [IoSliceMut::new(&mut rd)])?;
        wr[..8].copy_from_slice(&rng.to_le_bytes());
        wr[8..16].copy_from_slice(&i.to_le_bytes());
        q.write_vectored(((gc + n / 2) % n) * cs, &[IoSlice::new(&wr)])?;
        Ok(t1.elapsed())
    };
    let mut during = Vec::new();
    let mut first = None;
    while q.dedup_rebuilding() {
        during.push(pair(during.len() as u64)?);
        first.get_or_insert_with(|| t.elapsed());
    }
    let done = t.elapsed();
    let rep = q.dedup_open_report().unwrap_or_default();
    // The same load once the rebuild is done, for comparison.
    let mut after = Vec::new();
    for i in 0..during.len() as u64 {
        after.push(pair(1 << 40 | i)?);
    }
    drop(worker);
    q.close()?;
    println!(
        "open, index rebuilt in the background: open returned in {opened:.2?}, first read and \
         write done at {:.2?}, rebuild done at {done:.2?} ({} clusters hashed)",
        first.unwrap_or_default(),
        rep.clusters_hashed
    );
    for (what, mut lat) in [("during the rebuild", during), ("after it", after)] {
        if lat.is_empty() {
            continue;
        }
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        println!(
            "  {what}: {} pairs of a 4 KiB read and a {cs} B write of new data: median {:.2?}, \
             p99 {:.2?}, max {:.2?}",
            lat.len(),
            pct(0.5),
            pct(0.99),
            lat[lat.len() - 1]
        );
    }
    // And with nothing else to do.
    crash()?;
    let t = Instant::now();
    let q = Arc::new(Qcow2::open_with(&img, &bg)?);
    let opened = t.elapsed();
    let worker = q.start_dedup_worker();
    while q.dedup_rebuilding() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let done = t.elapsed();
    let rep = q.dedup_open_report().unwrap_or_default();
    drop(worker);
    q.close()?;
    println!(
        "open, index rebuilt in the background, no guest I/O: open returned in {opened:.2?}, \
         rebuild done at {done:.2?} ({} clusters hashed)",
        rep.clusters_hashed
    );
    Ok(())
}
