//! `vhost-user-qcow2 serve`: serve an image as a vhost-user-blk device on a UNIX socket.

use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::control;
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::vhost::{self, ServeConfig};

use super::handover::{probe, Current, ImageHandover, Session};
use super::open::OpenArgs;
pub use super::open::{AckDurabilityArg, DedupArg, OnOffAuto};
use super::ready::{Notify, Ready};
use std::sync::Mutex;
use vhost_user_qcow2::active::ActiveDevice;
use vhost_user_qcow2::control::SwitchControl;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The image to serve (qcow2 or raw).
    #[arg(long)]
    pub image: PathBuf,
    /// The UNIX socket to listen on (a stale socket file is replaced, a live one refused).
    #[arg(long)]
    pub socket: PathBuf,
    /// Request queues offered, 1..=256 (QEMU asks for one per vCPU); they are served by at
    /// most one worker thread per host CPU.
    #[arg(long, default_value_t = vhost_user_qcow2::vhost::DEFAULT_NUM_QUEUES)]
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
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub aio_threads: u16,
    /// Microseconds a queue's worker thread keeps looking for new requests and completions
    /// after its last one before it sleeps (busy polling, as QEMU's iothread poll-max-ns). It
    /// takes about 12 us off each request at queue depth 1 on a virtio disk, for up to a
    /// whole CPU per busy worker; an idle worker sleeps. 0: never polls.
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub poll_us: u32,
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
    /// Most RAM for cached L2 tables (QEMU's l2-cache-size). The default, 16M, maps 128 GiB of
    /// a disk with 64 KiB clusters or 8 GiB with 4 KiB clusters; it is never more than the
    /// whole disk needs, and at least 16 tables. Random I/O over more than fits reads a table
    /// (without the metadata lock) for most requests.
    #[arg(long, value_name = "SIZE", value_parser = parse_cache_size)]
    pub l2_cache_size: Option<u64>,
    /// Metadata overlap checks before every write: none, constant, cached or all.
    #[arg(long, default_value = "all", value_parser = clap::value_parser!(OverlapMode))]
    pub overlap_check: OverlapMode,
    /// Permission bits of the socket file, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// A QMP control socket (mode 0600) for query-status, query-stats, query-image,
    /// query-dedup, dedup-pause/-resume/-set-mode, block_resize and quit; a stale socket file
    /// is replaced.
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
    /// Start without opening the image (no lock taken, only its header read for the size):
    /// the destination of a live migration. QMP `blockdev-set-active {"active": true}` on the
    /// control socket (required) opens it; requests wait for that, at most 60 s.
    #[arg(long, requires = "control")]
    pub inactive: bool,
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

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    // A pidfile naming a running process stops us before the image is even opened.
    if let Some(p) = &args.pidfile {
        super::ready::refuse_if_live(p)?;
    }
    let open_args = OpenArgs {
        path: args.image.clone(),
        read_only: args.read_only,
        lazy: args.lazy_refcounts,
        overlap_check: args.overlap_check,
        dedup: args.dedup,
        dedup_cache_bytes: args.dedup_cache_size,
        l2_cache_bytes: args.l2_cache_size,
        direct: args.cache.direct(),
        ack: args.ack_durability,
    };
    // The engine's events (BLOCK_IMAGE_CORRUPTED) go through `events`; the daemon forwards
    // whatever arrives on the receiver to the control clients.
    let (events, rx) = control::channel().context("creating the event queue")?;
    let session = if args.inactive {
        None
    } else {
        Some(Session::open(&open_args, Some(&events))?)
    };
    let (capacity, granularity) = match &session {
        Some(s) => (s.image.device.capacity(), s.image.granularity),
        None => {
            let (c, g) = probe(&open_args)?;
            log::info!(
                "inactive: {} announced as {c} bytes; waiting for blockdev-set-active",
                args.image.display()
            );
            (c, g)
        }
    };
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
    cfg.poll = std::time::Duration::from_micros(u64::from(args.poll_us));
    cfg.discard_granularity = granularity;
    cfg.socket_mode = args.socket_mode;
    cfg.handle_signals = true;
    cfg.stats_interval = std::time::Duration::from_secs(args.stats_interval);
    // The lazy-refcount timer works on whichever engine is open.
    let current: Current = Arc::new(Mutex::new(
        session.as_ref().and_then(|s| s.image.qcow2.clone()),
    ));
    let tick_engine = current.clone();
    cfg.tick_interval = std::time::Duration::from_secs(args.refcount_flush_interval);
    cfg.tick = Some(Box::new(move || {
        let q = tick_engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(q) = q else { return };
        // A flush the metadata cache asked for and no request ran yet (reads that go straight
        // to the file do not run it).
        q.flush_if_wanted();
        if q.needs_refcount_timer() {
            if let Err(e) = q.flush_refcounts() {
                log::error!("writing held-back refcounts failed: {e}");
            }
        }
    }));
    // With a control socket the image can be handed over (blockdev-set-active): the device
    // and the image commands go through switches. Without one, nothing can switch them.
    let mut keep_session: Option<Session> = None;
    let device: Arc<dyn BlockDevice> = match (&args.control, session) {
        (Some(path), session) => {
            let dev = Arc::new(ActiveDevice::new(capacity, args.read_only, None));
            let mut h = ImageHandover {
                args: open_args,
                device: dev.clone(),
                control: SwitchControl::new(None),
                current: current.clone(),
                events: Some(events.clone()),
                session: None,
            };
            if let Some(s) = session {
                h.install(s).map_err(anyhow::Error::msg)?;
            }
            cfg.image = Some(Box::new(h.control.clone()));
            cfg.handover = Some(Box::new(h));
            cfg.control = Some(path.clone());
            cfg.events = Some(rx);
            dev
        }
        (None, Some(s)) => {
            cfg.image = Some(s.control(&args.image));
            let dev = s.image.device.clone();
            keep_session = Some(s);
            dev
        }
        (None, None) => anyhow::bail!("--inactive needs --control"),
    };
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
    // `serve` flushes and closes the device before it returns; the session (worker, locks)
    // goes after that.
    let r = vhost::serve(device, cfg);
    drop(keep_session);
    let p = ready.map(Ready::finish).transpose();
    r?;
    p?;
    Ok(ExitCode::SUCCESS)
}
