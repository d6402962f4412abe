//! `vhost-user-qcow2 dedup IMG`: deduplicate an existing, closed image offline.

use anyhow::Context;
use clap::Args;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};
use vhost_user_qcow2::storage::lock::ImageLock;

#[derive(Args, Debug)]
pub struct DedupArgs {
    /// The image (qcow2 v3, not in use by anything else).
    pub image: PathBuf,
}

pub fn run(a: DedupArgs) -> anyhow::Result<ExitCode> {
    let _lock = ImageLock::acquire(&a.image, false)?;
    let t0 = Instant::now();
    let q = Qcow2::open_with(
        &a.image,
        &OpenOptions {
            dedup: Some(true),
            dedup_index_at_open: Some(false),
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open {}", a.image.display()))?;
    let cs = q.cluster_size();
    let tty = std::io::stderr().is_terminal();
    let mut last = Instant::now();
    let mut progress = |done: u64, total: u64, saved: u64| {
        if !tty || (last.elapsed().as_millis() < 200 && done < total) {
            return;
        }
        last = Instant::now();
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 * cs as f64 / secs / 1e6;
        let eta = if done > 0 {
            secs * (total - done) as f64 / done as f64
        } else {
            0.0
        };
        eprint!(
            "\r{done}/{total} clusters  {rate:.0} MB/s  saved {:.1} MiB  ETA {eta:.0} s   ",
            saved as f64 / (1 << 20) as f64
        );
        let _ = std::io::stderr().flush();
    };
    let st = q.dedup_existing(&mut progress)?;
    q.close()?;
    if tty {
        eprintln!();
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}: {} clusters linked to identical ones, {} zero clusters, {:.1} MiB saved, {:.1} s ({:.0} MB/s)",
        a.image.display(),
        st.clusters_deduplicated,
        st.zero_clusters,
        st.bytes_saved as f64 / (1 << 20) as f64,
        secs,
        vhost_user_qcow2::block::BlockDevice::capacity(&q) as f64 / 1e6 / secs.max(1e-3)
    );
    Ok(ExitCode::SUCCESS)
}
