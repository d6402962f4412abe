//! Opening an image for `serve`: the format by its magic, QEMU's image locks first, the engine
//! options from the command line.

use anyhow::Context;
use clap::ValueEnum;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use super::progress::Progress;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{AckDurability, OpenOptions, Qcow2};
use vhost_user_qcow2::raw::RawDisk;
use vhost_user_qcow2::storage::lock::ImageLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOffAuto {
    On,
    Off,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AckDurabilityArg {
    File,
    Memory,
}

/// What opening the image needs, kept to open it again.
#[derive(Clone, Debug)]
pub struct OpenArgs {
    pub path: PathBuf,
    pub read_only: bool,
    pub lazy: OnOffAuto,
    pub overlap_check: OverlapMode,
    pub dedup: DedupArg,
    pub dedup_cache_bytes: Option<u64>,
    pub l2_cache_bytes: Option<u64>,
    pub direct: bool,
    pub ack: AckDurabilityArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DedupArg {
    On,
    Inline,
    Background,
    Off,
    Auto,
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An opened image: the device, and the QEMU-compatible locks held for as long as it is served.
pub struct OpenImage {
    pub device: Arc<dyn BlockDevice>,
    /// Allocation unit for discard hints (the cluster size for qcow2).
    pub granularity: u32,
    /// The qcow2 engine, when the image is qcow2 (for its periodic jobs).
    pub qcow2: Option<Arc<Qcow2>>,
    pub _lock: ImageLock,
}

/// Lock and open an image: qcow2 by its magic, anything else as raw.
pub fn open_device(a: &OpenArgs) -> anyhow::Result<OpenImage> {
    let (path, read_only) = (a.path.as_path(), a.read_only);
    let (lazy, overlap_check, dedup) = (a.lazy, a.overlap_check, a.dedup);
    let (dedup_cache_bytes, direct, ack) = (a.dedup_cache_bytes, a.direct, a.ack);
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot open image {}", path.display()))?;
    // Lock before opening for real, so that we never touch an image QEMU is writing.
    let lock = ImageLock::acquire(path, read_only)?;
    if n == 4 && magic == QCOW2_MAGIC {
        let (repair, hook) = Progress::repair_hook();
        let opts = OpenOptions {
            read_only,
            lazy_refcounts: match lazy {
                OnOffAuto::On => Some(true),
                OnOffAuto::Off => Some(false),
                OnOffAuto::Auto => None,
            },
            overlap_check,
            dedup_mode: match dedup {
                DedupArg::On | DedupArg::Inline => Some(DedupMode::Inline),
                DedupArg::Background => Some(DedupMode::Background),
                DedupArg::Off => Some(DedupMode::Off),
                DedupArg::Auto => None,
            },
            dedup_cache_bytes,
            l2_cache_bytes: a.l2_cache_bytes,
            // Hashed by the dedup worker (every caller starts it) while the image is served:
            // the first request is served at once.
            dedup_rebuild_in_background: true,
            direct,
            ack_durability: match ack {
                AckDurabilityArg::File => AckDurability::File,
                AckDurabilityArg::Memory => AckDurability::Memory,
            },
            // A dirty image is repaired first: a bar on a terminal, log lines for a daemon.
            repair_progress: Some(hook),
            ..Default::default()
        };
        let opened = Qcow2::open_with(path, &opts);
        repair.finish();
        let q = Arc::new(opened.with_context(|| format!("cannot open image {}", path.display()))?);
        log::info!(
            "serving qcow2 image {} ({} bytes, {} byte clusters, lazy refcounts {}, dedup {}, \
             ack durability {})",
            path.display(),
            q.capacity(),
            q.cluster_size(),
            if q.lazy_refcounts() { "on" } else { "off" },
            format!("{:?}", q.dedup_mode()).to_lowercase(),
            format!("{ack:?}").to_lowercase()
        );
        return Ok(OpenImage {
            granularity: u32::try_from(q.cluster_size()).unwrap_or(u32::MAX),
            device: q.clone(),
            qcow2: Some(q),
            _lock: lock,
        });
    }
    let raw = RawDisk::open_with(path, read_only, direct)
        .with_context(|| format!("cannot open image {}", path.display()))?;
    Ok(OpenImage {
        device: Arc::new(raw),
        granularity: 4096,
        qcow2: None,
        _lock: lock,
    })
}
