//! Dedup through the daemon with the blkio client: a 50% duplicate workload over two queues,
//! then a SIGKILL in the middle of dedup writes, a restart, a check and a read-back.

mod common;

use blkio::ReqFlags;
use common::client::*;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");
const CS: usize = 65536;

/// Cluster `i`'s content: every other cluster repeats one of 4 patterns, the rest are unique.
fn content(i: usize, round: usize) -> Vec<u8> {
    if i.is_multiple_of(2) {
        pattern(1000 + (i / 2 % 4) as u64, CS)
    } else {
        pattern((round * 100_000 + i) as u64, CS)
    }
}

/// Write clusters `0..n` over two queues, `DEPTH` requests in flight per queue.
fn write_all(c: &mut Client, n: usize, round: usize) {
    let per_batch = 2 * DEPTH.min(40);
    let mut i = 0;
    while i < n {
        let batch = per_batch.min(n - i);
        let mut counts = [0usize; 2];
        for k in 0..batch {
            let q = k % 2;
            let data = content(i + k, round);
            c.buf(k * CS, CS).copy_from_slice(&data);
            let p = c.ptr(k * CS);
            c.queues[q].write(((i + k) * CS) as u64, p, CS, k, ReqFlags::empty());
            counts[q] += 1;
        }
        for (q, &cnt) in counts.iter().enumerate() {
            for (slot, ret) in c.reap(q, cnt) {
                assert_eq!(ret, 0, "write {slot}");
            }
        }
        i += batch;
    }
}

#[test]
fn half_duplicate_workload_over_two_queues() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let sock = dir.path().join("d.sock");
    common::create_with_cli(&img, "64M", &[]);
    let mut child = spawn_binary(&img, &sock, &["--num-queues", "2", "--dedup", "on"]);
    wait_for(&sock);
    let mut cl = Client::connect(&sock, 2, false).unwrap();
    let n = 200;
    write_all(&mut cl, n, 0);
    for i in (0..n).step_by(7) {
        assert_eq!(cl.read(i % 2, (i * CS) as u64, 0, CS), 0);
        assert!(cl.buf(0, CS) == content(i, 0).as_slice(), "cluster {i}");
    }
    drop(cl);
    // SAFETY (test): signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    assert!(st.success(), "{}", stderr_of(&mut child));
    common::assert_check_clean(&img);
    // 100 unique clusters + 4 repeated contents: within 2% of the ideal.
    let phys = common::physical_clusters(&img, CS as u64);
    assert_eq!(phys, n / 2 + 4, "physical clusters");
    let raw = dir.path().join("d.raw");
    let mut model = vec![0u8; 64 << 20];
    for i in 0..n {
        model[i * CS..(i + 1) * CS].copy_from_slice(&content(i, 0));
    }
    std::fs::write(&raw, &model).unwrap();
    common::assert_same_as_raw(&img, &raw);
}

#[test]
fn sigkill_during_dedup_writes_then_restart() {
    for lazy in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("k.qcow2");
        let sock = dir.path().join("k.sock");
        common::create_with_cli(&img, "64M", &[]);
        let args = [
            "--num-queues",
            "2",
            "--dedup",
            "on",
            "--lazy-refcounts",
            lazy,
            "--refcount-flush-interval",
            "3600",
        ];
        let mut child = spawn_binary(&img, &sock, &args);
        wait_for(&sock);
        let mut cl = Client::connect(&sock, 2, false).unwrap();
        let n = 120;
        write_all(&mut cl, n, 0);
        assert_eq!(cl.one(0, |q| q.flush(0, ReqFlags::empty())), 0);
        // Unflushed dedup writes (and overwrites) in flight when the daemon dies.
        for k in 0..DEPTH {
            let data = content(k * 3, 1);
            cl.buf(k * CS, CS).copy_from_slice(&data);
            let p = cl.ptr(k * CS);
            cl.queues[k % 2].write(((n + k) * CS) as u64, p, CS, k, ReqFlags::empty());
        }
        // SAFETY (test): signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
        let _ = child.wait();
        drop(cl);
        let (code, out) = common::qemu_img(&["check", img.to_str().unwrap()]);
        let dirty = std::fs::read(&img).unwrap()[79] & 1 != 0;
        assert!(dirty || code == 0 || code == 3, "lazy {lazy}: {out}");
        // Restart: a dirty image is repaired on open; every flushed write reads back.
        std::fs::remove_file(&sock).unwrap();
        let mut child = spawn_binary(&img, &sock, &args);
        wait_for(&sock);
        let mut cl = Client::connect(&sock, 2, false).unwrap();
        for i in 0..n {
            let r = cl.read(i % 2, (i * CS) as u64, 0, CS);
            if r != 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "lazy {lazy}: read of cluster {i} failed ({r}); daemon log:\n{}",
                    stderr_of(&mut child)
                );
            }
            assert!(
                cl.buf(0, CS) == content(i, 0).as_slice(),
                "lazy {lazy}: cluster {i} lost"
            );
        }
        drop(cl);
        // SAFETY (test): signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
        common::assert_check_clean(&img);
    }
}

#[test]
fn setting_and_counters_persist_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    let sock = dir.path().join("p.sock");
    let p = img.to_str().unwrap();
    common::create_with_cli(&img, "64M", &["--dedup"]);
    let info = |img: &str| -> serde_json::Value {
        let (c, o) = common::run(BIN, &["info", img, "--output", "json"]);
        assert_eq!(c, 0, "{o}");
        serde_json::from_str(&o).unwrap()
    };
    assert_eq!(info(p)["dedup"]["mode"], "inline");
    assert_eq!(info(p)["dedup"]["clusters-deduplicated"], 0);
    // No --dedup flag: the image's setting applies.
    let mut child = spawn_binary(&img, &sock, &["--num-queues", "2"]);
    wait_for(&sock);
    let mut cl = Client::connect(&sock, 2, false).unwrap();
    write_all(&mut cl, 40, 0);
    drop(cl);
    // SAFETY (test): signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    let d = &info(p)["dedup"];
    assert_eq!(d["clusters-written-unique"], 24, "{d}");
    assert_eq!(d["clusters-deduplicated"], 16, "{d}");
    assert_eq!(d["bytes-saved"], 16 * CS as u64, "{d}");
    common::assert_check_clean(&img);
    // Stock QEMU keeps reading, writing and converting it; our extension survives its writes.
    common::qemu_io(&img, "qcow2", &["write -P 3 32M 64k", "read -P 3 32M 64k"]);
    common::assert_check_clean(&img);
    assert_eq!(info(p)["dedup"]["clusters-deduplicated"], 16);
    let out = dir.path().join("conv.qcow2");
    let (c, o) = common::qemu_img(&["convert", "-O", "qcow2", p, out.to_str().unwrap()]);
    assert_eq!(c, 0, "{o}");
    let (c, o) = common::qemu_img(&["compare", p, out.to_str().unwrap()]);
    assert_eq!(c, 0, "{o}");
}
