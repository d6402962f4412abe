//! The daemon serving qcow2 images through the engine, driven by the real blkio client: both
//! queues writing into the same clusters at once, flush, discard, write-zeroes, then SIGTERM, a
//! clean exit, `qemu-img check` exit 0 and `qemu-img compare` against what was written.

mod common;

use blkio::ReqFlags;
use common::client::*;
use std::time::Duration;

fn sigterm_and_wait(child: &mut std::process::Child) {
    // SAFETY (test): sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_exit(child, Duration::from_secs(30));
    let log = stderr_of(child);
    assert!(st.success(), "exit status {st:?}; log:\n{log}");
}

#[test]
fn two_queues_into_the_same_clusters_then_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let raw = dir.path().join("model.raw");
    let sock = dir.path().join("d.sock");
    let size = 64usize << 20;
    common::create_with_cli(&img, "64M", &["--cluster-size", "64K"]);
    let mut child = spawn_binary(&img, &sock, &["--num-queues", "2"]);
    wait_for(&sock);
    let mut c = Client::connect(&sock, 2, false).unwrap();
    let mut model = vec![0u8; size];
    let bs = 4096usize;
    // Queue 0 writes the even 4 KiB blocks and queue 1 the odd ones of the same clusters, all
    // requests of both queues in flight together: the allocation race of two writers into one
    // unallocated cluster, over and over.
    for round in 0..8usize {
        for q in 0..2usize {
            for i in 0..DEPTH {
                let slot = q * DEPTH + i;
                let block = round * 2 * DEPTH + 2 * i + q;
                let disk = block * bs * 5; // strided: several clusters, several blocks each
                let data = pattern((round * 100 + slot) as u64, bs);
                c.buf(slot * bs, bs).copy_from_slice(&data);
                model[disk..disk + bs].copy_from_slice(&data);
                let p = c.ptr(slot * bs);
                c.queues[q].write(disk as u64, p, bs, slot, ReqFlags::empty());
            }
        }
        for q in 0..2 {
            for (slot, ret) in c.reap(q, DEPTH) {
                assert_eq!(ret, 0, "write slot {slot}");
            }
        }
    }
    assert_eq!(c.one(1, |q| q.flush(0, ReqFlags::empty())), 0);
    // A large sequential write, a discard and write-zeroes (with and without unmap).
    let big = pattern(7, 1 << 20);
    c.buf(0, big.len()).copy_from_slice(&big);
    assert_eq!(c.write(0, 40 << 20, 0, big.len()), 0);
    model[40 << 20..(40 << 20) + big.len()].copy_from_slice(&big);
    assert_eq!(
        c.one(0, |q| q.discard(40 << 20, 256 << 10, 0, ReqFlags::empty())),
        0
    );
    model[40 << 20..(40 << 20) + (256 << 10)].fill(0);
    assert_eq!(
        c.one(1, |q| q.write_zeroes(
            (41 << 20) - 4096,
            8192,
            0,
            ReqFlags::NO_UNMAP
        )),
        0
    );
    model[(41 << 20) - 4096..(41 << 20) + 4096].fill(0);
    assert_eq!(
        c.one(0, |q| q.write_zeroes(0, 128 << 10, 0, ReqFlags::empty())),
        0
    );
    model[..128 << 10].fill(0);
    // Read everything back through the other queue and compare.
    for chunk in 0..(size / (4 << 20)) {
        let off = chunk * (4 << 20);
        assert_eq!(c.read(chunk % 2, off as u64, 0, 4 << 20), 0);
        assert!(
            c.buf(0, 4 << 20) == &model[off..off + (4 << 20)],
            "read back differs at {off}"
        );
    }
    sigterm_and_wait(&mut child);
    drop(c);
    std::fs::write(&raw, &model).unwrap();
    common::assert_check_clean(&img);
    common::assert_same_as_raw(&img, &raw);
}
