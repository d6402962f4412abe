//! A daemon crash the guest never notices: a TCG guest (2 vCPUs, 2 queues) runs rounds of fio
//! randwrite with crc32c verify (direct I/O, no flush until fio ends) on a disk whose QEMU
//! chardev has `reconnect-ms`, while the test SIGKILLs our daemon at random moments and starts
//! it again with the same flags on the same image. The guest must pass (no I/O error, no hang,
//! every write it saw complete reads back), the last daemon must exit 0 on SIGTERM, and
//! `qemu-img check` must find no corruption (leaks allowed: exit 0 or 3). One of the stops is
//! a SIGTERM (a planned upgrade: the daemon must exit 0 and the guest only pauses).
//!
//! The seed of the kill schedule is printed; `VUQ_RESTART_SEED` replays one.

mod common;

use common::guest::{boot_command, passed, Backend, Which};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The stop (counted from 1) that is a SIGTERM, as a planned upgrade does, not a SIGKILL.
const PLANNED: usize = 3;

/// One guest at a time.
static GUEST: Mutex<()> = Mutex::new(());

struct Case {
    name: &'static str,
    /// `create` arguments for the image (beside size and path).
    create: &'static [&'static str],
    serve: &'static [&'static str],
    event_idx: &'static str,
    /// Queues of the guest's disk.
    queues: &'static str,
    kills: usize,
}

/// A small xorshift generator: the schedule only needs to vary and be replayable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn seed() -> u64 {
    match std::env::var("VUQ_RESTART_SEED") {
        Ok(s) => s.parse().expect("VUQ_RESTART_SEED must be a number"),
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        }
    }
}

fn console_has(serial: &Path, what: &str) -> bool {
    fs::read_to_string(serial).is_ok_and(|s| s.contains(what))
}

/// How a guest under kills ended.
struct Outcome {
    passed: bool,
    /// The guest's serial console.
    console: String,
}

/// Run `case`.
fn crash_run(case: &Case) -> Outcome {
    let _turn = GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("vhost.sock");
    let serial = dir.path().join("serial.log");
    let log = dir.path().join("backend.log");
    let bin = env!("CARGO_BIN_EXE_vhost-user-qcow2");
    let out = Command::new(bin)
        .arg("create")
        .arg(&img)
        .args(["--size", "1G"])
        .args(case.create)
        .output()
        .unwrap();
    assert!(out.status.success(), "create: {out:?}");

    let start = |log: &Path| {
        let mut b = Backend::start_with(Which::Ours, &img, &sock, log, case.serve);
        b.wait_listening(&sock);
        b
    };
    let mut backend = start(&log);
    let guest_out = fs::File::create(dir.path().join("guest.out")).unwrap();
    let mut guest = boot_command(
        &sock,
        &serial,
        &[
            "--mode",
            "crash",
            "--rounds",
            "3",
            "--fio-size",
            "32M",
            "--reconnect-ms",
            "200",
            "--event-idx",
            case.event_idx,
            "--queues",
            case.queues,
        ],
    )
    .stdin(Stdio::null())
    .stdout(guest_out.try_clone().unwrap())
    .stderr(guest_out)
    .spawn()
    .unwrap();

    // Kill only once fio runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !console_has(&serial, "crash round 1") {
        assert!(
            Instant::now() < deadline && guest.try_wait().unwrap().is_none(),
            "{}: the guest never started fio:\n{}",
            case.name,
            fs::read_to_string(&serial).unwrap_or_default()
        );
        sleep(Duration::from_millis(100));
    }
    let seed = seed();
    eprintln!(
        "{}: kill schedule seed {seed} (VUQ_RESTART_SEED)",
        case.name
    );
    let mut rng = Rng(seed);
    let mut kills = 0;
    while kills < case.kills {
        sleep(Duration::from_millis(rng.between(300, 2500)));
        if guest.try_wait().unwrap().is_some() {
            break;
        }
        kills += 1;
        if kills == PLANNED {
            // A planned upgrade: SIGTERM finishes what is in flight and closes the image clean.
            let exit = backend.terminate();
            assert_eq!(exit.code(), Some(0), "{}: SIGTERM must exit 0", case.name);
            eprintln!(
                "{}: daemon stopped with SIGTERM ({kills}), starting it again",
                case.name
            );
        } else {
            backend.kill9();
            // The dead daemon's socket file stays; the next one replaces it.
            let _ = fs::remove_file(&sock);
            eprintln!("{}: daemon killed ({kills}), starting it again", case.name);
        }
        backend = start(&log);
    }
    let status = guest.wait().unwrap();
    let guest_output = std::process::Output {
        status,
        stdout: fs::read(dir.path().join("guest.out")).unwrap_or_default(),
        stderr: Vec::new(),
    };
    let ok = passed(&guest_output, &serial, "crash");
    let exit = backend.terminate();
    let console = fs::read_to_string(&serial).unwrap_or_default();
    let tail: Vec<&str> = console.lines().rev().take(40).collect();
    eprintln!(
        "{}: {kills} kills; guest console (last lines):\n{}",
        case.name,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let backend_log = backend.log_text();
    let log_tail: Vec<&str> = backend_log.lines().rev().take(60).collect();
    eprintln!(
        "backend log (last lines):\n{}",
        log_tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "{}: the last daemon must exit 0",
        case.name
    );
    // A pass means something only if the daemon died under the guest.
    assert!(
        !ok || kills >= 2,
        "{}: the guest finished before the daemon was killed twice",
        case.name
    );
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{}: qemu-img check: {}{}",
        case.name,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    Outcome {
        passed: ok,
        console,
    }
}

