//! System plumbing of the daemon: binding UNIX sockets, the signalfd, an owned epoll.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::debug;

use super::VhostError;

fn io_err(what: &'static str) -> impl Fn(io::Error) -> VhostError {
    move |source| VhostError::Io { what, source }
}

/// Bind the listening socket: a live socket is refused, a stale one replaced, anything else
/// at the path left alone. The socket gets `mode`.
pub(super) fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, VhostError> {
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
    Ok(l)
}

/// Removes the socket file when dropped.
pub(super) struct SocketFile(pub(super) PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

pub(super) fn signal_fd() -> Result<OwnedFd, VhostError> {
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

pub(super) fn read_signal(fd: &OwnedFd) -> Option<i32> {
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
pub(super) struct Epoll(RawFd);

impl Epoll {
    pub(super) fn new() -> Result<Self, VhostError> {
        epoll::create(true)
            .map(Epoll)
            .map_err(io_err("creating an epoll instance"))
    }
    pub(super) fn fd(&self) -> RawFd {
        self.0
    }
    pub(super) fn add(&self, fd: RawFd, token: u64) -> Result<(), VhostError> {
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, token);
        epoll::ctl(self.0, epoll::ControlOptions::EPOLL_CTL_ADD, fd, ev)
            .map_err(io_err("registering with epoll"))
    }
    /// Change what `fd` is watched for: readable, and writable too when `out`.
    pub(super) fn modify(&self, fd: RawFd, token: u64, out: bool) -> Result<(), VhostError> {
        let mut events = epoll::Events::EPOLLIN;
        if out {
            events |= epoll::Events::EPOLLOUT;
        }
        let ev = epoll::Event::new(events, token);
        epoll::ctl(self.0, epoll::ControlOptions::EPOLL_CTL_MOD, fd, ev)
            .map_err(io_err("changing an epoll registration"))
    }
    pub(super) fn del(&self, fd: RawFd) -> Result<(), VhostError> {
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
