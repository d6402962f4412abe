//! The daemon's main thread: one epoll loop over the signals (signalfd), the listening socket,
//! the end of the current connection, a stop event, a periodic timer, and the control socket
//! with its clients and event queue.
//!
//! One VMM connection is served at a time, each by a fresh `Handler` (with its own
//! worker threads) on the same listening socket, so a VMM can disconnect and come back.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{info, warn};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::backend::BlkBackend;
use super::backend_channel::{BackendChannel, Notice};
use super::config::{Handover, ServeConfig, StopHandle, Tick, VhostError};
use super::control::ControlServer;
use super::handler::Handler;
use super::sys::{bind_socket, read_signal, signal_fd, Epoll, SocketFile};
use super::worker::Worker;
use crate::aio::{AioMode, Pool};
use crate::block::BlockDevice;
use crate::control::{DaemonView, Event, ImageControl, PlainControl, StatusInfo};
use crate::virtio::{BlkConfig, DeviceCtx, QueueSnapshot};

const TOKEN_LISTEN: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_TIMER: u64 = 4;
const TOKEN_DONE: u64 = 5;

/// A connection being served: the thread that waits for its end, and a way to cut it.
struct Connection {
    waiter: JoinHandle<Result<(), String>>,
    /// The connection's socket, to cut it.
    shutdown: Option<UnixStream>,
    /// The backend channel, for config-change notices.
    channel: Arc<BackendChannel>,
}

/// The daemon's answers to the control socket.
struct View<'a> {
    ctx: &'a DeviceCtx,
    connected: bool,
    quit: bool,
    handover: Option<&'a mut Box<dyn Handover>>,
    /// The connected frontend's backend channel.
    channel: Option<Arc<BackendChannel>>,
}

impl DaemonView for View<'_> {
    fn status(&self) -> StatusInfo {
        StatusInfo {
            status: "running".into(),
            running: true,
            singlestep: false,
            vmm_connected: self.connected,
            read_only: self.ctx.dev.read_only(),
            active: self.handover.as_ref().is_none_or(|h| h.is_active()),
        }
    }
    fn queue_stats(&self) -> Vec<QueueSnapshot> {
        queue_stats(self.ctx)
    }
    fn quit(&mut self) {
        self.quit = true;
    }
    fn set_active(&mut self, active: bool) -> Result<(), String> {
        let Some(h) = self.handover.as_mut() else {
            return Err("this daemon was not started to hand its image over".into());
        };
        if h.is_active() == active {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let r = if active { h.activate() } else { h.deactivate() };
        match &r {
            Ok(()) => info!(
                "image {} in {:.2?}",
                if active {
                    "active (opened)"
                } else {
                    "inactive (handed over)"
                },
                t0.elapsed()
            ),
            Err(e) => warn!("blockdev-set-active {active} failed: {e}"),
        }
        r
    }
    fn resize(&mut self, size: u64) -> Result<(), String> {
        let old = self.ctx.dev.capacity();
        let r = self.ctx.dev.resize(size).map_err(|e| e.to_string());
        // (A failure after the growth, such as the dedup index area's, still grew the disk:
        // the frontend is told then too.)
        let now = self.ctx.dev.capacity();
        if now == old {
            return r;
        }
        info!("block_resize: {old} -> {now} bytes");
        // GET_CONFIG reads the capacity from the device, so the new size is what a frontend
        // reads from now on; a connected one is told to read it.
        let Some(ch) = self.channel.as_ref() else {
            return r;
        };
        match ch.config_changed() {
            Ok(Notice::Sent) => info!("the frontend was told the config changed"),
            Ok(Notice::NoChannel) => warn!(
                "the frontend did not negotiate BACKEND_REQ: the guest sees the new size only \
                 when it reads the config again (after a reconnect or a reboot)"
            ),
            Err(e) => warn!("telling the frontend the config changed failed: {e}"),
        }
        r
    }
}

/// The queues a frontend has started (of the many offered), each with its number.
fn queue_stats(ctx: &DeviceCtx) -> Vec<QueueSnapshot> {
    ctx.stats
        .iter()
        .enumerate()
        .filter(|(_, q)| q.used())
        .map(|(i, q)| q.snapshot(u16::try_from(i).unwrap_or(u16::MAX)))
        .collect()
}

