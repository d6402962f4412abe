//! How to serve (`ServeConfig`), how to stop a running daemon (`StopHandle`), and the
//! transport's errors.

use crate::aio::AioMode;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::block::BlockError;
use crate::control::{EventReceiver, ImageControl};

/// Queues `serve` offers by default: QEMU's vhost-user-blk asks for one per vCPU, and fails
/// to start a VM with more vCPUs than the backend offers queues.
pub const DEFAULT_NUM_QUEUES: u16 = 64;

/// The largest queue count: vhost-user carries a ring's index in 8 bits (SET_VRING_KICK,
/// CALL, ERR), so a queue past 255 would take the eventfds of queue `n % 256`.
pub const MAX_NUM_QUEUES: u16 = 256;

/// The default period of `ServeConfig::tick`.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);

/// Errors of the transport and the daemon loop.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("socket {path} is in use by a running server; refusing to replace it")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("vhost-user: {0}")]
    Daemon(String),
    #[error("closing the image failed: {0}")]
    Close(BlockError),
}

/// Opening and handing over the image while the daemon runs (QMP `blockdev-set-active`, for
/// a live migration between two daemons on one image file). Called on the main thread.
pub trait Handover: Send {
    fn is_active(&self) -> bool;
    /// Open the image (taking its locks; a dirty image is repaired first) and serve it.
    fn activate(&mut self) -> Result<(), String>;
    /// Finish the requests in progress, write all metadata, close the image and release its
    /// locks; requests arriving meanwhile wait for the next activation.
    fn deactivate(&mut self) -> Result<(), String>;
}

/// A handle that makes a running [`serve`] shut down cleanly (as SIGTERM does).
#[derive(Clone)]
pub struct StopHandle {
    pub(super) fd: Arc<EventFd>,
}

impl StopHandle {
    pub fn new() -> io::Result<Self> {
        Ok(StopHandle {
            fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }
    /// Ask the daemon to stop; safe to call more than once.
    pub fn stop(&self) {
        let _ = self.fd.write(1);
    }
}

impl AsRawFd for StopHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A periodic job run on the daemon's main thread (lazy refcount flushes, statistics).
pub type Tick = Box<dyn Fn() + Send>;

/// How to serve.
pub struct ServeConfig {
    /// The UNIX socket to listen on.
    pub socket: PathBuf,
    /// Number of request queues (one worker thread each).
    pub num_queues: u16,
    /// Largest queue size offered.
    pub queue_size: u16,
    /// GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    /// Writeback cache at start (the driver may change it through CONFIG_WCE).
    pub writeback: bool,
    /// The engine's allocation unit in bytes (discard alignment and optimal I/O size hint).
    pub discard_granularity: u32,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Take SIGINT/SIGTERM/SIGHUP through a signalfd (the CLI); off for in-process tests.
    pub handle_signals: bool,
    /// Period of `tick`.
    pub tick_interval: Duration,
    /// Periodic job on the main thread, if any.
    pub tick: Option<Tick>,
    /// An extra way to stop the daemon.
    pub stop: Option<StopHandle>,
    /// The QMP control socket to listen on (mode 0600), if any.
    pub control: Option<PathBuf>,
    /// What the control socket and the statistics line report about the image.
    pub image: Option<Box<dyn ImageControl>>,
    /// Events to forward to the control socket's clients.
    pub events: Option<EventReceiver>,
    /// Period of the one-line I/O summary at info level; zero for none.
    pub stats_interval: Duration,
    /// How data I/O runs: io_uring (falls back to the pool) or the thread pool alone.
    pub aio: AioMode,
    /// Threads of the pool that runs the blocking requests (allocating writes, flushes,
    /// discards; everything under `AioMode::Threads`).
    pub pool_threads: usize,
    /// How long a queue worker keeps looking for new events without sleeping after its last
    /// one (busy polling); zero: it sleeps at once.
    pub poll: Duration,
    /// Handing the image over at run time (QMP `blockdev-set-active`); None: always active.
    pub handover: Option<Box<dyn Handover>>,
}

/// Default size of the blocking-request pool: enough for two queues at depth 32 on cold data.
pub const DEFAULT_POOL_THREADS: usize = 64;

impl ServeConfig {
    /// Defaults: 1 queue of 256, writeback on, 64 KiB granularity, mode 0600, no signals.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ServeConfig {
            socket: socket.into(),
            num_queues: 1,
            queue_size: 256,
            serial: String::new(),
            writeback: true,
            discard_granularity: 65536,
            socket_mode: 0o600,
            handle_signals: false,
            tick_interval: DEFAULT_TICK,
            tick: None,
            stop: None,
            control: None,
            image: None,
            events: None,
            stats_interval: Duration::ZERO,
            aio: AioMode::IoUring,
            pool_threads: DEFAULT_POOL_THREADS,
            poll: Duration::ZERO,
            handover: None,
        }
    }
}
