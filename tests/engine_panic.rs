//! A failure between plan and link (here: a panic in the data write, as a bug in a decompressor
//! or a storage layer would raise) fails that request only. What it registered (guest clusters
//! being allocated, the I/O in flight, a dedup record set before the data) is undone, so other
//! requests to the same clusters, flushes and frees go on, and no later write links to data
//! that never landed.

mod common;

use common::hooked::Hooked;
use std::io::{IoSlice, IoSliceMut};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::MemStorage;

const CS: u64 = 4096;

/// An image on storage whose data writes panic while `armed` is set (metadata writes go on).
fn image(dedup: bool, armed: Arc<AtomicBool>) -> (Arc<Qcow2>, Arc<Hooked<MemStorage>>) {
    let mem = MemStorage::new();
    create(
        &mem,
        &CreateOptions {
            size: 64 << 20,
            cluster_bits: 12,
            dedup,
            ..Default::default()
        },
    )
    .unwrap();
    let mut st = Hooked::new(mem);
    let a = armed.clone();
    st.on_writev = Some(Box::new(move |_| {
        if a.load(Ordering::SeqCst) {
            panic!("injected panic in a data write");
        }
    }));
    st.on_write = Some(Box::new(move |buf, _| {
        // Data writes of whole clusters (the dedup path writes those with write_at); metadata
        // writes in these tests are never a cluster of 0x5a.
        if armed.load(Ordering::SeqCst) && buf.len() as u64 == CS && buf.iter().all(|&b| b == 0x5a)
        {
            panic!("injected panic in a dedup data write");
        }
    }));
    let st = Arc::new(st);
    let opts = OpenOptions {
        dedup: Some(dedup),
        ..Default::default()
    };
    let q = Qcow2::open_storage(st.clone(), &opts, None, 0).unwrap();
    (Arc::new(q), st)
}

/// Run `f` on another thread; fail the test if it has not finished within 20 s (a request that
/// waits for ever on what the panicking one left behind).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not finish: the engine is wedged"))
}

fn write(q: &Qcow2, off: u64, byte: u8, len: u64) -> Result<(), String> {
    q.write_vectored(off, &[IoSlice::new(&vec![byte; len as usize])])
        .map_err(|e| e.to_string())
}

fn read(q: &Qcow2, off: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    q.read_vectored(off, &mut [IoSliceMut::new(&mut b)])
        .unwrap();
    b
}

#[test]
fn a_panic_between_plan_and_link_leaves_the_engine_serving() {
    let armed = Arc::new(AtomicBool::new(false));
    let (q, _st) = image(false, armed.clone());
    write(&q, 0, 1, CS).unwrap();
    q.flush().unwrap();

    // A partial write into a new cluster (allocation registered, I/O in flight) panics.
    armed.store(true, Ordering::SeqCst);
    let q2 = q.clone();
    let r = catch_unwind(AssertUnwindSafe(|| write(&q2, 5 * CS + 512, 7, 512)));
    assert!(r.is_err(), "the injected panic should have fired");
    armed.store(false, Ordering::SeqCst);

    // Another writer of the same guest cluster, a discard (its free waits for older I/O) and
    // flushes go on.
    let q2 = q.clone();
    within(
        "a write to the cluster the panicking write was allocating",
        move || {
            write(&q2, 5 * CS, 9, CS).unwrap();
            q2.discard(0, CS).unwrap();
            q2.flush().unwrap();
            q2.flush().unwrap();
        },
    );
    assert!(
        read(&q, 5 * CS, CS) == vec![9u8; CS as usize],
        "cluster 5 reads back"
    );
    assert!(
        q.stats().clusters_freed >= 1,
        "the discarded cluster's free applied (no I/O left registered)"
    );
    q.close().unwrap();
}

#[test]
fn a_panic_in_a_unique_dedup_write_leaves_no_record_and_no_hold() {
    let armed = Arc::new(AtomicBool::new(false));
    let (q, st) = image(true, armed.clone());
    // The cluster holds other data first, so the failing write goes in place (its record set
    // before the data, its entry already pointing at the old data).
    write(&q, 3 * CS, 0x11, CS).unwrap();
    q.flush().unwrap();
    armed.store(true, Ordering::SeqCst);
    let q2 = q.clone();
    let r = catch_unwind(AssertUnwindSafe(|| write(&q2, 3 * CS, 0x5a, CS)));
    assert!(r.is_err(), "the injected panic should have fired");
    armed.store(false, Ordering::SeqCst);

    // The same content elsewhere must not link to the cluster whose data never landed, and the
    // cluster itself (held by the panicking writer) can be written again.
    let q2 = q.clone();
    within("writes after the panic", move || {
        write(&q2, 10 * CS, 0x5a, CS).unwrap();
        write(&q2, 3 * CS, 0x33, CS).unwrap();
        q2.flush().unwrap();
    });
    assert!(
        read(&q, 10 * CS, CS) == vec![0x5a; CS as usize],
        "cluster 10 must hold what was written, not a link to data that never landed"
    );
    assert!(
        read(&q, 3 * CS, CS) == vec![0x33; CS as usize],
        "cluster 3 reads back"
    );
    q.close().unwrap();

    // The image is consistent for QEMU (a leak of the cluster the panic left is allowed).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("after-panic.qcow2");
    std::fs::write(&p, st.inner.snapshot()).unwrap();
    let (code, out) = common::qemu_img(&["check", p.to_str().unwrap()]);
    assert!(code == 0 || code == 3, "qemu-img check exit {code}:\n{out}");
}
