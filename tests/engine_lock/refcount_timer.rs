//! The lazy-refcount timer (`Qcow2::flush_refcounts`) writes the refcount blocks it held back
//! without the metadata lock: a read on another queue goes on while those writes are slow
//! (with `--cache none` each is a trip to the disk), and so does its clear of DIRTY.

use super::*;
use vhost_user_qcow2::qcow2::format::header::OFF_INCOMPATIBLE;

#[test]
fn the_refcount_timer_writes_blocks_without_the_metadata_lock() {
    let img = new_image(64 << 20, false).snapshot();
    let block = refcount_block_0(&img);
    assert_ne!(block, 0);
    let (hooked, gate) = Gate::writes(img, block, true);
    let opts = OpenOptions {
        lazy_refcounts: Some(true),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(hooked.clone(), &opts, None, 0).unwrap());
    // Cluster 0 allocated and durable, then 8 more: refcount block 0 is dirty (lazy).
    q.write_vectored(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
    q.flush_refcounts().unwrap();
    for i in 1..9u64 {
        q.write_vectored(i * 4096, &[IoSlice::new(&[2u8; 4096])])
            .unwrap();
    }
    q.flush_all().unwrap();
    timer_while_gated(&q, &gate, &hooked, "refcount-block write");
    q.close().unwrap();
}

/// Runs the timer with `gate` closed and reads cluster 0 (written with 1s) meanwhile: the
/// timer waited at the gate once (its `what`), the read did not wait for it. Then the file as
/// the timer left it has DIRTY clear and checks clean, with no repair.
fn timer_while_gated(q: &Arc<Qcow2>, gate: &Gate, hooked: &Hooked<MemStorage>, what: &str) {
    let (took, first, timer) = read_while_gated(q, gate, 0, |q| q.flush_refcounts());
    timer.unwrap();
    assert_eq!(gate.held(), 1, "the timer's {what} waited at the gate");
    assert_eq!(first, 1);
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for the timer's {what}"
    );
    use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
    let now = hooked.inner.snapshot();
    assert_eq!(now[79] & 1, 0, "DIRTY cleared");
    let r = check(&MemStorage::from_vec(now), &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

/// The timer's last step, the header write that clears DIRTY, runs without the metadata lock
/// too (under `--cache none` a read-modify-write of the header's sector on the disk).
#[test]
fn the_refcount_timer_clears_dirty_without_the_metadata_lock() {
    let img = new_image(64 << 20, false).snapshot();
    let (hooked, gate) = Gate::writes(img, OFF_INCOMPATIBLE, true);
    let opts = OpenOptions {
        lazy_refcounts: Some(true),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(hooked.clone(), &opts, None, 0).unwrap());
    // Tables in the file ahead of their refcounts: DIRTY set in the file.
    for i in 0..9u64 {
        q.write_vectored(i * 4096, &[IoSlice::new(&[1u8; 4096])])
            .unwrap();
    }
    q.flush_all().unwrap();
    assert_eq!(hooked.inner.snapshot()[79] & 1, 1, "DIRTY set");
    timer_while_gated(&q, &gate, &hooked, "DIRTY clear");
    // A later allocation and flush set DIRTY again before their tables go out.
    q.write_vectored(20 * 4096, &[IoSlice::new(&[2u8; 4096])])
        .unwrap();
    q.flush_all().unwrap();
    assert_eq!(hooked.inner.snapshot()[79] & 1, 1, "DIRTY set again");
    q.close().unwrap();
}
