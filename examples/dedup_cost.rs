//! CPU cost of a one-cluster guest write in each dedup mode, for the engine alone on memory storage:
//! no virtio, no kernel page cache, one thread. The daemon benchmark (`./run bench`) swings with
//! the page cache of this VM; this one isolates what dedup itself adds per write.
//!
//! `cargo run --release --example dedup_cost -- [--writes N] [--rounds R] [--cluster-bits B]`
//! (defaults: 65536 writes of one 4 KiB cluster each, best of 3 rounds; `--cluster-bits 16` for
//! 64 KiB clusters, with 16384 writes by default). Background mode runs
//! without its worker: the cost is what a guest write pays, the merge comes later.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Instant;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{MemStorage, Storage};

#[path = "util/args.rs"]
mod args;
use args::arg;

/// Content of write `i`: a duplicate of one of 16 blocks for `pct`% of the writes, else unique.
fn content(i: u64, pct: u64, buf: &mut [u8]) {
    let dup = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 100 < pct;
    let seed = if dup { 1 + i % 16 } else { (1 << 40) + i };
    for (j, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ j as u64).to_le_bytes());
    }
}

/// Nanoseconds per write, best of `rounds`.
fn run(mode: DedupMode, pct: u64, writes: u64, rounds: u64, bits: u32) -> anyhow::Result<f64> {
    let cs = 1u64 << bits;
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let o = CreateOptions {
            size: writes * cs,
            cluster_bits: bits,
            dedup: mode != DedupMode::Off,
            ..Default::default()
        };
        create(st.as_ref(), &o)?;
        let opts = OpenOptions {
            dedup_mode: Some(mode),
            ..Default::default()
        };
        let q = Qcow2::open_storage(st, &opts, None, 0)?;
        let mut buf = vec![0u8; cs as usize];
        let t = Instant::now();
        for i in 0..writes {
            content(i, pct, &mut buf);
            q.write_vectored(i * cs, &[IoSlice::new(&buf)])?;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / writes as f64);
        q.close()?;
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let bits = match arg("--cluster-bits", 12) {
        b @ 9..=21 => b as u32,
        b => anyhow::bail!("--cluster-bits {b}: qcow2 cluster sizes are 2^9 to 2^21"),
    };
    let cs = 1u64 << bits;
    let writes = arg("--writes", (1 << 28) >> bits);
    let rounds = arg("--rounds", 3);
    let kib = cs / 1024;
    // The cost of making the content, to subtract: it is the client's, not the engine's.
    let mut buf = vec![0u8; cs as usize];
    let t = Instant::now();
    for i in 0..writes {
        content(i, 50, &mut buf);
    }
    let gen = t.elapsed().as_nanos() as f64 / writes as f64;
    let t = Instant::now();
    for i in 0..writes {
        buf[0] = i as u8;
        std::hint::black_box(vhost_user_qcow2::qcow2::hashindex::hash_cluster(&buf));
    }
    let sha = t.elapsed().as_nanos() as f64 / writes as f64;
    println!(
        "{kib} KiB writes on {kib} KiB clusters, memory storage, one thread, best of {rounds}"
    );
    println!("SHA-256 of {kib} KiB: {sha:.0} ns; making the content (subtracted): {gen:.0} ns\n");
    println!("| duplicates | off ns/write | inline ns/write | background ns/write |");
    println!("|---|---|---|---|");
    for pct in [0, 50, 100] {
        let off = run(DedupMode::Off, pct, writes, rounds, bits)? - gen;
        let inline = run(DedupMode::Inline, pct, writes, rounds, bits)? - gen;
        let bg = run(DedupMode::Background, pct, writes, rounds, bits)? - gen;
        println!("| {pct}% | {off:.0} | {inline:.0} | {bg:.0} |");
    }
    let n = writes.min(16384);
    println!(
        "\nInline, overwriting {n} clusters that share one content with unique data: {:.0} ns/write",
        overwrite_shared(n, bits)? - gen
    );
    Ok(())
}

/// Nanoseconds per write of unique data over clusters that all share one content (each
/// overwrite drops one reference of a widely shared cluster).
fn overwrite_shared(n: u64, bits: u32) -> anyhow::Result<f64> {
    let cs = 1u64 << bits;
    let st: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let o = CreateOptions {
        size: n * cs,
        cluster_bits: bits,
        dedup: true,
        ..Default::default()
    };
    create(st.as_ref(), &o)?;
    let opts = OpenOptions {
        dedup_mode: Some(DedupMode::Inline),
        ..Default::default()
    };
    let q = Qcow2::open_storage(st, &opts, None, 0)?;
    let same = vec![7u8; cs as usize];
    for i in 0..n {
        q.write_vectored(i * cs, &[IoSlice::new(&same)])?;
    }
    let mut buf = vec![0u8; cs as usize];
    let t = Instant::now();
    for i in 0..n {
        content(i, 0, &mut buf);
        q.write_vectored(i * cs, &[IoSlice::new(&buf)])?;
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    q.close()?;
    Ok(ns)
}
