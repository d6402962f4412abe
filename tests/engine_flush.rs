//! Guest flushes: a flush makes durable everything that completed before it (in-place writes
//! included), a flush with nothing new costs no sync, and concurrent flushes share syncs
//! without any of them returning before its own writes are durable.

mod common;

use common::hooked::Hooked;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage, Storage};

const SIZE: u64 = 64 << 20;

/// FaultStorage whose syncs are slowed by `delay` (so flushes overlap) and counted.
fn slow_sync(lazy: bool, delay: Duration) -> (Arc<Hooked<FaultStorage>>, Arc<AtomicU64>) {
    let syncs = Arc::new(AtomicU64::new(0));
    let mut st = Hooked::new(FaultStorage::new(image(lazy), None));
    let n = syncs.clone();
    st.on_flush = Some(Box::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
    }));
    (Arc::new(st), syncs)
}

fn image(lazy: bool) -> Vec<u8> {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: SIZE,
        cluster_bits: 16,
        lazy_refcounts: lazy,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    mem.snapshot()
}

fn open(st: Arc<dyn Storage>, lazy: bool) -> Qcow2 {
    let opts = OpenOptions {
        lazy_refcounts: Some(lazy),
        ..Default::default()
    };
    Qcow2::open_storage(st, &opts, None, 0).unwrap()
}

/// What a reader of the disk after power loss at this moment sees at `off`.
fn durable_read(st: &FaultStorage, off: u64, len: usize) -> Vec<u8> {
    let q = Qcow2::open_storage(
        Arc::new(MemStorage::from_vec(
            st.crashed_image(CrashMode::FlushedOnly),
        )),
        &OpenOptions::read_only(true),
        None,
        0,
    )
    .unwrap();
    let mut buf = vec![0u8; len];
    q.read_vectored(off, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    buf
}

#[test]
fn flush_after_in_place_write_syncs_and_idle_flush_does_not() {
    for lazy in [false, true] {
        let (st, sync_count) = slow_sync(lazy, Duration::ZERO);
        let q = open(st.clone(), lazy);
        q.write_vectored(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        q.flush().unwrap();
        assert_eq!(durable_read(&st.inner, 0, 4096), vec![1u8; 4096]);
        // Nothing new: no sync, no write.
        let (ops, syncs) = (st.inner.writes(), sync_count.load(Ordering::SeqCst));
        q.flush().unwrap();
        q.flush().unwrap();
        assert_eq!(st.inner.writes(), ops, "lazy {lazy}: idle flush wrote");
        assert_eq!(
            sync_count.load(Ordering::SeqCst),
            syncs,
            "lazy {lazy}: idle flush synced"
        );
        // An in-place write (no metadata change) still needs the next flush's sync.
        q.write_vectored(512, &[IoSlice::new(&[2u8; 1024])])
            .unwrap();
        assert_eq!(durable_read(&st.inner, 512, 1024), vec![1u8; 1024]);
        q.flush().unwrap();
        assert_eq!(durable_read(&st.inner, 512, 1024), vec![2u8; 1024]);
        // So does a discard.
        q.discard(0, 65536).unwrap();
        q.flush().unwrap();
        assert_eq!(durable_read(&st.inner, 0, 4096), vec![0u8; 4096]);
        let s = q.stats();
        assert_eq!(s.flushes_without_sync, 2, "lazy {lazy}: {s:?}");
        q.close().unwrap();
    }
}

#[test]
fn concurrent_flushes_share_syncs_and_each_covers_its_writes() {
    for lazy in [false, true] {
        let (st, _) = slow_sync(lazy, Duration::from_millis(3));
        let q = Arc::new(open(st.clone(), lazy));
        let threads = 4u64;
        let rounds = 25u64;
        let mut hs = Vec::new();
        for t in 0..threads {
            let (q, st) = (q.clone(), st.clone());
            hs.push(std::thread::spawn(move || {
                for i in 0..rounds {
                    // A new cluster each time (data + L2 entry), then an in-place rewrite of
                    // part of the previous one.
                    let off = (i * threads + t) << 16;
                    let v = (t * rounds + i) as u8 | 1;
                    q.write_vectored(off, &[IoSlice::new(&[v; 4096])]).unwrap();
                    if i > 0 {
                        let prev = off - (threads << 16);
                        q.write_vectored(prev + 8192, &[IoSlice::new(&[v; 512])])
                            .unwrap();
                    }
                    q.flush().unwrap();
                    assert_eq!(durable_read(&st.inner, off, 4096), vec![v; 4096]);
                    if i > 0 {
                        let prev = off - (threads << 16);
                        assert_eq!(durable_read(&st.inner, prev + 8192, 512), vec![v; 512]);
                    }
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        let s = q.stats();
        assert_eq!(s.flush_syncs + s.flushes_without_sync, threads * rounds);
        assert!(
            s.flush_syncs < threads * rounds,
            "lazy {lazy}: flushes overlapping a 3 ms sync must share it: {s:?}"
        );
        q.close().unwrap();
    }
}
