//! Live migration of a VM whose disk we serve (issue 18): two QEMU processes (TCG) with the
//! same command line, the second with `-incoming`; daemon S serves the image for the source,
//! daemon D starts `--inactive` on the same file for the destination. The guest runs fio with
//! crc32c verify; the source migrates with `pause-before-switchover`; at `pre-switchover` S is
//! made inactive and D active, then the migration continues. The guest must finish on the
//! destination with verify OK, both daemons must exit 0 on SIGTERM and `qemu-img check` must
//! exit 0. The guest reads with O_DIRECT into buffers only the device writes and compares
//! each read's checksum with the first (tests/e2e/init.sh, mode migrate). Also: a migration
//! cancelled midway leaves the source serving and its guest passing, and a control run with
//! the daemons' dirty marking switched off must fail.

mod common;

use common::guest::{boot_command, passed, Backend, Which};
use common::qmp::Qmp;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

/// A QEMU started through guest.sh, with its output in a file; killed if still running.
struct Vm {
    child: Child,
    out: std::path::PathBuf,
    serial: std::path::PathBuf,
}

impl Vm {
    fn start(sock: &Path, dir: &Path, name: &str, args: &[&str]) -> Vm {
        let out = dir.join(format!("{name}.out"));
        let serial = dir.join(format!("{name}.serial"));
        let qmp = dir.join(format!("{name}.qmp"));
        let f = fs::File::create(&out).unwrap();
        let mut all = vec![
            "--mode",
            "migrate",
            "--rounds",
            "1",
            "--fio-size",
            "512M",
            "--qmp",
            qmp.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let child = boot_command(sock, &serial, &all)
            .env("E2E_TIMEOUT", "240")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Vm { child, out, serial }
    }

    fn qmp(&self, dir: &Path, name: &str) -> Qmp {
        let path = dir.join(format!("{name}.qmp"));
        let t0 = Instant::now();
        while !path.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no QMP socket for {name}"
            );
            sleep(Duration::from_millis(50));
        }
        Qmp::connect(&path)
    }

    /// Wait for the harness: whether the guest passed, and its console.
    fn finish(mut self, what: &str) -> Outcome {
        let status = self.child.wait().unwrap();
        let out = std::process::Output {
            status,
            stdout: fs::read(&self.out).unwrap_or_default(),
            stderr: Vec::new(),
        };
        let ok = passed(&out, &self.serial, what);
        let console = fs::read_to_string(&self.serial).unwrap_or_default();
        if !ok {
            let tail: Vec<&str> = console.lines().rev().take(25).collect();
            eprintln!(
                "{what}: console tail:\n{}\nharness:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Outcome {
            passed: ok,
            console,
        }
    }
}

