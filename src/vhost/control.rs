//! The control socket on the daemon's main thread: accepts QMP clients, moves their bytes
//! through a [`Session`] each, and forwards events. Everything is non-blocking and driven by
//! the daemon's one epoll; no threads.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use log::{debug, info, warn};

use super::config::VhostError;
use super::sys::{bind_socket, Epoll, SocketFile};
use crate::control::qmp::event_bytes;
use crate::control::{
    Commands, DaemonView, Event, EventReceiver, ImageControl, Session, QMP_VERSION,
};

/// Token of the control socket's listener.
pub(super) const TOKEN_CONTROL: u64 = 16;
/// Token of the event queue's eventfd.
pub(super) const TOKEN_EVENTS: u64 = 17;
/// Client tokens are this plus the client's number.
const TOKEN_CLIENT_BASE: u64 = 1 << 32;

/// Clients served at once; more are accepted and closed at once.
pub const MAX_CLIENTS: usize = 16;
/// Replies and events queued for a client that does not read; past this it is dropped.
const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Reads per client per wake-up, so one busy client cannot starve the loop.
const READS_PER_WAKEUP: usize = 16;

struct Client {
    stream: UnixStream,
    session: Session,
    out: Vec<u8>,
    /// EPOLLOUT is registered (output is pending).
    watching_out: bool,
}

pub(super) struct ControlServer {
    listener: UnixListener,
    _file: SocketFile,
    clients: HashMap<u64, Client>,
    next_id: u64,
    image: Box<dyn ImageControl>,
    events: Option<EventReceiver>,
}

impl ControlServer {
    /// Bind `path` (mode 0600; a stale socket replaced, a live one refused) and register the
    /// listener and the event queue with `ep`.
    pub(super) fn new(
        path: &Path,
        image: Box<dyn ImageControl>,
        events: Option<EventReceiver>,
        ep: &Epoll,
    ) -> Result<Self, VhostError> {
        let listener = bind_socket(path, 0o600)?;
        let file = SocketFile(path.into());
        listener
            .set_nonblocking(true)
            .map_err(|source| VhostError::Bind {
                path: path.into(),
                source,
            })?;
        ep.add(listener.as_raw_fd(), TOKEN_CONTROL)?;
        if let Some(ev) = &events {
            ep.add(ev.as_raw_fd(), TOKEN_EVENTS)?;
        }
        info!("control socket on {}", path.display());
        Ok(ControlServer {
            listener,
            _file: file,
            clients: HashMap::new(),
            next_id: 0,
            image,
            events,
        })
    }

    pub(super) fn image(&self) -> &dyn ImageControl {
        &*self.image
    }

    /// Handle an epoll event if it is one of ours; false if the token is someone else's.
    pub(super) fn handle(&mut self, token: u64, ep: &Epoll, view: &mut dyn DaemonView) -> bool {
        match token {
            TOKEN_CONTROL => self.accept(ep),
            TOKEN_EVENTS => {
                if let Some(rx) = &self.events {
                    for ev in rx.drain() {
                        self.broadcast(&ev, ep);
                    }
                }
            }
            t if t >= TOKEN_CLIENT_BASE => self.client_ready(t - TOKEN_CLIENT_BASE, ep, view),
            _ => return false,
        }
        true
    }

    fn accept(&mut self, ep: &Epoll) {
        // Level-triggered: whatever is left in the backlog wakes us again.
        for _ in 0..MAX_CLIENTS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                debug!("control socket: more than {MAX_CLIENTS} clients, closing the new one");
                continue; // dropping it closes it
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("control socket: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let token = TOKEN_CLIENT_BASE + id;
            if let Err(e) = ep.add(stream.as_raw_fd(), token) {
                warn!("control socket: {e}");
                continue;
            }
            debug!("control client {id} connected");
            let mut c = Client {
                stream,
                session: Session::new(),
                out: Session::greeting(QMP_VERSION, ""),
                watching_out: false,
            };
            if send(&mut c, ep, token) {
                self.clients.insert(id, c);
            } else {
                let _ = ep.del(c.stream.as_raw_fd());
            }
        }
    }

    fn client_ready(&mut self, id: u64, ep: &Epoll, view: &mut dyn DaemonView) {
        let token = TOKEN_CLIENT_BASE + id;
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let mut keep = send(c, ep, token);
        let mut buf = [0u8; 65536];
        let mut reads = 0;
        while keep && reads < READS_PER_WAKEUP {
            reads += 1;
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    debug!("control client {id} disconnected");
                    keep = false;
                }
                Ok(n) => {
                    let mut cmds = Commands {
                        daemon: &mut *view,
                        image: &*self.image,
                        version: QMP_VERSION,
                    };
                    let r = c.session.feed(&buf[..n], &mut cmds, &mut c.out);
                    keep = send(c, ep, token);
                    if let Err(e) = r {
                        warn!("control client {id}: {e}; closing it");
                        keep = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("control client {id}: {e}");
                    keep = false;
                }
            }
        }
        if !keep {
            self.drop_client(id, ep);
        }
    }

    fn drop_client(&mut self, id: u64, ep: &Epoll) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = ep.del(c.stream.as_raw_fd());
        }
    }

    /// Queue `ev` for every negotiated client.
    pub(super) fn broadcast(&mut self, ev: &Event, ep: &Epoll) {
        debug!("event {}", ev.name);
        let bytes = event_bytes(ev);
        let mut gone = Vec::new();
        for (id, c) in self.clients.iter_mut() {
            if !c.session.negotiated() {
                continue;
            }
            c.out.extend_from_slice(&bytes);
            if !send(c, ep, TOKEN_CLIENT_BASE + id) {
                gone.push(*id);
            }
        }
        for id in gone {
            self.drop_client(id, ep);
        }
    }
}

/// Write what is pending for `c` without blocking; watch for writability while some is left.
/// False when the client is gone or hopelessly behind.
fn send(c: &mut Client, ep: &Epoll, token: u64) -> bool {
    while !c.out.is_empty() {
        match c.stream.write(&c.out) {
            Ok(0) => return false,
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    if c.out.len() > MAX_PENDING_OUTPUT {
        warn!("control client does not read its replies; closing it");
        return false;
    }
    let want = !c.out.is_empty();
    if want != c.watching_out {
        if ep.modify(c.stream.as_raw_fd(), token, want).is_err() {
            return false;
        }
        c.watching_out = want;
    }
    true
}
