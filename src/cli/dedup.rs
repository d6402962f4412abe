//! `vhost-user-qcow2 dedup IMG`: deduplicate an existing, closed image offline.

use super::progress::Progress;
use super::size::format_size;
use anyhow::Context;
use clap::Args;
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
    // A dirty image is repaired first, with its own progress.
    let (repair, hook) = Progress::repair_hook();
    let q = Qcow2::open_with(
        &a.image,
        &OpenOptions {
            dedup: Some(true),
            dedup_index_at_open: Some(false),
            repair_progress: Some(hook),
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open {}", a.image.display()))?;
    repair.finish();
    let bar = Progress::new("dedup", "clusters");
    let mut progress = |done: u64, total: u64, saved: u64| {
        let saved = format!("{} saved", format_size(saved));
        bar.set_message(saved.clone());
        bar.update_with(done, total, &saved);
    };
    let st = q.dedup_existing(&mut progress)?;
    bar.finish();
    q.close()?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}: {} clusters linked to identical ones, {} zero clusters, {} saved, {:.1} s ({:.0} MB/s)",
        a.image.display(),
        st.clusters_deduplicated,
        st.zero_clusters,
        format_size(st.bytes_saved),
        secs,
        vhost_user_qcow2::block::BlockDevice::capacity(&q) as f64 / 1e6 / secs.max(1e-3)
    );
    Ok(ExitCode::SUCCESS)
}