/// Lazy refcounts, inline dedup, EVENT_IDX on (QEMU's default), buffered I/O.
#[test]
fn sigkilled_daemon_is_invisible_lazy_dedup_event_idx() {
    let case = Case {
        name: "lazy+dedup",
        create: &["--lazy-refcounts", "--dedup"],
        serve: &["--lazy-refcounts", "on", "--dedup", "inline"],
        event_idx: "on",
        queues: "2",
        kills: 5,
    };
    assert!(crash_run(&case).passed, "{}: the guest failed", case.name);
}

/// Strict refcounts, O_DIRECT, EVENT_IDX off, one queue.
#[test]
fn sigkilled_daemon_is_invisible_strict_cache_none() {
    let case = Case {
        name: "strict+none",
        create: &[],
        serve: &["--lazy-refcounts", "off", "--cache", "none"],
        event_idx: "off",
        queues: "1",
        kills: 5,
    };
    assert!(crash_run(&case).passed, "{}: the guest failed", case.name);
}

/// Background dedup, strict refcounts, EVENT_IDX on.
#[test]
fn sigkilled_daemon_is_invisible_background_dedup() {
    let case = Case {
        name: "background dedup",
        create: &["--dedup"],
        serve: &["--lazy-refcounts", "off", "--dedup", "background"],
        event_idx: "on",
        queues: "2",
        kills: 5,
    };
    assert!(crash_run(&case).passed, "{}: the guest failed", case.name);
}

/// The control: with the metadata of acknowledged writes kept in memory only
/// (`--ack-durability memory`), a SIGKILL loses writes the guest saw complete, and the guest's
/// verify must fail. Proves the tests above can see the loss. The lazy-refcount timer would
/// write the tables every 5 s (and so shrink the window a kill must hit to a few seconds after
/// new clusters were written); with it at an hour only the SIGTERM of the planned stop writes
/// them, and every round allocates, so kills 1 and 2 lose whatever round 1 wrote before them.
#[test]
fn control_without_ack_durability_the_guest_sees_lost_writes() {
    let case = Case {
        name: "control (memory)",
        create: &["--lazy-refcounts"],
        serve: &[
            "--lazy-refcounts",
            "on",
            "--ack-durability",
            "memory",
            "--refcount-flush-interval",
            "3600",
        ],
        event_idx: "on",
        queues: "2",
        kills: 5,
    };
    let out = crash_run(&case);
    assert!(
        !out.passed,
        "{}: the guest passed although acknowledged metadata stayed in memory",
        case.name
    );
    // Failing for another reason (no boot, a hang) would prove nothing about lost writes.
    assert!(
        out.console.contains("FAIL fio verify in crash round"),
        "{}: the guest failed, but not on fio's verify",
        case.name
    );
}
