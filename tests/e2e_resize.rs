//! Online resize with a real guest: QEMU (TCG, 2 vCPUs) runs fio with verify on both queues of
//! a disk our daemon serves (lazy refcounts, inline dedup) while the test grows the disk over
//! QMP (`block_resize`). The daemon tells QEMU over the backend channel
//! (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG); QEMU re-reads the config and raises a config
//! interrupt, and the guest must see /sys/block/vda/size change while fio runs, then write and
//! verify data at both ends of the new area (tests/e2e/init.sh, mode resize). Afterwards the
//! daemon exits 0 on SIGTERM, `qemu-img check` exits 0 and `qemu-img info` shows the new size.
//!
//! Needs what `./run test` installs; a missing tool fails the test.

mod common;

use common::guest::{boot_command, passed, Backend, Which};
use common::qmp::Qmp;
use serde_json::{json, Value};
use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;
const OLD: u64 = 256 * M;
const NEW: u64 = 512 * M;

#[test]
fn the_guest_sees_the_disk_grow_while_fio_runs() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let (sock, ctl) = (dir.path().join("v.sock"), dir.path().join("c.sock"));
    let serial = dir.path().join("serial.log");
    common::create_with_cli(&img, "256M", &[]);
    let mut backend = Backend::start_with(
        Which::Ours,
        &img,
        &sock,
        &dir.path().join("backend.log"),
        &[
            "--num-queues",
            "2",
            "--control",
            ctl.to_str().unwrap(),
            "--lazy-refcounts",
            "on",
            "--dedup",
            "inline",
        ],
    );
    backend.wait_listening(&sock);
    let args = ["--mode", "resize", "--fio-size", "32M", "--timeout", "240"];
    let guest = boot_command(&sock, &serial, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Grow the disk once the guest's fio runs.
    let t0 = Instant::now();
    while !fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("e2e: resize: fio started")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the guest never started fio:\n{}",
            fs::read_to_string(&serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut q = Qmp::connect(&ctl);
    let r = q.cmd("block_resize", json!({"node-name": "disk", "size": NEW}));
    assert_eq!(r, json!({"return": {}}), "{}", backend.log_text());
    let out = guest.wait_with_output().unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let ok = passed(&out, &serial, "resize");
    let console = fs::read_to_string(&serial).unwrap_or_default();
    drop(q);
    let status = backend.terminate();
    let log = backend.log_text();
    eprintln!("backend log:\n{log}");
    assert!(ok, "the guest failed (console above)");
    let grew = format!("grew from {} to {} sectors", OLD / 512, NEW / 512);
    assert!(console.contains(&grew), "no '{grew}' on the console");
    assert!(
        console.contains("fio still running: yes"),
        "fio had finished before the disk grew: the test proved nothing"
    );
    assert!(log.contains("the frontend was told the config changed"));
    assert_eq!(status.code(), Some(0), "backend exit");
    common::assert_check_clean(&img);
    let (code, info) = common::qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{info}");
    let v: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], NEW);
}
