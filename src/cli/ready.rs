//! Telling others that `serve` is ready: `--pidfile PATH` (the process id, written once the
//! vhost-user socket listens) and systemd's readiness notification (`READY=1` to
//! `$NOTIFY_SOCKET`, for `Type=notify` units).
//!
//! The daemon (src/vhost) publishes the socket file only once it is listening (it binds a
//! private name and hard-links it into place), so a watcher thread here waits for a socket
//! file at the path that was not there before `serve` started, then writes the pidfile and
//! notifies systemd. A supervisor that waits for either may therefore connect at once. The
//! pidfile is refused at start when it names a live process, and removed at exit when it still
//! names this one.

use anyhow::{bail, Context};
use std::fs;
use std::io::{self, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vhost_user_qcow2::signals::with_signals_blocked;

use vhost_user_qcow2::vhost::StopHandle;

/// How often the watcher looks for the socket file.
const POLL: Duration = Duration::from_millis(5);

/// The process a pidfile names, if it names one (a positive decimal number).
fn named_pid(path: &Path) -> io::Result<Option<i32>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().parse::<i32>().ok().filter(|p| *p > 0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether process `pid` exists (signal 0 checks without sending; EPERM means it exists but
/// belongs to someone else).
fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Refuse to start when `path` names a live process other than this one. A stale pidfile (a
/// dead process, or contents that are not a pid) is left for the watcher to replace.
pub fn refuse_if_live(path: &Path) -> anyhow::Result<()> {
    let named =
        named_pid(path).with_context(|| format!("cannot read pidfile {}", path.display()))?;
    if let Some(pid) = named {
        if pid != std::process::id() as i32 && alive(pid) {
            bail!(
                "pidfile {} names process {pid}, which is running; refusing to start",
                path.display()
            );
        }
        log::info!(
            "replacing stale pidfile {} (process {pid} is gone)",
            path.display()
        );
    }
    Ok(())
}

/// Write this process's id to `path`: a stale file is removed first, and the new one is
/// created exclusively, so two daemons racing for one pidfile cannot both think they own it.
fn write_pid(path: &Path) -> anyhow::Result<()> {
    refuse_if_live(path)?;
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create pidfile {}", path.display()))?;
    writeln!(f, "{}", std::process::id())
        .with_context(|| format!("cannot write pidfile {}", path.display()))
}

/// (device, inode) of the socket file at `path`, if there is one.
fn socket_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

/// systemd's notification socket, from `$NOTIFY_SOCKET`: a path, or an abstract name after `@`.
pub struct Notify {
    addr: SocketAddr,
}

impl Notify {
    /// The socket systemd named, if it named one (only under `Type=notify` and the like).
    pub fn from_env() -> Option<Self> {
        let v = std::env::var_os("NOTIFY_SOCKET")?;
        let b = v.as_encoded_bytes();
        let addr = match b.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name),
            None => SocketAddr::from_pathname(Path::new(&v)),
        };
        match addr {
            Ok(addr) => Some(Notify { addr }),
            Err(e) => {
                log::warn!("ignoring NOTIFY_SOCKET={v:?}: {e}");
                None
            }
        }
    }

    /// Send one notification (`READY=1`, ...) as a datagram.
    fn send(&self, state: &str) -> io::Result<()> {
        UnixDatagram::unbound()?
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }
}

/// The watcher: writes the pidfile and notifies systemd once the socket listens; removes the
/// pidfile at [`Ready::finish`].
pub struct Ready {
    pidfile: Option<PathBuf>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<bool>>>,
}

/// What the watcher does once the socket listens: write the pidfile (a failure stops the
/// daemon), then notify systemd (a failure is only logged). Whether it wrote the pidfile.
fn on_listening(
    pidfile: Option<&Path>,
    notify: Option<&Notify>,
    socket: &Path,
    stop: &StopHandle,
) -> anyhow::Result<bool> {
    if let Some(p) = pidfile {
        if let Err(e) = write_pid(p) {
            log::error!("{e:#}; stopping");
            stop.stop();
            return Err(e);
        }
    }
    if let Some(n) = notify {
        let msg = format!(
            "READY=1\nMAINPID={}\nSTATUS=listening on {}",
            std::process::id(),
            socket.display()
        );
        if let Err(e) = n.send(&msg) {
            log::warn!("readiness notification to systemd failed: {e}");
        }
    }
    Ok(pidfile.is_some())
}

impl Ready {
    /// Check `pidfile` (refusing a live one) and start watching for `socket`; nothing to do
    /// (None) without a pidfile or a notification socket. Call before `vhost::serve`, with the
    /// file at `socket` as it is before the daemon binds: a stale socket file left there is not
    /// taken for the new one. Should writing the pidfile fail, the daemon is stopped through
    /// `stop`.
    pub fn start(
        pidfile: Option<PathBuf>,
        notify: Option<Notify>,
        socket: PathBuf,
        stop: StopHandle,
    ) -> anyhow::Result<Option<Self>> {
        if pidfile.is_none() && notify.is_none() {
            return Ok(None);
        }
        if let Some(p) = &pidfile {
            refuse_if_live(p)?;
        }
        let before = socket_id(&socket);
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let p = pidfile.clone();
        // With every signal blocked, as the daemon's own threads: the daemon takes SIGTERM
        // through a signalfd, and a thread that left it unblocked would receive it and die
        // with the whole process instead of shutting down cleanly.
        let thread = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("ready".into())
                .spawn(move || {
                    loop {
                        if d.load(Ordering::Acquire) {
                            return Ok(false);
                        }
                        match socket_id(&socket) {
                            Some(id) if Some(id) != before => break,
                            _ => std::thread::sleep(POLL),
                        }
                    }
                    on_listening(p.as_deref(), notify.as_ref(), &socket, &stop)
                })
        })
        .context("starting the readiness thread")?;
        Ok(Some(Ready {
            pidfile,
            done,
            thread: Some(thread),
        }))
    }

    /// After `serve` returned: stop watching, and remove the pidfile if this process wrote it
    /// (and it still names this process). An error if writing it had failed.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.finish_inner()
    }

    fn finish_inner(&mut self) -> anyhow::Result<()> {
        self.done.store(true, Ordering::Release);
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let wrote = match t.join() {
            Ok(r) => r?,
            Err(_) => bail!("the readiness thread panicked"),
        };
        let Some(path) = self.pidfile.as_deref().filter(|_| wrote) else {
            return Ok(());
        };
        if named_pid(path).ok().flatten() == Some(std::process::id() as i32) {
            fs::remove_file(path)
                .with_context(|| format!("cannot remove pidfile {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Err(e) = self.finish_inner() {
            log::error!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_and_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        // Missing, garbage, or naming a process that is gone: fine.
        refuse_if_live(&p).unwrap();
        fs::write(&p, "not a pid\n").unwrap();
        refuse_if_live(&p).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        fs::write(&p, format!("{dead}\n")).unwrap();
        refuse_if_live(&p).unwrap();
        // Our parent is alive (pid 1 answers EPERM to an unprivileged user; alive too).
        fs::write(&p, "1\n").unwrap();
        let e = refuse_if_live(&p).unwrap_err().to_string();
        assert!(e.contains("names process 1"), "{e}");
        // Written over a stale file.
        fs::write(&p, format!("{dead}\n")).unwrap();
        write_pid(&p).unwrap();
        assert_eq!(named_pid(&p).unwrap(), Some(std::process::id() as i32));
    }
}
