//! The daemon's main thread: one epoll loop over the signals (signalfd), the listening socket,
//! the end of the current connection, a stop event and a periodic timer.
//!
//! One VMM connection is served at a time, each by a fresh `VhostUserDaemon` (with its own
//! worker threads) on the same listening socket, so a VMM can disconnect and come back.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::backend::BlkBackend;
use super::{ServeConfig, StopHandle, VhostError};
use crate::block::BlockDevice;
use crate::virtio::{BlkConfig, DeviceCtx};

const TOKEN_LISTEN: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_TIMER: u64 = 4;
const TOKEN_DONE: u64 = 5;

/// A connection being served: the thread that waits for its end, and a way to cut it.
struct Connection {
    waiter: JoinHandle<Result<(), String>>,
    shutdown: Option<vhost_user_backend::ShutdownHandle>,
}

/// Serve `device` on `config.socket` until SIGINT/SIGTERM (when `config.handle_signals`) or the
/// stop handle fires. Then: stop taking requests, let in-flight ones finish, flush, close the
/// device, remove the socket.
pub fn serve(device: Arc<dyn BlockDevice>, config: ServeConfig) -> Result<(), VhostError> {
    validate(&config)?;
    // Block the signals before any thread exists, so every thread inherits the mask and the
    // signals arrive only through the signalfd.
    let sigfd = if config.handle_signals {
        Some(signal_fd()?)
    } else {
        None
    };

    let limits = BlkConfig::new(
        device.capacity(),
        config.num_queues,
        config.queue_size,
        config.discard_granularity,
        config.writeback,
    );
    let ctx = Arc::new(DeviceCtx::new(device.clone(), limits, &config.serial));
    let mut listener = bind_socket(&config.socket, config.socket_mode)?;
    let socket = SocketFile(config.socket.clone());

    let ep = Epoll::new()?;
    ep.add(listener.as_raw_fd(), TOKEN_LISTEN)?;
    if let Some(fd) = &sigfd {
        ep.add(fd.as_raw_fd(), TOKEN_SIGNAL)?;
    }
    let stop = match config.stop.clone() {
        Some(s) => s,
        None => StopHandle::new().map_err(io_err("creating the stop event"))?,
    };
    ep.add(stop.fd.as_raw_fd(), TOKEN_STOP)?;
    let done = EventFd::new(EFD_NONBLOCK).map_err(io_err("creating an eventfd"))?;
    ep.add(done.as_raw_fd(), TOKEN_DONE)?;
    let mut timer = None;
    if let Some(tick) = config.tick.as_ref() {
        let sys = |what| {
            move |e: vmm_sys_util::errno::Error| VhostError::Io {
                what,
                source: e.into(),
            }
        };
        let mut t = TimerFd::new().map_err(sys("creating the timer"))?;
        t.reset(config.tick_interval, Some(config.tick_interval))
            .map_err(sys("arming the timer"))?;
        ep.add(t.as_raw_fd(), TOKEN_TIMER)?;
        timer = Some((t, tick));
    }
    info!(
        "serving on {} ({} queues)",
        config.socket.display(),
        config.num_queues
    );

    let mut conn: Option<Connection> = None;
    let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 8];
    'main: loop {
        let n = match epoll::wait(ep.fd(), -1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(VhostError::Io {
                    what: "waiting for events",
                    source: e,
                })
            }
        };
        for ev in events.iter().take(n) {
            let token = ev.data; // a copy: Event is packed
            match token {
                TOKEN_LISTEN if conn.is_none() => {
                    match start_connection(&ctx, config.queue_size, &mut listener, &done) {
                        Ok(c) => {
                            info!("VMM connected");
                            ep.del(listener.as_raw_fd())?;
                            conn = Some(c);
                        }
                        Err(e) => warn!("cannot start serving a connection: {e}"),
                    }
                }
                TOKEN_DONE => {
                    let _ = done.read();
                    if let Some(c) = conn.take() {
                        end_connection(c);
                    }
                    if let Err(e) = device.flush() {
                        warn!("flush after disconnect failed: {e}");
                    }
                    ep.add(listener.as_raw_fd(), TOKEN_LISTEN)?;
                    info!("waiting for the next connection");
                }
                TOKEN_SIGNAL => {
                    if let Some(fd) = &sigfd {
                        match read_signal(fd) {
                            Some(libc::SIGHUP) => info!("SIGHUP ignored"),
                            Some(sig) => {
                                info!("signal {sig}: shutting down");
                                break 'main;
                            }
                            None => {}
                        }
                    }
                }
                TOKEN_STOP => {
                    info!("stop requested: shutting down");
                    break 'main;
                }
                TOKEN_TIMER => {
                    if let Some((t, tick)) = timer.as_mut() {
                        let _ = t.wait();
                        tick();
                    }
                }
                _ => {}
            }
        }
    }

    if let Some(c) = conn.take() {
        if let Some(h) = &c.shutdown {
            h.shutdown();
        }
        end_connection(c);
    }
    drop(listener);
    drop(socket);
    device.flush().map_err(VhostError::Close)?;
    device.close().map_err(VhostError::Close)?;
    info!("image closed cleanly");
    Ok(())
}

