//! System plumbing of the daemon: binding UNIX sockets, the signalfd, an owned epoll.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use log::debug;

use super::config::VhostError;

fn io_err(what: &'static str) -> impl Fn(io::Error) -> VhostError {
    move |source| VhostError::Io { what, source }
}

/// Bind the listening socket: a live socket is refused, a stale one replaced, anything else
/// at the path left alone. The socket gets `mode`.
///
/// The socket is bound (listening, its mode set) in a private directory beside `path` (mode
/// 0700, so nobody else can connect to it there) and then hard-linked into place, which fails
/// rather than replace anything that appeared at `path` meanwhile. So whoever waits for `path`
/// to appear (a script starting QEMU, a test) can connect at once and never meets a socket that
/// refuses connections or has the wrong mode. Exception: when the private path would be too long
/// for a socket address but `path` is not, or the filesystem refuses the directory or the link,
/// the socket is bound in place, and appears a moment before it listens with its mode.
pub(super) fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, VhostError> {
    let bind_err = |source| VhostError::Bind {
        path: path.into(),
        source,
    };
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
                fs::remove_file(path).map_err(bind_err)?;
            }
        }
    }
    let dir = private_dir(path);
    let _ = fs::remove_dir_all(&dir);
    let tmp = dir.join("s");
    let mut in_use = false;
    let r = fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .and_then(|()| UnixListener::bind(&tmp))
        .and_then(|l| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
            place(&tmp, path).inspect_err(|e| in_use = e.kind() == io::ErrorKind::AlreadyExists)?;
            Ok(l)
        });
    let _ = fs::remove_dir_all(&dir);
    match r {
        Ok(l) => Ok(l),
        Err(_) if in_use => Err(VhostError::SocketInUse { path: path.into() }),
        // The private path too long for a socket address where `path` is not, or a directory
        // or link the filesystem refuses: bind in place, as plain `bind` does.
        Err(e) => {
            debug!("binding {} in place ({e})", path.display());
            let l = UnixListener::bind(path).map_err(bind_err)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(bind_err)?;
            Ok(l)
        }
    }
}

/// Give the bound socket at `tmp` its public name `path`; fails with `AlreadyExists` instead of
/// replacing whatever is at `path` (another daemon's socket bound meanwhile, say).
fn place(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::hard_link(tmp, path)
}

/// `dir/.vuq.PID.N` for `dir/name` (N counts this process's binds): short, so that the socket
/// inside it fits a socket address whenever `path` does, unless `name` is very short.
fn private_dir(path: &Path) -> PathBuf {
    static BINDS: AtomicU32 = AtomicU32::new(0);
    let n = BINDS.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".vuq.{}.{n}", std::process::id()))
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

/// True unless `file` is a regular file (memfd included) shorter than `offset + size`: a
/// mapping past its end would kill the daemon with SIGBUS at the first access, so a frontend
/// that sends a short file is refused instead. Other kinds (a DAX character device) report no
/// length and are left to the mapping.
pub(super) fn file_covers(file: &fs::File, offset: u64, size: u64) -> bool {
    match file.metadata() {
        Ok(m) if m.file_type().is_file() => offset.checked_add(size).is_some_and(|e| e <= m.len()),
        Ok(_) => true,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The socket appears listening, with its mode, and nothing temporary is left beside it.
    #[test]
    fn socket_appears_ready_and_alone() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vq.sock");
        let l = bind_socket(&p, 0o640).unwrap();
        assert_eq!(mode_of(&p), 0o640);
        let _c = UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("vq.sock")]);
        // A live socket is refused; once it is gone, its stale file is replaced.
        assert!(matches!(
            bind_socket(&p, 0o600),
            Err(VhostError::SocketInUse { .. })
        ));
        drop(l);
        let _l2 = bind_socket(&p, 0o600).unwrap();
        assert_eq!(mode_of(&p), 0o600);
    }

    /// A path close to the socket-address limit still binds (in place) though the private
    /// socket path would be too long.
    #[test]
    fn a_long_path_binds_in_place() {
        let d = tempfile::tempdir().unwrap();
        // sun_path holds 108 bytes with the terminating NUL: a directory of 102 bytes and a
        // 4-byte name fill it, the private directory's name (.vuq.PID.N) does not fit.
        let base = d.path().as_os_str().len() + 1;
        if base >= 100 {
            eprintln!("skipped: the temporary directory's path is too long for this test");
            return;
        }
        let dir = d.path().join("d".repeat(102 - base));
        fs::create_dir(&dir).unwrap();
        let p = dir.join("s.so");
        assert_eq!(p.as_os_str().len(), 107);
        assert!(private_dir(&p).join("s").as_os_str().len() > 107);
        let _l = bind_socket(&p, 0o600).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        UnixStream::connect(&p).unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    }

    /// Placing never replaces what appeared at the path after the stale-socket check: a live
    /// socket there stays served.
    #[test]
    fn placing_never_replaces_a_socket_bound_meanwhile() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, p) = (d.path().join("tmp"), d.path().join("p"));
        let _mine = UnixListener::bind(&tmp).unwrap();
        let theirs = UnixListener::bind(&p).unwrap();
        let e = place(&tmp, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        let _c = UnixStream::connect(&p).unwrap();
        assert!(theirs.accept().is_ok());
    }

    /// Someone polling for the path connects the moment it appears, and sees its final mode.
    #[test]
    fn a_watcher_never_meets_a_socket_that_is_not_ready() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..50 {
            let p = d.path().join(format!("w{i}.sock"));
            let watch = {
                let p = p.clone();
                std::thread::spawn(move || loop {
                    if let Ok(md) = fs::symlink_metadata(&p) {
                        let mode = md.permissions().mode() & 0o777;
                        return (mode, UnixStream::connect(&p).is_ok());
                    }
                    std::hint::spin_loop();
                })
            };
            let l = bind_socket(&p, 0o604).unwrap();
            assert_eq!(watch.join().unwrap(), (0o604, true), "round {i}");
            drop(l);
        }
    }

    #[test]
    fn a_file_shorter_than_the_mapping_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        assert!(super::file_covers(&f, 0, 4096));
        assert!(super::file_covers(&f, 1024, 3072));
        assert!(
            !super::file_covers(&f, 0, 8192),
            "would SIGBUS past the end"
        );
        assert!(!super::file_covers(&f, 4096, 1));
        assert!(!super::file_covers(&f, u64::MAX, 2), "overflow");
    }
}