/// The periodic jobs on the timer: the caller's tick and the statistics line, each every so
/// many timer periods.
struct Periodic<'a> {
    timer: TimerFd,
    expirations: u64,
    tick: Option<(&'a Tick, u64)>,
    stats_every: u64,
    last: StatsLine,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl<'a> Periodic<'a> {
    fn new(config: &'a ServeConfig, ep: &Epoll) -> Result<Option<Self>, VhostError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let tick_ms = config.tick.as_ref().map(|_| ms(config.tick_interval));
        let stats_ms = (!config.stats_interval.is_zero()).then(|| ms(config.stats_interval));
        let period = match (tick_ms, stats_ms) {
            (None, None) => return Ok(None),
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => gcd(a, b),
        };
        let sys = |what| {
            move |e: vmm_sys_util::errno::Error| VhostError::Io {
                what,
                source: e.into(),
            }
        };
        let mut timer = TimerFd::new().map_err(sys("creating the timer"))?;
        let d = Duration::from_millis(period);
        timer.reset(d, Some(d)).map_err(sys("arming the timer"))?;
        ep.add(timer.as_raw_fd(), TOKEN_TIMER)?;
        Ok(Some(Periodic {
            timer,
            expirations: 0,
            tick: config.tick.as_ref().zip(tick_ms.map(|t| t / period)),
            stats_every: stats_ms.map_or(0, |s| s / period),
            last: StatsLine::default(),
        }))
    }

    fn fire(&mut self, ctx: &DeviceCtx, image: Option<&dyn ImageControl>) {
        let n = match self.timer.wait() {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        let before = self.expirations;
        self.expirations += n;
        let due = |every: u64| every > 0 && self.expirations / every > before / every;
        if let Some((tick, every)) = self.tick {
            if due(every) {
                tick();
            }
        }
        if due(self.stats_every) {
            self.last.log(ctx, image);
        }
    }
}

/// The one-line I/O summary at info level: what happened since the previous line.
#[derive(Default)]
struct StatsLine {
    io: QueueSnapshot,
    engine: Option<crate::control::EngineStatsInfo>,
    at: Option<std::time::Instant>,
}

impl StatsLine {
    fn log(&mut self, ctx: &DeviceCtx, image: Option<&dyn ImageControl>) {
        let mut now = QueueSnapshot::default();
        for q in queue_stats(ctx) {
            now.add(&q);
        }
        let t = std::time::Instant::now();
        let secs = self
            .at
            .map_or(0.0, |a| t.duration_since(a).as_secs_f64())
            .max(0.001);
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let p = &self.io;
        let reqs = d(now.requests, p.requests);
        let mut line = format!(
            "io: {reqs} requests ({:.0}/s; {} reads, {} writes, {} flushes, {} discards/zeroes), \
             {} KiB read, {} KiB written, {} errors",
            reqs as f64 / secs,
            d(now.read_requests, p.read_requests),
            d(now.write_requests, p.write_requests),
            d(now.flush_requests, p.flush_requests),
            d(now.discard_requests, p.discard_requests)
                + d(now.write_zeroes_requests, p.write_zeroes_requests),
            d(now.bytes_read, p.bytes_read) >> 10,
            d(now.bytes_written, p.bytes_written) >> 10,
            d(now.errors, p.errors),
        );
        let engine = image.and_then(|i| i.engine_stats());
        if let Some(e) = engine {
            let o = self.engine.unwrap_or(crate::control::EngineStatsInfo {
                l2_cache_hits: 0,
                l2_cache_misses: 0,
                clusters_allocated: 0,
                clusters_freed: 0,
                cow_clusters: 0,
                metadata_flushes: 0,
                locked_flushes: 0,
            });
            line.push_str(&format!(
                "; engine: {} L2 hits, {} misses, {} clusters allocated, {} freed, {} metadata flushes ({} under the lock)",
                d(e.l2_cache_hits, o.l2_cache_hits),
                d(e.l2_cache_misses, o.l2_cache_misses),
                d(e.clusters_allocated, o.clusters_allocated),
                d(e.clusters_freed, o.clusters_freed),
                d(e.metadata_flushes, o.metadata_flushes),
                d(e.locked_flushes, o.locked_flushes),
            ));
        }
        info!("{line}");
        self.io = now;
        self.engine = engine;
        self.at = Some(t);
    }
}

/// Serve `device` on `config.socket` until SIGINT/SIGTERM (when `config.handle_signals`), the
/// stop handle fires, or a control client sends `quit`. Then: stop taking requests, let
/// in-flight ones finish, flush, close the device, remove the sockets.
pub fn serve(device: Arc<dyn BlockDevice>, mut config: ServeConfig) -> Result<(), VhostError> {
    validate(&config)?;
    // Block the signals before any thread exists, so every thread inherits the mask and the
    // signals arrive only through the signalfd.
    let sigfd = if config.handle_signals {
        Some(signal_fd()?)
    } else {
        None
    };
    let image = config.image.take();
    let events = config.events.take();
    let handover = config.handover.take();
    let mut main = MainLoop::new(device, &config, sigfd, image, events)?;
    main.handover = handover;
    info!(
        "serving on {} ({} queues)",
        config.socket.display(),
        config.num_queues
    );
    let reason = main.run()?;
    main.shut_down(reason)
}

/// What ends the main loop, as QMP's SHUTDOWN event names it.
type Reason = &'static str;

/// The main thread's state: the sockets, the epoll set and what it watches, the connection.
struct MainLoop<'a> {
    device: Arc<dyn BlockDevice>,
    queue_size: u16,
    ctx: Arc<DeviceCtx>,
    listener: Listener,
    socket: SocketFile,
    ep: Epoll,
    sigfd: Option<OwnedFd>,
    /// Kept so the stop event stays open (it may be the daemon's own).
    _stop: StopHandle,
    done: EventFd,
    control: Option<ControlServer>,
    /// The image's counters for the statistics line when there is no control socket.
    image: Option<Box<dyn ImageControl>>,
    periodic: Option<Periodic<'a>>,
    conn: Option<Connection>,
    /// Runs the requests that block; shared by all connections.
    pool: Arc<Pool>,
    aio: AioMode,
    /// Busy-polling window of the queue workers.
    poll: Duration,
    handover: Option<Box<dyn Handover>>,
}

impl<'a> MainLoop<'a> {
    fn new(
        device: Arc<dyn BlockDevice>,
        config: &'a ServeConfig,
        sigfd: Option<OwnedFd>,
        image: Option<Box<dyn ImageControl>>,
        events: Option<crate::control::EventReceiver>,
    ) -> Result<Self, VhostError> {
        let limits = BlkConfig::new(
            device.capacity(),
            config.num_queues,
            config.queue_size,
            config.discard_granularity,
            config.writeback,
        );
        let ctx = Arc::new(DeviceCtx::new(device.clone(), limits, &config.serial));
        let ep = Epoll::new()?;
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
        // Without a control socket the image's counters still feed the statistics line.
        let (control, image) = match config.control.as_deref() {
            Some(path) => {
                let image = image.unwrap_or_else(|| {
                    Box::new(PlainControl {
                        path: Default::default(),
                        format: "raw",
                        capacity: device.capacity(),
                    })
                });
                (Some(ControlServer::new(path, image, events, &ep)?), None)
            }
            None => (None, image),
        };
        // The vhost-user socket last: once it exists (what a frontend, a test or the readiness
        // watcher waits for), the control socket does too.
        let listener = Listener::from(bind_socket(&config.socket, config.socket_mode)?);
        let socket = SocketFile(config.socket.clone());
        ep.add(listener.as_raw_fd(), TOKEN_LISTEN)?;
        let periodic = Periodic::new(config, &ep)?;
        let pool =
            Pool::new(config.pool_threads, "vuq-io").map_err(io_err("starting the I/O pool"))?;
        Ok(MainLoop {
            pool,
            aio: config.aio,
            poll: config.poll,
            device,
            queue_size: config.queue_size,
            ctx,
            listener,
            socket,
            ep,
            sigfd,
            _stop: stop,
            done,
            control,
            image,
            periodic,
            conn: None,
            handover: None,
        })
    }

    /// Wait for events until one ends the loop; returns why.
    fn run(&mut self) -> Result<Reason, VhostError> {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 32];
        loop {
            let n = match epoll::wait(self.ep.fd(), -1, &mut events) {
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
                if let Some(reason) = self.on_event(token)? {
                    return Ok(reason);
                }
            }
        }
    }

    /// Handle one ready fd; Some(reason) when the daemon must shut down.
    fn on_event(&mut self, token: u64) -> Result<Option<Reason>, VhostError> {
        match token {
            TOKEN_LISTEN if self.conn.is_none() => {
                let io = (self.pool.clone(), self.aio, self.poll);
                match start_connection(
                    &self.ctx,
                    self.queue_size,
                    &mut self.listener,
                    &self.done,
                    io,
                ) {
                    Ok(c) => {
                        info!("VMM connected");
                        self.ep.del(self.listener.as_raw_fd())?;
                        self.conn = Some(c);
                    }
                    Err(e) => warn!("cannot start serving a connection: {e}"),
                }
            }
            TOKEN_DONE => {
                let _ = self.done.read();
                if let Some(c) = self.conn.take() {
                    end_connection(c);
                }
                if let Err(e) = self.device.flush() {
                    warn!("flush after disconnect failed: {e}");
                }
                self.ep.add(self.listener.as_raw_fd(), TOKEN_LISTEN)?;
                info!("waiting for the next connection");
            }
            TOKEN_SIGNAL => match self.sigfd.as_ref().and_then(read_signal) {
                Some(libc::SIGHUP) => info!("SIGHUP ignored"),
                Some(sig) => {
                    info!("signal {sig}: shutting down");
                    return Ok(Some("host-signal"));
                }
                None => {}
            },
            TOKEN_STOP => {
                info!("stop requested: shutting down");
                return Ok(Some("host-signal"));
            }
            TOKEN_TIMER => {
                if let Some(p) = self.periodic.as_mut() {
                    let img = match &self.control {
                        Some(c) => Some(c.image()),
                        None => self.image.as_deref(),
                    };
                    p.fire(&self.ctx, img);
                }
            }
            t => {
                if let Some(c) = self.control.as_mut() {
                    let mut view = View {
                        ctx: &self.ctx,
                        connected: self.conn.is_some(),
                        quit: false,
                        handover: self.handover.as_mut(),
                        channel: self.conn.as_ref().map(|c| c.channel.clone()),
                    };
                    c.handle(t, &self.ep, &mut view);
                    if view.quit {
                        info!("quit on the control socket: shutting down");
                        return Ok(Some("host-qmp-quit"));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Tell the control clients, end the connection (its in-flight requests finish), remove
    /// the socket, flush and close the image; the control clients see their connection end
    /// only then.
    fn shut_down(mut self, reason: Reason) -> Result<(), VhostError> {
        if let Some(c) = self.control.as_mut() {
            c.broadcast(
                &Event::new(
                    "SHUTDOWN",
                    serde_json::json!({"guest": false, "reason": reason}),
                ),
                &self.ep,
            );
        }
        if let Some(c) = self.conn.take() {
            if let Some(s) = &c.shutdown {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            end_connection(c);
        }
        drop(self.listener);
        drop(self.socket);
        self.device.flush().map_err(VhostError::Close)?;
        self.device.close().map_err(VhostError::Close)?;
        info!("image closed cleanly");
        drop(self.control);
        Ok(())
    }
}

fn validate(c: &ServeConfig) -> Result<(), VhostError> {
    if c.num_queues == 0 || c.num_queues > super::config::MAX_NUM_QUEUES {
        return Err(VhostError::Config(format!(
            "num-queues must be 1..={}, not {}",
            super::config::MAX_NUM_QUEUES,
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
    (pool, aio, poll): (Arc<Pool>, AioMode, Duration),
) -> Result<Connection, VhostError> {
    let stream = listener
        .accept()
        .map_err(|e| VhostError::Daemon(format!("accepting a connection: {e}")))?
        .ok_or_else(|| VhostError::Daemon("the connection went away at once".into()))?;
    // Each connection starts from the configured cache mode, as after a device reset.
    ctx.writeback.store(
        ctx.limits.writeback != 0,
        std::sync::atomic::Ordering::Relaxed,
    );
    let mem = GuestMemoryAtomic::new(super::backend::GuestMap::new());
    let backend = Arc::new(
        BlkBackend::new(ctx.clone(), mem, queue_size, pool, aio)
            .map_err(io_err("setting up the queues"))?,
    );
    // At most one worker thread per host CPU; queue q is served by worker q % threads.
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let threads = backend.num_queues().clamp(1, cpus);
    let workers = (0..threads)
        .map(|t| Worker::spawn(backend.clone(), format!("vuq-queue{t}"), poll))
        .collect::<Result<Vec<_>, _>>()?;
    let channel = Arc::new(BackendChannel::default());
    let handler = Arc::new(Mutex::new(Handler::new(
        backend.clone(),
        workers,
        channel.clone(),
    )));
    let mut requests = BackendReqHandler::from_stream(stream, handler.clone());
    let shutdown = requests
        .try_clone_connection()
        .map_err(io_err("cloning the connection"))?;
    let peek = requests
        .try_clone_connection()
        .map_err(io_err("cloning the connection"))?;
    let ch = channel.clone();
    let done = done.try_clone().map_err(io_err("cloning an eventfd"))?;
    let waiter = thread::Builder::new()
        .name("vhost-conn".into())
        .spawn(move || {
            let r = loop {
                // The backend channel's descriptor, before the crate takes the message.
                ch.peek(&peek);
                match requests.handle_request() {
                    Ok(()) => {}
                    Err(VuError::Disconnected | VuError::PartialMessage) => break Ok(()),
                    Err(e) => break Err(e.to_string()),
                }
            };
            // Requests still in flight finish (and reach the used ring) before the workers go.
            backend.drain(None, std::time::Duration::from_secs(60));
            handler
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stop_workers();
            let _ = done.write(1);
            r
        })
        .map_err(io_err("spawning the connection thread"))?;
    Ok(Connection {
        waiter,
        shutdown: Some(shutdown),
        channel,
    })
}

fn end_connection(c: Connection) {
    match c.waiter.join() {
        Ok(Ok(())) => info!("VMM disconnected"),
        Ok(Err(e)) => info!("VMM connection ended: {e}"),
        Err(_) => warn!("the connection thread panicked"),
    }
}
