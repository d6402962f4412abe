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

mod common;

use common::guest::{boot, boot_command, passed, run_logged, Backend, Which, GUEST_SH};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

#[test]
fn qemu_guest_fio_and_ext4_on_vhost_user_qcow2() {
    guest_run(Which::Ours);
}

#[test]
fn qemu_guest_harness_with_qemu_storage_daemon() {
    guest_run(Which::Qsd);
}

/// A newcomer's command lines: `serve` with no queue option, QEMU with 4 vCPUs and the plain
/// device line (QEMU then asks for one queue per vCPU). The guest must see 4 queues and pass a
/// short fio verify on each.
#[test]
fn qemu_guest_with_4_vcpus_and_the_plain_device_line() {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, img, sock, serial) = fresh_image();
    let mut backend = Backend::start_with(
        Which::Ours,
        &img,
        &sock,
        &dir.path().join("backend.log"),
        &[],
    );
    backend.wait_listening(&sock);
    let args = [
        "--queues",
        "4",
        "--smp",
        "4",
        "--plain-device",
        "--mode",
        "crash",
        "--rounds",
        "1",
        "--fio-size",
        "8M",
    ];
    let guest = run_logged(&mut boot_command(&sock, &serial, &args));
    let ok = passed(&guest, &serial, "4 vCPUs");
    let status = backend.terminate();
    eprintln!("backend log:\n{}", backend.log_text());
    assert!(ok, "the 4-vCPU guest with the plain device line failed");
    assert_eq!(status.code(), Some(0));
}

/// A temporary directory with a fresh 1 GiB qcow2 image (made by qemu-img): the directory,
/// the image, the socket path and the serial log path.
fn fresh_image() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let out = run_logged(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1G"),
    );
    assert!(out.status.success(), "qemu-img create failed");
    let (sock, serial) = (dir.path().join("vhost.sock"), dir.path().join("serial.log"));
    (dir, img, sock, serial)
}

fn guest_run(which: Which) {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let (dir, img, sock, serial) = fresh_image();

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

    let check = run_logged(Command::new("qemu-img").arg("check").arg(&img));
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check must exit 0 after the guest and backend are gone"
    );

    let verify = run_logged(
        Command::new("bash")
            .arg(GUEST_SH)
            .arg("verify-image")
            .arg(&img)
            .arg(&serial),
    );
    assert!(
        verify.status.success(),
        "the files the guest wrote must read back from the image on the host"
    );
}
