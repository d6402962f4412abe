//! `vhost-user-qcow2 serve`: serve an image as a vhost-user-blk device on a UNIX socket.

use anyhow::Context;
use clap::{Args, ValueEnum};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::control::{self, ImageControl, PlainControl, Qcow2Control};
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{AckDurability, OpenOptions, Qcow2};
use vhost_user_qcow2::raw::RawDisk;
use vhost_user_qcow2::storage::lock::ImageLock;
use vhost_user_qcow2::vhost::{self, ServeConfig};

use super::ready::{Notify, Ready};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The image to serve (qcow2 or raw).
    #[arg(long)]
    pub image: PathBuf,
    /// The UNIX socket to listen on (a stale socket file is replaced, a live one refused).
    #[arg(long)]
    pub socket: PathBuf,
    /// Number of request queues; each gets its own worker thread.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size offered (a power of two).
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Serve read-only (the guest sees a read-only disk).
    #[arg(long)]
    pub read_only: bool,
    /// Serial number reported to the guest (GET_ID, at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Host cache mode, as QEMU's `-drive cache=`: writeback (host page cache, guest write
    /// cache on), none (O_DIRECT, guest write cache on), writethrough (page cache, every
    /// write durable before it completes), directsync (O_DIRECT and writethrough).
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,
    /// The guest's write cache at start, overriding what `--cache` implies: on (flush needed)
    /// or off (every write is durable). The guest may change it (CONFIG_WCE).
    #[arg(long, value_enum)]
    pub writeback: Option<OnOff>,
    /// How data I/O runs: io_uring (one ring per queue for reads and in-place writes, a thread
    /// pool for the rest; falls back to the pool alone, with a warning, where io_uring cannot
    /// be set up) or threads (the pool for everything).
    #[arg(long, value_enum, default_value_t = AioArg::IoUring)]
    pub aio: AioArg,
    /// Threads of the pool that runs requests which may block (allocating writes, flushes,
    /// discards, cache misses).
    #[arg(long, default_value_t = vhost::DEFAULT_POOL_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub aio_threads: u16,
    /// Lazy refcounts: on, off, or auto (follow the image's lazy-refcounts bit).
    #[arg(long, value_enum, default_value_t = OnOffAuto::Auto)]
    pub lazy_refcounts: OnOffAuto,
    /// Seconds between writes of refcounts held back by lazy refcounts (and by file ack
    /// durability, whose DIRTY window this ends).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub refcount_flush_interval: u64,
    /// What a completed write has made of the metadata it depends on (its L2 entries). file:
    /// written into the image file before the completion is posted (no sync), so a crash or
    /// kill of the daemon loses no write the guest saw complete (the host keeps what was
    /// written); the image is marked dirty meanwhile and repaired on the next read-write open.
    /// memory: kept in the daemon until the guest flushes (faster allocating writes; a killed
    /// daemon loses unflushed writes the guest saw complete, as QEMU does).
    #[arg(long, value_enum, default_value_t = AckDurabilityArg::File)]
    pub ack_durability: AckDurabilityArg,
    /// Deduplication: inline (or on), background, off, or auto (what the image records).
    /// Background: writes complete as plain writes and a worker merges duplicates while the
    /// guest does not write.
    #[arg(long, value_enum, default_value_t = DedupArg::Auto)]
    pub dedup: DedupArg,
    /// With dedup: most RAM for cached dedup records (32 bytes per guest cluster, kept in the
    /// image). The default, 64M, holds all of them for an 8 GiB disk with 4 KiB clusters or a
    /// 128 GiB one with 64 KiB clusters; random writes over more than fits cost an index-cluster
    /// read and write each.
    #[arg(long, value_name = "SIZE", value_parser = parse_cache_size)]
    pub dedup_cache_size: Option<u64>,
    /// Metadata overlap checks before every write: none, constant, cached or all.
    #[arg(long, default_value = "all", value_parser = clap::value_parser!(OverlapMode))]
    pub overlap_check: OverlapMode,
    /// Permission bits of the socket file, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// A QMP control socket (mode 0600) for query-status, query-stats, query-image,
    /// query-dedup, dedup-pause/-resume/-set-mode and quit; a stale socket file is replaced.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds between one-line I/O statistics summaries in the log (info level); 0: none.
    #[arg(long, default_value_t = 0, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub stats_interval: u64,
    /// Write the daemon's process id to this file once the socket listens (refused if the file
    /// names a running process; removed at exit).
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
}

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DedupArg {
    On,
    Inline,
    Background,
    Off,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    Writeback,
    None,
    Writethrough,
    Directsync,
}

