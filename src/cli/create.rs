//! `vhost-user-qcow2 create`: write a new qcow2 image.

use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{self, CreateOptions};
use vhost_user_qcow2::storage::lock::ImageLock;
use vhost_user_qcow2::storage::FileStorage;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Path of the new image.
    pub image: PathBuf,
    /// Virtual size, e.g. 8G (defaults to the backing file's size).
    #[arg(long, value_parser = super::size::parse_size)]
    pub size: Option<u64>,
    /// Cluster size, a power of two from 512 to 2M.
    #[arg(long, default_value = "64K", value_parser = super::size::parse_size)]
    pub cluster_size: u64,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    #[arg(long, default_value_t = 16)]
    pub refcount_bits: u32,
    /// Set the lazy-refcounts compatible feature bit.
    #[arg(long)]
    pub lazy_refcounts: bool,
    /// Image compatibility level: 1.1 (qcow2 v3) or 0.10 (v2).
    #[arg(long, default_value = "1.1")]
    pub compat: String,
    /// Backing file (stored as given; relative names are relative to the image's folder).
    #[arg(long)]
    pub backing: Option<String>,
    /// Format of the backing file.
    #[arg(long, value_parser = ["qcow2", "raw"])]
    pub backing_format: Option<String>,
    /// Record inline deduplication as the image's setting (`serve` then dedups by default).
    #[arg(long)]
    pub dedup: bool,
    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: CreateArgs) -> anyhow::Result<ExitCode> {
    if !a.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&a.cluster_size) {
        bail!("--cluster-size must be a power of two from 512 to 2M");
    }
    if !a.refcount_bits.is_power_of_two() || a.refcount_bits > 64 {
        bail!("--refcount-bits must be 1, 2, 4, 8, 16, 32 or 64");
    }
    let version = match a.compat.as_str() {
        "1.1" | "v3" => 3,
        "0.10" | "v2" => 2,
        c => bail!("--compat {c:?}: use 1.1 or 0.10"),
    };
    if a.backing_format.is_some() && a.backing.is_none() {
        bail!("--backing-format needs --backing");
    }
    let dir = a.image.parent().map(|p| p.to_path_buf());
    let backing = match &a.backing {
        Some(b) => {
            let path = qcow2::engine::resolve_backing(b, dir.as_deref());
            let fmt = match &a.backing_format {
                Some(f) => f.clone(),
                None => {
                    let mut magic = [0u8; 4];
                    use std::io::Read;
                    std::fs::File::open(&path)
                        .and_then(|mut f| f.read_exact(&mut magic))
                        .with_context(|| format!("reading backing file {}", path.display()))?;
                    if magic == *b"QFI\xfb" { "qcow2" } else { "raw" }.to_string()
                }
            };
            Some((b.clone(), fmt, path))
        }
        None => None,
    };
    let size = match (a.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, fmt, path))) => backing_size(path, fmt)?,
        (None, None) => bail!("--size is required without --backing"),
    };
    if a.image.exists() && !a.force {
        bail!(
            "{} already exists (use --force to overwrite it)",
            a.image.display()
        );
    }
    let o = CreateOptions {
        size,
        cluster_bits: a.cluster_size.trailing_zeros(),
        refcount_order: a.refcount_bits.trailing_zeros(),
        lazy_refcounts: a.lazy_refcounts,
        version,
        backing: backing.map(|(n, f, _)| (n, f)),
        dedup: a.dedup,
    };
    // --force must not truncate an image someone serves.
    let _lock = match a.image.exists() {
        true => Some(ImageLock::acquire(&a.image, false)?),
        false => None,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.image)
        .with_context(|| format!("creating {}", a.image.display()))?;
    qcow2::create(&FileStorage::new(file), &o)
        .with_context(|| format!("creating {}", a.image.display()))?;
    println!(
        "Formatting '{}', fmt=qcow2 cluster_size={} compression_type=zlib size={} lazy_refcounts={} refcount_bits={}",
        a.image.display(),
        a.cluster_size,
        size,
        if a.lazy_refcounts { "on" } else { "off" },
        a.refcount_bits
    );
    Ok(ExitCode::SUCCESS)
}

fn backing_size(path: &std::path::Path, fmt: &str) -> anyhow::Result<u64> {
    if fmt == "raw" {
        return Ok(std::fs::metadata(path)?.len());
    }
    let img = qcow2::Qcow2::open(path, true)
        .with_context(|| format!("opening backing file {}", path.display()))?;
    Ok(img.capacity())
}
