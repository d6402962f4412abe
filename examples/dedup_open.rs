//! Open time of a dedup image with many unique clusters: the persistent index loaded after a
//! clean close, against a rebuild that hashes all data (what a crash or a writable QEMU open
//! costs). Also the RAM of the hint index per unique cluster.
//!
//! `cargo run --release --example dedup_open -- [--clusters N] [--cluster-size BYTES] [--dir D]`
//! (defaults: 1M clusters of 4 KiB, a temporary directory; needs N x cluster size of disk).

use std::io::IoSlice;
use std::time::Instant;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

#[path = "util/args.rs"]
mod args;
use args::arg;

fn main() -> anyhow::Result<()> {
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
    // Unique clusters, 1 MiB per request: the cluster number in every 8 bytes.
    let per = (1 << 20) / cs;
    let mut buf = vec![0u8; (per * cs) as usize];
    let mut gc = 0;
    while gc < n {
        let k = per.min(n - gc);
        for i in 0..k {
            let c = (gc + i) as usize;
            let cl = &mut buf[i as usize * cs as usize..(i + 1) as usize * cs as usize];
            for w in cl.chunks_exact_mut(8) {
                w.copy_from_slice(&(c as u64 + 1).to_le_bytes());
            }
        }
        q.write_vectored(gc * cs, &[IoSlice::new(&buf[..(k * cs) as usize])])?;
        gc += k;
    }
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
    let f = std::fs::OpenOptions::new().write(true).open(&img)?;
    std::os::unix::fs::FileExt::write_at(&f, &0u64.to_be_bytes(), 88)?;
    drop(f);
    let t = Instant::now();
    let q = Qcow2::open_with(&img, &opts)?;
    let rebuild = t.elapsed();
    let rep = q.dedup_open_report().unwrap_or_default();
    q.close()?;
    println!(
        "open, index rebuilt: {rebuild:.2?} ({} clusters hashed; page cache warm)",
        rep.clusters_hashed
    );
    Ok(())
}
