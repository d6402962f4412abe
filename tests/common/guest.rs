//! A real guest for the end-to-end tests: the backend processes (ours or qemu-storage-daemon)
//! and one guest boot through tests/e2e/guest.sh (TCG, see that script).

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const GUEST_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/guest.sh");
/// Queues of the guest's disk (and vCPUs: one per queue).
pub const QUEUES: &str = "2";

#[derive(Clone, Copy, Debug)]
pub enum Which {
    /// `vhost-user-qcow2 serve`.
    Ours,
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd,
}

/// The backend process; killed if the test panics before it was stopped.
pub struct Backend {
    pub child: Child,
    pub log: PathBuf,
    pub name: &'static str,
}

impl Backend {
    pub fn start(which: Which, img: &Path, sock: &Path, log: &Path) -> Backend {
        Self::start_with(which, img, sock, log, &["--num-queues", QUEUES])
    }

    /// Like `start`, with more `serve` arguments for our daemon. The log is appended to, so
    /// one log can hold every run of a backend restarted on the same image.
    pub fn start_with(
        which: Which,
        img: &Path,
        sock: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Backend {
        Self::start_with_env(which, img, sock, log, extra, &[])
    }

    /// Like `start_with`, with more environment variables for the backend.
    pub fn start_with_env(
        which: Which,
        img: &Path,
        sock: &Path,
        log: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Backend {
        let name = match which {
            Which::Ours => "vhost-user-qcow2",
            Which::Qsd => "qemu-storage-daemon",
        };
        let mut cmd = match which {
            Which::Ours => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"));
                c.arg("serve")
                    .arg("--image")
                    .arg(img)
                    .arg("--socket")
                    .arg(sock)
                    .args(extra)
                    // `./run test`'s second pass (other executor, O_DIRECT).
                    .args(
                        std::env::var("VUQ_TEST_SERVE_ARGS")
                            .unwrap_or_default()
                            .split_whitespace(),
                    );
                c
            }
            Which::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f0,filename={}",
                        img.display()
                    ))
                    .args(["--blockdev", "driver=qcow2,node-name=d0,file=f0"])
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},\
                         writable=on,num-queues={QUEUES}",
                        sock.display()
                    ));
                c
            }
        };
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Backend {
            child,
            log: log.to_owned(),
            name,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the backend listens on `sock`; panic if it exits first or takes too long.
    pub fn wait_listening(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the {} backend exited ({status}) before listening on {}:\n{}",
                    self.name,
                    sock.display(),
                    self.log_text()
                );
            }
            if fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the {} backend did not create {} within 20 s:\n{}",
                self.name,
                sock.display(),
                self.log_text()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, not reaped yet (as in `terminate`).
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill(SIGKILL) failed");
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (no try_wait
        // returned Some), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the {} backend did not exit within 60 s of SIGTERM:\n{}",
                self.name,
                self.log_text()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a command to completion; its output goes to the test's captured output.
pub fn run_logged(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    eprintln!("$ {cmd:?}  -> {}", out.status);
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// One guest boot through tests/e2e/guest.sh; true if the harness passed and the guest's console
/// has the PASS marker.
pub fn boot(sock: &Path, serial: &Path, mode: &str) -> bool {
    let guest = run_logged(&mut boot_command(sock, serial, &["--mode", mode]));
    passed(&guest, serial, mode)
}

/// The command of one guest boot with guest.sh's `boot` arguments `args`.
pub fn boot_command(sock: &Path, serial: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(GUEST_SH)
        .arg("boot")
        .arg("--socket")
        .arg(sock)
        .args(["--queues", QUEUES])
        .args(args)
        .arg("--log")
        .arg(serial);
    c
}

/// True if the harness passed and the guest's console has the PASS marker.
pub fn passed(guest: &Output, serial: &Path, mode: &str) -> bool {
    let console = fs::read_to_string(serial).unwrap_or_default();
    let marker = console
        .lines()
        .any(|l| l.trim_end() == "VHOST-QCOW2-E2E: PASS");
    eprintln!(
        "boot ({mode}): harness {}, PASS marker {}",
        guest.status,
        if marker { "present" } else { "absent" }
    );
    guest.status.success() && marker
}
