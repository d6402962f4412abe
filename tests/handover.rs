//! Handing an image over between two daemons on the same file, as a live migration does
//! (issue 18): daemon A serves it, daemon B starts `--inactive` (no lock, nothing read but the
//! header), a client writes through A without flushing, `blockdev-set-active false` on A
//! writes everything and releases the image, `blockdev-set-active true` on B opens it, and a
//! read that reached B while it was inactive completes with A's data. Also: B cannot take the
//! image while A holds it, and both daemons exit 0 leaving a clean image.

mod common;

use common::client::*;
use common::qmp::Qmp;
use serde_json::json;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(img: &Path, dir: &Path, name: &str, extra: &[&str]) -> Proc {
    let ctl = dir.join(format!("{name}.ctl"));
    let mut args = vec!["--control", ctl.to_str().unwrap(), "--num-queues", "1"];
    args.extend_from_slice(extra);
    let p = Proc(spawn_binary(img, &dir.join(format!("{name}.sock")), &args));
    wait_for(&ctl);
    wait_for(&dir.join(format!("{name}.sock")));
    p
}

fn active(q: &mut Qmp) -> bool {
    q.ok("query-status")["active"].as_bool().unwrap()
}

fn set_active(q: &mut Qmp, on: bool) -> serde_json::Value {
    q.cmd("blockdev-set-active", json!({"active": on}))
}

fn handover(create: &[&str], serve: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.qcow2");
    common::create_with_cli(&img, "64M", create);
    let mut a = start(&img, d, "a", serve);
    let mut b_args = serve.to_vec();
    b_args.push("--inactive");
    let mut b = start(&img, d, "b", &b_args);
    let mut qa = Qmp::connect(&d.join("a.ctl"));
    let mut qb = Qmp::connect(&d.join("b.ctl"));
    assert!(active(&mut qa));
    assert!(!active(&mut qb));
    assert!(
        qb.cmd("query-image", json!({}))["error"].is_object(),
        "an inactive daemon has no image to describe"
    );
    // A holds the image: B cannot take it.
    let r = set_active(&mut qb, true);
    assert!(r["error"].is_object(), "B activated beside A: {r}");
    assert!(!active(&mut qb));

    // Writes through A, never flushed.
    let mut ca = connect_or_fail(&mut a.0, &d.join("a.sock"), 1);
    let bs = 64 * 1024;
    for i in 0..16usize {
        ca.buf(0, bs).copy_from_slice(&pattern(i as u64, bs));
        assert_eq!(ca.write(0, (i * 3 * bs) as u64, 0, bs), 0);
    }
    // A VMM on B (the destination) sends a request before the switch-over.
    let mut cb = connect_or_fail(&mut b.0, &d.join("b.sock"), 1);
    let p = cb.ptr(0);
    cb.queues[0].read((5 * 3 * bs) as u64, p, bs, 7, blkio::ReqFlags::empty());
    std::thread::sleep(Duration::from_millis(200));

    assert_eq!(set_active(&mut qa, false), json!({"return": {}}));
    assert!(!active(&mut qa));
    // A left the image closed cleanly: nothing for B to repair or rebuild.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
        .args(["info", "--output", "json"])
        .arg(&img)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["dirty-flag"], false, "{info}");
    assert_eq!(set_active(&mut qb, true), json!({"return": {}}));
    assert!(active(&mut qb));
    let done = cb.reap(0, 1);
    assert_eq!(
        done,
        vec![(7, 0)],
        "the waiting read must complete after activation"
    );
    assert!(
        cb.buf(0, bs) == &pattern(5, bs)[..],
        "the waiting read got other data"
    );
    for i in 0..16usize {
        assert_eq!(cb.read(0, (i * 3 * bs) as u64, 0, bs), 0);
        assert!(
            cb.buf(0, bs) == &pattern(i as u64, bs)[..],
            "block {i} differs after the handover"
        );
    }
    assert!(qb.ok("query-image")["virtual-size"].is_u64());
    drop(ca);
    drop(cb);
    let mut logs = Vec::new();
    for (q, mut p) in [(qa, a), (qb, b)] {
        let mut q = q;
        assert_eq!(q.cmd("quit", json!({})), json!({"return": {}}));
        let st = wait_exit(&mut p.0, Duration::from_secs(30));
        let log = stderr_of(&mut p.0);
        assert!(st.success(), "exit {st:?}: {log}");
        logs.push(log);
    }
    assert!(
        !logs[1].contains("repairing"),
        "B repaired the image:\n{}",
        logs[1]
    );
    if create.contains(&"--dedup") {
        assert!(
            logs[1].contains("dedup index loaded"),
            "B did not load A's dedup index:\n{}",
            logs[1]
        );
    }
    common::assert_check_clean(&img);
}

#[test]
fn an_image_moves_between_two_daemons() {
    handover(&[], &[]);
}

#[test]
fn an_image_moves_between_two_daemons_with_lazy_refcounts() {
    handover(&["--lazy-refcounts"], &["--lazy-refcounts", "on"]);
}

#[test]
fn an_image_moves_between_two_daemons_with_dedup() {
    handover(&["--dedup"], &["--dedup", "inline"]);
}