impl CacheMode {
    /// O_DIRECT on the image file.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// The guest's write cache on.
    pub fn writeback(self) -> bool {
        matches!(self, CacheMode::Writeback | CacheMode::None)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AioArg {
    #[value(name = "io_uring")]
    IoUring,
    Threads,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

fn parse_cache_size(s: &str) -> Result<u64, String> {
    let n = super::size::parse_size(s)?;
    if (1 << 20..=1 << 40).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{s:?}: give 1M to 1T"))
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("not an octal file mode: {s:?}"))
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

/// Lock and open the image of `args`: qcow2 by its magic, anything else as raw.
pub fn open_device(args: &ServeArgs) -> anyhow::Result<OpenImage> {
    let (path, read_only) = (args.image.as_path(), args.read_only);
    let (lazy, overlap_check, dedup) = (args.lazy_refcounts, args.overlap_check, args.dedup);
    let (dedup_cache_bytes, direct) = (args.dedup_cache_size, args.cache.direct());
    let ack = args.ack_durability;
    let mut magic = [0u8; 4];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot open image {}", path.display()))?;
    // Lock before opening for real, so that we never touch an image QEMU is writing.
    let lock = ImageLock::acquire(path, read_only)?;
    if n == 4 && magic == QCOW2_MAGIC {
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
            direct,
            ack_durability: match ack {
                AckDurabilityArg::File => AckDurability::File,
                AckDurabilityArg::Memory => AckDurability::Memory,
            },
            ..Default::default()
        };
        let q = Arc::new(
            Qcow2::open_with(path, &opts)
                .with_context(|| format!("cannot open image {}", path.display()))?,
        );
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

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // A pidfile naming a running process stops us before the image is even opened.
    if let Some(p) = &args.pidfile {
        super::ready::refuse_if_live(p)?;
    }
    let image = open_device(&args)?;
    let serial = args.serial.clone().unwrap_or_else(|| {
        // (The device cuts the serial to its 20 bytes; cutting a String here could split a
        // character.)
        let stem = args
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned());
        stem.unwrap_or_default()
    });
    let mut cfg = ServeConfig::new(&args.socket);
    cfg.num_queues = args.num_queues;
    cfg.queue_size = args.queue_size;
    cfg.serial = serial;
    cfg.writeback = match args.writeback {
        Some(w) => w == OnOff::On,
        None => args.cache.writeback(),
    };
    cfg.aio = match args.aio {
        AioArg::IoUring => vhost::AioMode::IoUring,
        AioArg::Threads => vhost::AioMode::Threads,
    };
    cfg.pool_threads = usize::from(args.aio_threads);
    cfg.discard_granularity = image.granularity;
    cfg.socket_mode = args.socket_mode;
    cfg.handle_signals = true;
    if let Some(q) = image.qcow2.clone().filter(|q| q.needs_refcount_timer()) {
        cfg.tick_interval = std::time::Duration::from_secs(args.refcount_flush_interval);
        cfg.tick = Some(Box::new(move || {
            if let Err(e) = q.flush_refcounts() {
                log::error!("writing held-back refcounts failed: {e}");
            }
        }));
    }
    cfg.stats_interval = std::time::Duration::from_secs(args.stats_interval);
    let control: Box<dyn ImageControl> = match image.qcow2.clone() {
        Some(engine) => Box::new(Qcow2Control {
            engine,
            path: args.image.clone(),
        }),
        None => Box::new(PlainControl {
            path: args.image.clone(),
            format: "raw",
            capacity: image.device.capacity(),
        }),
    };
    cfg.image = Some(control);
    // The engine's events (BLOCK_IMAGE_CORRUPTED) go through `events`; the daemon forwards
    // whatever arrives on the receiver to the control clients.
    let (events, rx) = control::channel().context("creating the event queue")?;
    if let Some(q) = &image.qcow2 {
        q.set_corruption_listener(Box::new(move |msg| {
            events.image_corrupted("qcow2", msg, None, None, true);
        }));
    }
    if let Some(path) = &args.control {
        cfg.control = Some(path.clone());
        cfg.events = Some(rx);
    }
    // The background dedup worker (it sleeps unless there are clusters pending). `serve`
    // closes the device first: close stops the worker before its next cluster and waits for
    // the one in hand; dropping the handle then joins the thread.
    let worker = image.qcow2.as_ref().and_then(|q| q.start_dedup_worker());
    // The pidfile and systemd's READY=1 come from a watcher once the daemon's socket file
    // appears: the daemon publishes that file only when it is listening.
    let stop = vhost::StopHandle::new().context("creating the stop handle")?;
    let ready = Ready::start(
        args.pidfile.clone(),
        Notify::from_env(),
        args.socket.clone(),
        stop.clone(),
    )?;
    if ready.is_some() {
        cfg.stop = Some(stop);
    }
    let r = vhost::serve(image.device.clone(), cfg);
    drop(worker);
    let p = ready.map(Ready::finish).transpose();
    r?;
    p?;
    Ok(ExitCode::SUCCESS)
}
