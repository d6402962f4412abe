//! End to end with a real guest: QEMU (TCG, 2 vCPUs) boots Debian's cloud kernel with a busybox
//! initramfs on a vhost-user-blk disk served by our daemon from a fresh qcow2 image. The guest
//! checks the disk has 2 queues, runs fio with verify on both, makes an ext4 filesystem, writes
//! files, syncs, and fsck must be clean (tests/e2e/init.sh). Afterwards the daemon must exit 0 on
//! SIGTERM, `qemu-img check` must exit 0, and the files must read back from the image on the host.
//!
//! Needs what `./run test` installs (qemu-system-x86 10, the cached kernel, fio, busybox-static,
//! e2fsprogs); a missing tool fails the test, it is never skipped.
//!
//! The same run against qemu-storage-daemon checks the harness itself (kernel, initramfs, QEMU),
//! so that a failure of our daemon's test is known to be the daemon's. The two tests take turns
//! (one TCG guest at a time on these 2-core machines).

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

const QUEUES: &str = "2";
const GUEST_SH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/guest.sh");

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug)]
enum Which {
    /// `vhost-user-qcow2 serve`.
    Ours,
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd,
}

/// The backend process; killed if the test panics before it was stopped.
struct Backend {
    child: Child,
    log: PathBuf,
    name: &'static str,
}

impl Backend {
    fn start(which: Which, img: &Path, sock: &Path, log: &Path) -> Backend {
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
                    .args(["--num-queues", QUEUES])
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
        let out = fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Backend {
            child,
            log: log.to_owned(),
            name,
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the backend listens on `sock`; panic if it exits first or takes too long.
    fn wait_listening(&mut self, sock: &Path) {
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

    /// SIGTERM, then wait (bounded) for the exit status.
    fn terminate(&mut self) -> ExitStatus {
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
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    eprintln!("$ {cmd:?}  -> {}", out.status);
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn qemu_guest_fio_and_ext4_on_vhost_user_qcow2() {
    guest_run(Which::Ours);
}

#[test]
fn qemu_guest_harness_with_qemu_storage_daemon() {
    guest_run(Which::Qsd);
}

fn guest_run(which: Which) {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    let serial = dir.path().join("serial.log");

    let out = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1G"));
    assert!(out.status.success(), "qemu-img create failed");

    let mut backend = Backend::start(which, &img, &sock, &dir.path().join("backend.log"));
    backend.wait_listening(&sock);

    // First boot: fio, mkfs, files. Second boot on the same backend process (a new VMM
    // connection, as after a guest reboot or VMM restart): fsck and the files again.
    let first = boot(&sock, &serial, "full");
    let second = first.then(|| boot(&sock, &dir.path().join("serial2.log"), "reverify"));

    let status = backend.terminate();
    eprintln!("{} backend log:\n{}", backend.name, backend.log_text());
    assert!(first, "the guest run failed");
    assert_eq!(
        second,
        Some(true),
        "the second boot on the same backend (reconnect, re-read the files) failed"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "the backend must exit 0 on SIGTERM, got {status}"
    );

    let check = run(Command::new("qemu-img").arg("check").arg(&img));
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check must exit 0 after the guest and backend are gone"
    );

    let verify = run(Command::new("bash")
        .arg(GUEST_SH)
        .arg("verify-image")
        .arg(&img)
        .arg(&serial));
    assert!(
        verify.status.success(),
        "the files the guest wrote must read back from the image on the host"
    );
}

/// One guest boot through tests/e2e/guest.sh; true if the harness passed and the guest's console
/// has the PASS marker.
fn boot(sock: &Path, serial: &Path, mode: &str) -> bool {
    let guest = run(Command::new("bash")
        .arg(GUEST_SH)
        .arg("boot")
        .arg("--socket")
        .arg(sock)
        .args(["--queues", QUEUES, "--mode", mode])
        .arg("--log")
        .arg(serial));
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
