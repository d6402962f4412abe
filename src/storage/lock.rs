//! QEMU-compatible image locks.
//!
//! QEMU's file driver (block/file-posix.c) takes open-file-description (OFD) byte-range locks on
//! the image file: for each permission bit `i` it holds, a shared lock on byte `100 + i`
//! (RAW_LOCK_PERM_BASE); for each permission it does *not* share with others, a shared lock on
//! byte `200 + i` (RAW_LOCK_SHARED_BASE). A second user then tests, with an exclusive-lock probe
//! (F_OFD_GETLK), that nobody refuses to share a permission it wants (bytes 200 + i) and that
//! nobody holds a permission it refuses to share (bytes 100 + i). We take and test the same
//! bytes, so QEMU and qemu-img refuse to write an image we serve, and we refuse one they hold.
//!
//! Permission bits (include/block/block-common.h): CONSISTENT_READ = 0, WRITE = 1,
//! WRITE_UNCHANGED = 2, RESIZE = 3.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

const PERM_CONSISTENT_READ: u32 = 1 << 0;
const PERM_WRITE: u32 = 1 << 1;
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
const PERM_RESIZE: u32 = 1 << 3;
const PERM_ALL: u32 = 0xf;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {path} to lock it: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path} is in use by another process (QEMU, qemu-img or another server): {detail}; \
         refusing to open it"
    )]
    Conflict { path: PathBuf, detail: String },
    #[error("locking {path} failed: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// Held QEMU-style locks on an image; released when dropped (the descriptor closes).
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

fn flock(l_type: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0; // required for OFD locks
    fl
}

fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: the descriptor is open for the duration of the call and `fl` is a valid flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True when another open file description holds a lock on `byte`.
fn byte_locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: as in `lock_byte`; F_OFD_GETLK writes back into `fl`, which we own.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

impl ImageLock {
    /// Take the locks QEMU would take to open `path` for a guest device: read-only, or writable
    /// (write and resize not shared with anyone).
    pub fn acquire(path: &Path, read_only: bool) -> Result<ImageLock, LockError> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.into(),
                source,
            })?;
        let (perm, shared) = if read_only {
            (PERM_CONSISTENT_READ, PERM_ALL & !(PERM_WRITE | PERM_RESIZE))
        } else {
            (
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            )
        };
        let lock_err = |source| LockError::Lock {
            path: path.into(),
            source,
        };
        // Lock first, then test, as QEMU does, so two openers racing both see each other.
        for i in 0..4 {
            if perm & (1 << i) != 0 {
                lock_byte(&file, PERM_BASE + i64::from(i)).map_err(lock_err)?;
            }
            if shared & (1 << i) == 0 {
                lock_byte(&file, SHARED_BASE + i64::from(i)).map_err(lock_err)?;
            }
        }
        for i in 0..4u32 {
            let name = PERM_NAMES[i as usize];
            if perm & (1 << i) != 0
                && byte_locked_by_others(&file, SHARED_BASE + i64::from(i)).map_err(lock_err)?
            {
                return Err(LockError::Conflict {
                    path: path.into(),
                    detail: format!("it does not share the \"{name}\" permission we need"),
                });
            }
            if shared & (1 << i) == 0
                && byte_locked_by_others(&file, PERM_BASE + i64::from(i)).map_err(lock_err)?
            {
                return Err(LockError::Conflict {
                    path: path.into(),
                    detail: format!("it holds the \"{name}\" permission"),
                });
            }
        }
        Ok(ImageLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    #[test]
    fn two_writers_conflict_and_readers_share() {
        let f = image();
        let w = ImageLock::acquire(f.path(), false).unwrap();
        let e = ImageLock::acquire(f.path(), false).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        assert!(ImageLock::acquire(f.path(), true).is_err());
        drop(w);
        let r1 = ImageLock::acquire(f.path(), true).unwrap();
        let _r2 = ImageLock::acquire(f.path(), true).unwrap();
        assert!(ImageLock::acquire(f.path(), false).is_err());
        drop(r1);
    }

    #[test]
    fn qemu_io_refuses_an_image_we_hold() {
        let f = image();
        let _w = ImageLock::acquire(f.path(), false).unwrap();
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write 0 512"])
            .arg(f.path())
            .output()
            .expect("qemu-io is installed by ./run test");
        let msg = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(msg.contains("lock"), "qemu-io did not hit our lock: {msg}");
    }

    #[test]
    fn we_refuse_an_image_qemu_io_holds() {
        let f = image();
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(f.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("qemu-io is installed by ./run test");
        // qemu-io opens the image before it reads its first command; a command round trip
        // tells us it is open.
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "write 0 512").unwrap();
        // Wait by looking only (F_OFD_GETLK): taking our locks to probe could make qemu-io's
        // own check, which may come more than once while it opens, fail instead of ours.
        let probe = File::open(f.path()).unwrap();
        let t0 = std::time::Instant::now();
        let mut held = false;
        while t0.elapsed() < std::time::Duration::from_secs(30) {
            if byte_locked_by_others(&probe, 101).unwrap() {
                held = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let rw = ImageLock::acquire(f.path(), false);
        let ro = ImageLock::acquire(f.path(), true);
        writeln!(stdin, "quit").unwrap();
        drop(stdin);
        child.wait().unwrap();
        assert!(held, "qemu-io's write lock never appeared within 30 s");
        assert!(
            rw.is_err(),
            "a writable open must be refused while qemu-io writes"
        );
        assert!(
            ro.is_err(),
            "a read-only open must be refused while qemu-io writes"
        );
        drop(probe);
        ImageLock::acquire(f.path(), false).unwrap();
    }
}
