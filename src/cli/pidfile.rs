//! `serve --pidfile PATH`: the daemon's process id, written once the vhost-user socket listens.
//!
//! The daemon (src/vhost) publishes the socket file only once it is listening (it binds a
//! private name and hard-links it into place), so a watcher thread here waits for a socket
//! file at the path that was not there before `serve` started, then writes the pidfile. A
//! supervisor that waits for the pidfile (systemd's `PIDFile=`, a script) may therefore
//! connect at once. The pidfile is refused at start when it names a live process, and removed
//! at exit when it still names this one.

use anyhow::{bail, Context};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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

/// The watcher: writes the pidfile once the socket listens, removes it at [`Pidfile::finish`].
pub struct Pidfile {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<bool>>>,
}

impl Pidfile {
    /// Check `path` (refusing a live one) and start watching for `socket`. Call before
    /// `vhost::serve`, with the file at `socket` as it is before the daemon binds: a stale
    /// socket file left there is not taken for the new one. Should writing fail, the daemon is
    /// stopped through `stop`.
    pub fn start(path: PathBuf, socket: PathBuf, stop: StopHandle) -> anyhow::Result<Self> {
        refuse_if_live(&path)?;
        let before = socket_id(&socket);
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let p = path.clone();
        let thread = std::thread::Builder::new()
            .name("pidfile".into())
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
                let r = write_pid(&p);
                if let Err(e) = &r {
                    log::error!("{e:#}; stopping");
                    stop.stop();
                }
                r.map(|()| true)
            })
            .context("starting the pidfile thread")?;
        Ok(Pidfile {
            path,
            done,
            thread: Some(thread),
        })
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
            Err(_) => bail!("the pidfile thread panicked"),
        };
        if wrote && named_pid(&self.path).ok().flatten() == Some(std::process::id() as i32) {
            fs::remove_file(&self.path)
                .with_context(|| format!("cannot remove pidfile {}", self.path.display()))?;
        }
        Ok(())
    }
}

impl Drop for Pidfile {
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