fn validate(c: &ServeConfig) -> Result<(), VhostError> {
    if c.num_queues == 0 || c.num_queues > 64 {
        return Err(VhostError::Config(format!(
            "num-queues must be 1..=64, not {}",
            c.num_queues
        )));
    }
    if !c.queue_size.is_power_of_two() || c.queue_size < 4 {
        return Err(VhostError::Config(format!(
            "queue-size must be a power of two >= 4 (at most 32768), not {}",
            c.queue_size
        )));
    }
    if c.tick.is_some() && c.tick_interval.is_zero() {
        return Err(VhostError::Config(
            "the tick interval must not be zero".into(),
        ));
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> VhostError {
    move |source| VhostError::Io { what, source }
}

fn start_connection(
    ctx: &Arc<DeviceCtx>,
    queue_size: u16,
    listener: &mut Listener,
    done: &EventFd,
) -> Result<Connection, VhostError> {
    // Each connection starts from the configured cache mode, as after a device reset.
    ctx.writeback.store(
        ctx.limits.writeback != 0,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let backend = Arc::new(BlkBackend::new(
        ctx.clone(),
        mem.clone(),
        usize::from(queue_size),
    ));
    let mut daemon = VhostUserDaemon::new("vhost-user-qcow2".into(), backend, mem)
        .map_err(|e| VhostError::Daemon(e.to_string()))?;
    daemon
        .start(listener)
        .map_err(|e| VhostError::Daemon(e.to_string()))?;
    let shutdown = daemon.shutdown_handle();
    let done = done.try_clone().map_err(io_err("cloning an eventfd"))?;
    let waiter = thread::Builder::new()
        .name("vhost-conn".into())
        .spawn(move || {
            let r = daemon.wait().map_err(|e| e.to_string());
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            // Dropping the daemon joins the queue workers: their requests are finished.
            drop(daemon);
            let _ = done.write(1);
            r
        })
        .map_err(io_err("spawning the connection thread"))?;
    Ok(Connection { waiter, shutdown })
}

fn end_connection(c: Connection) {
    match c.waiter.join() {
        Ok(Ok(())) => info!("VMM disconnected"),
        Ok(Err(e)) => info!("VMM connection ended: {e}"),
        Err(_) => warn!("the connection thread panicked"),
    }
}

/// Bind the listening socket: a live socket is refused, a stale one replaced, anything else
/// at the path left alone. The socket gets `mode`.
fn bind_socket(path: &Path, mode: u32) -> Result<Listener, VhostError> {
    if let Ok(md) = fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(VhostError::Config(format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            )));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(VhostError::SocketInUse { path: path.into() }),
            Err(e) => {
                debug!("replacing stale socket {} ({e})", path.display());
                fs::remove_file(path).map_err(|source| VhostError::Bind {
                    path: path.into(),
                    source,
                })?;
            }
        }
    }
    let l = UnixListener::bind(path).map_err(|source| VhostError::Bind {
        path: path.into(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|source| {
        VhostError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(Listener::from(l))
}

/// Removes the socket file when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn signal_fd() -> Result<OwnedFd, VhostError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write to it and to
    // this thread's signal mask; signalfd returns a new descriptor or -1.
    let fd = unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(VhostError::Io {
                what: "blocking signals",
                source: io::Error::last_os_error(),
            });
        }
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if fd < 0 {
        return Err(VhostError::Io {
            what: "creating a signalfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `size` bytes into `info`, which is `size` bytes long.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n as usize == size {
        Some(info.ssi_signo as i32)
    } else {
        None
    }
}

/// An owned epoll descriptor (the `epoll` crate hands out raw ones).
struct Epoll(RawFd);

impl Epoll {
    fn new() -> Result<Self, VhostError> {
        epoll::create(true)
            .map(Epoll)
            .map_err(io_err("creating an epoll instance"))
    }
    fn fd(&self) -> RawFd {
        self.0
    }
    fn add(&self, fd: RawFd, token: u64) -> Result<(), VhostError> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(self.0, epoll::ControlOptions::EPOLL_CTL_ADD, fd, ev)
            .map_err(io_err("registering with epoll"))
    }
    fn del(&self, fd: RawFd) -> Result<(), VhostError> {
        let ev = epoll::Event::new(epoll::Events::empty(), 0);
        epoll::ctl(self.0, epoll::ControlOptions::EPOLL_CTL_DEL, fd, ev)
            .map_err(io_err("unregistering from epoll"))
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        let _ = epoll::close(self.0);
    }
}

/// Keeps the tick interval type in one place for callers.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