/// How the guest that ran last ended.
struct Outcome {
    passed: bool,
    /// Its serial console.
    console: String,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn console_has(p: &Path, what: &str) -> bool {
    fs::read_to_string(p).is_ok_and(|s| s.contains(what))
}

fn ok(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    let r = q.cmd(cmd, args);
    r.get("return")
        .unwrap_or_else(|| panic!("{cmd}: {r}"))
        .clone()
}

/// Poll `query-migrate` until its status is one of `want` (or a failure); returns it.
fn wait_migration(q: &mut Qmp, want: &[&str]) -> String {
    let t0 = Instant::now();
    loop {
        let r = ok(q, "query-migrate", json!({}));
        let st = r["status"].as_str().unwrap_or("").to_string();
        if want.contains(&st.as_str()) || st == "failed" {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "migration stuck in {st}: {r}"
        );
        sleep(Duration::from_millis(100));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Plan {
    Migrate,
    Cancel,
}

/// One run; true when the guest passed (on the destination, or on the source if cancelled).
fn run(create: &[&str], serve: &[&str], plan: Plan, env: &[(&str, &str)]) -> Outcome {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
        .arg("create")
        .arg(&img)
        .args(["--size", "1G"])
        .args(create)
        .output()
        .unwrap();
    assert!(out.status.success(), "create: {out:?}");
    let (s_sock, d_sock) = (d.join("s.sock"), d.join("d.sock"));
    let (s_ctl, d_ctl) = (d.join("s.ctl"), d.join("d.ctl"));
    let mut s_args = vec!["--num-queues", "2", "--control", s_ctl.to_str().unwrap()];
    s_args.extend_from_slice(serve);
    let mut d_args = vec![
        "--num-queues",
        "2",
        "--control",
        d_ctl.to_str().unwrap(),
        "--inactive",
    ];
    d_args.extend_from_slice(serve);
    let log = |n: &str| d.join(format!("{n}.log"));
    let mut src_d = Backend::start_with_env(Which::Ours, &img, &s_sock, &log("s"), &s_args, env);
    let mut dst_d = Backend::start_with_env(Which::Ours, &img, &d_sock, &log("d"), &d_args, env);
    src_d.wait_listening(&s_sock);
    dst_d.wait_listening(&d_sock);
    let mut s_q = Qmp::connect(&s_ctl);
    let mut d_q = Qmp::connect(&d_ctl);

    let mig = d.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let dst = Vm::start(&d_sock, d, "dst", &["--incoming", &incoming]);
    let src = Vm::start(&s_sock, d, "src", &[]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while !console_has(&src.serial, "read pass 1 of") {
        assert!(
            Instant::now() < deadline,
            "the source guest never started fio"
        );
        sleep(Duration::from_millis(100));
    }
    // Migrate while fio reads: the daemon writes the read data into guest buffers that the
    // guest's CPU never writes, so only the daemon's dirty marks make the migration send them
    // again.
    sleep(Duration::from_millis(500));
    let mut sq = src.qmp(d, "src");
    ok(
        &mut sq,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "pause-before-switchover", "state": true}]}),
    );
    ok(&mut sq, "migrate", json!({"uri": incoming}));
    let ok_guest = match plan {
        Plan::Cancel => {
            sleep(Duration::from_millis(300));
            ok(&mut sq, "migrate_cancel", json!({}));
            let st = wait_migration(&mut sq, &["cancelled", "pre-switchover"]);
            if st == "pre-switchover" {
                // Too late to cancel before the pause: cancel at the pause instead.
                ok(&mut sq, "migrate_cancel", json!({}));
                wait_migration(&mut sq, &["cancelled"]);
            }
            drop(dst);
            let r = ok(&mut sq, "query-status", json!({}));
            assert_eq!(r["running"], true, "the source must run on: {r}");
            src.finish("source after a cancelled migration")
        }
        Plan::Migrate => {
            let st = wait_migration(&mut sq, &["pre-switchover"]);
            assert_eq!(st, "pre-switchover");
            ok(&mut s_q, "blockdev-set-active", json!({"active": false}));
            ok(&mut d_q, "blockdev-set-active", json!({"active": true}));
            ok(
                &mut sq,
                "migrate-continue",
                json!({"state": "pre-switchover"}),
            );
            let st = wait_migration(&mut sq, &["completed"]);
            assert_eq!(st, "completed", "the migration failed");
            let _ = sq.cmd("quit", json!({}));
            let _ = src.finish("source (quit after migrating)");
            dst.finish("destination")
        }
    };
    drop(sq);
    drop(s_q);
    drop(d_q);
    let s_exit = src_d.terminate();
    let d_exit = dst_d.terminate();
    eprintln!(
        "source daemon log:\n{}\ndestination daemon log:\n{}",
        src_d.log_text(),
        dst_d.log_text()
    );
    assert_eq!(s_exit.code(), Some(0), "source daemon exit");
    assert_eq!(d_exit.code(), Some(0), "destination daemon exit");
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    ok_guest
}

#[test]
fn guest_migrates_with_its_disk_handed_over() {
    assert!(
        run(&[], &[], Plan::Migrate, &[]).passed,
        "the guest failed after migrating"
    );
}

#[test]
fn guest_migrates_with_dedup_inline() {
    assert!(
        run(&["--dedup"], &["--dedup", "inline"], Plan::Migrate, &[]).passed,
        "the guest failed after migrating"
    );
}

#[test]
fn guest_migrates_with_lazy_refcounts() {
    assert!(
        run(
            &["--lazy-refcounts"],
            &["--lazy-refcounts", "on"],
            Plan::Migrate,
            &[]
        )
        .passed,
        "the guest failed after migrating"
    );
}

/// The control: with the daemons' dirty marking switched off, the destination gets stale
/// guest pages (data the daemon read into buffers only the device writes) and the guest's
/// check of what it read must fail. Proves the tests above can see missing logging.
#[test]
fn control_without_dirty_marks_the_guest_sees_stale_data() {
    let env = [(vhost_user_qcow2::vhost::dirty_log::NO_MARKS_ENV, "1")];
    let out = run(&[], &[], Plan::Migrate, &env);
    assert!(
        !out.passed,
        "the guest passed although the daemons marked no dirty pages"
    );
    // Failing for another reason (no boot, a hang) would prove nothing about the marks.
    assert!(
        out.console.contains("differs from the first read"),
        "the guest failed, but not on the comparison of what it read"
    );
}

#[test]
fn a_cancelled_migration_leaves_the_source_serving() {
    assert!(
        run(&[], &[], Plan::Cancel, &[]).passed,
        "the guest failed after a cancelled migration"
    );
}
