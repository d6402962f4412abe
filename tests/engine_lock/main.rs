//! What the metadata lock must not wait for: an L2 table read from the file (a cache miss) on
//! one request does not stop another request's planning.

#[path = "../common/mod.rs"]
mod common;

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod dedup_lookups;
mod records_dirty;
mod refcount_reads;
mod refcount_timer;
mod table_growth;

use common::hooked::Hooked;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{create, AckDurability, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage, Storage};

/// The host offset of the L2 table for guest cluster `gc` (4 KiB clusters: 512 entries each).
fn l2_offset(img: &[u8], gc: u64) -> u64 {
    let be = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    be(l1 + (gc / 512) as usize * 8) & 0x00ff_ffff_ffff_fe00
}

/// A new image in memory: `size` bytes, 4 KiB clusters, with or without a dedup index.
fn new_image(size: u64, dedup: bool) -> Arc<MemStorage> {
    let mem = Arc::new(MemStorage::new());
    let o = CreateOptions {
        size,
        cluster_bits: 12,
        dedup,
        ..Default::default()
    };
    create(&*mem, &o).unwrap();
    mem
}

/// The options of the images of `dedup_image_over_64_tables`: inline dedup, an L2 cache of
/// 16 tables.
fn dedup_over_64_tables_opts() -> OpenOptions {
    OpenOptions {
        dedup_mode: Some(DedupMode::Inline),
        l2_cache_bytes: Some(16 * 4096),
        ..Default::default()
    }
}

/// The bytes of a 128 MiB dedup image with `first` written (offset, byte of a whole cluster),
/// then a cluster under each of its 64 tables (unique contents), closed.
fn dedup_bytes_over_64_tables(first: &[(u64, u8)]) -> Vec<u8> {
    let mem = new_image(128 << 20, true);
    {
        let q = Qcow2::open_storage(mem.clone(), &dedup_over_64_tables_opts(), None, 0).unwrap();
        for &(off, b) in first {
            q.write_vectored(off, &[IoSlice::new(&[b; 4096])]).unwrap();
        }
        for t in 0..64u64 {
            let off = (t << 21) + 8192;
            q.write_vectored(off, &[IoSlice::new(&[t as u8 + 10; 4096])])
                .unwrap();
        }
        q.close().unwrap();
    }
    mem.snapshot()
}

/// A 128 MiB dedup image whose L2 cache holds 16 of its 64 tables, with `first` written
/// (offset, byte of a whole cluster), then a cluster under each table (unique contents),
/// closed; reopened with the reads of the table of guest offset `slow` gated (closed).
fn dedup_image_over_64_tables(first: &[(u64, u8)], slow: u64) -> (Arc<Qcow2>, Gate) {
    let img = dedup_bytes_over_64_tables(first);
    let slow_table = l2_offset(&img, slow / 4096);
    let (storage, gate) = Gate::storage(img, slow_table, true);
    let q = Arc::new(Qcow2::open_storage(storage, &dedup_over_64_tables_opts(), None, 0).unwrap());
    (q, gate)
}

/// A writer fills clusters 1..n (4 KiB writes, byte i % 251, cluster 0 holds 2) until it waits
/// in a gated sync (`held() == 1`); a read and an in-place write of cluster 0 are timed then,
/// the gate released (`release`), the writer joined; then the image is checked clean and,
/// reopened, holds every write. Returns how long the read and the write took.
fn time_while_writer_held(
    q: Arc<Qcow2>,
    n: u64,
    held: impl Fn() -> u64,
    release: impl FnOnce(),
    image: impl FnOnce() -> MemStorage,
) -> Duration {
    use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
    let q2 = q.clone();
    let writer = std::thread::spawn(move || {
        for i in 1..n {
            q2.write_vectored(i * 4096, &[IoSlice::new(&[(i % 251) as u8; 4096])])?;
        }
        Ok::<(), vhost_user_qcow2::block::BlockError>(())
    });
    let t0 = Instant::now();
    while held() == 0 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(held(), 1, "the writer waits in the gated sync");
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    q.write_vectored(0, &[IoSlice::new(&[3u8; 4096])]).unwrap();
    let took = t0.elapsed();
    release();
    writer.join().unwrap().unwrap();
    assert_eq!(buf[0], 2);
    q.close().unwrap();
    drop(q);
    let img = image();
    let r = check(&img, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
    let q = Qcow2::open_storage(Arc::new(img), &OpenOptions::default(), None, 0).unwrap();
    let last = |i: u64| (i * 4096, (i % 251) as u8);
    assert_reads(&q, &[(0, 3), last(1), last(n / 2), last(n - 1)], "reopened");
    took
}

/// The host offset of refcount block 0 (from the header's refcount table).
fn refcount_block_0(img: &[u8]) -> u64 {
    let be = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap());
    be(be(48) as usize)
}

/// Wait while `gate` is closed (false), at most 10 s.
fn hold(gate: &AtomicBool) {
    let t0 = Instant::now();
    while !gate.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A gate on the reads (or the writes) of one offset: while it is closed (false), such a call
/// waits (at most 10 s) and is counted.
struct Gate {
    open: Arc<AtomicBool>,
    held: Arc<std::sync::atomic::AtomicU64>,
}

impl Gate {
    fn new(open: bool) -> Gate {
        Gate {
            open: Arc::new(AtomicBool::new(open)),
            held: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }
    /// A hook that waits at `at` while the gate is closed.
    fn hook(&self, at: u64) -> impl Fn(u64) + Send + Sync + 'static {
        let (g, n) = (self.open.clone(), self.held.clone());
        move |off| {
            if off != at || g.load(Ordering::SeqCst) {
                return;
            }
            n.fetch_add(1, Ordering::SeqCst);
            hold(&g);
        }
    }
    /// Storage over `img` whose reads at `at` wait for the gate (`open` at first).
    fn storage(img: Vec<u8>, at: u64, open: bool) -> (Arc<dyn Storage>, Gate) {
        let gate = Gate::new(open);
        let mut hooked = Hooked::new(MemStorage::from_vec(img));
        hooked.on_read = Some(Box::new(gate.hook(at)));
        (Arc::new(hooked), gate)
    }
    /// Storage over `img` whose writes at `at` wait for the gate (`open` at first).
    fn writes(img: Vec<u8>, at: u64, open: bool) -> (Arc<Hooked<MemStorage>>, Gate) {
        let gate = Gate::new(open);
        let mut hooked = Hooked::new(MemStorage::from_vec(img));
        let hook = gate.hook(at);
        hooked.on_write = Some(Box::new(move |_, off| hook(off)));
        (Arc::new(hooked), gate)
    }
    fn set(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
    /// The calls that waited at the gate.
    fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
}

/// With `gate` closed, runs `slow` on another thread; once it waits at the gate (100 ms),
/// reads the cluster at `at`. Opens the gate, joins `slow`; returns how long the read took, its
/// first byte and what `slow` returned.
fn read_while_gated<T: Send + 'static>(
    q: &Arc<Qcow2>,
    gate: &Gate,
    at: u64,
    slow: impl FnOnce(Arc<Qcow2>) -> T + Send + 'static,
) -> (Duration, u8, T) {
    gate.set(false);
    let q2 = q.clone();
    let slow = std::thread::spawn(move || slow(q2));
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(at, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    let took = t0.elapsed();
    gate.set(true);
    (took, buf[0], slow.join().unwrap())
}

/// Storage over an image whose syncs wait while the gate is closed (`close`; at most 10 s
/// each), counting the syncs that waited.
struct SyncGate {
    open: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
    held: Arc<std::sync::atomic::AtomicU64>,
    hooked: Arc<Hooked<MemStorage>>,
}

impl SyncGate {
    fn new(img: Vec<u8>) -> (Arc<dyn Storage>, SyncGate) {
        let open = Arc::new(AtomicBool::new(true));
        let armed = Arc::new(AtomicBool::new(false));
        let held = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut hooked = Hooked::new(MemStorage::from_vec(img));
        let (g, arm, n) = (open.clone(), armed.clone(), held.clone());
        hooked.on_flush = Some(Box::new(move || {
            if arm.load(Ordering::SeqCst) {
                n.fetch_add(1, Ordering::SeqCst);
                hold(&g);
            }
        }));
        let hooked = Arc::new(hooked);
        let storage: Arc<dyn Storage> = hooked.clone();
        let gate = SyncGate {
            open,
            armed,
            held,
            hooked,
        };
        (storage, gate)
    }
    /// Syncs from now on wait.
    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }
    /// Waiting syncs go on, and later ones do not wait.
    fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.armed.store(false, Ordering::SeqCst);
    }
    fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }
    /// What the file holds now, as a new in-memory image.
    fn snapshot(&self) -> MemStorage {
        MemStorage::from_vec(self.hooked.inner.snapshot())
    }
}

/// Every byte of the cluster at each offset reads as the byte given.
fn assert_reads(q: &Qcow2, want: &[(u64, u8)], what: &str) {
    let mut buf = [0u8; 4096];
    for &(off, b) in want {
        q.read_vectored(off, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert!(buf.iter().all(|&x| x == b), "{what}: cluster at {off}");
    }
}

#[test]
fn an_l2_miss_is_read_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    // Data under two L2 tables (each covers 2 MiB), written and closed.
    let (a, b) = (0u64, 8u64 << 20);
    {
        let q = Qcow2::open_storage(mem.clone(), &OpenOptions::default(), None, 0).unwrap();
        q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        q.write_vectored(b, &[IoSlice::new(&[2u8; 4096])]).unwrap();
        q.close().unwrap();
    }
    let img = mem.snapshot();
    let slow_table = l2_offset(&img, b / 4096);
    assert_ne!(slow_table, 0);
    // Reads of the second table wait for the gate.
    let (storage, gate) = Gate::storage(img, slow_table, false);
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    let q2 = q.clone();
    let slow = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        q2.read_vectored(b, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        buf[0]
    });
    std::thread::sleep(Duration::from_millis(100)); // the slow read is in its table read now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(a, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    let took = t0.elapsed();
    gate.set(true);
    assert_eq!(buf[0], 1);
    assert_eq!(slow.join().unwrap(), 2, "the slow read gets its data too");
    assert!(
        took < Duration::from_secs(2),
        "a read of another table waited {took:?} for the first one's table read"
    );
}

/// A guest flush writes refcount blocks and tables and syncs between them; those syncs (and
/// the writes) run on copies without the metadata lock, so a read of a cached table and an
/// in-place write on another thread go on while a sync is slow. Checked in both ack modes:
/// with `memory` the flush has dirty tables to order behind a sync; with `file` (the default)
/// they went to the file before the writes returned and the flush has refcounts to write.
#[test]
fn a_flush_syncs_without_the_metadata_lock() {
    for ack in [AckDurability::Memory, AckDurability::File] {
        flush_with_slow_syncs(ack);
    }
}

fn flush_with_slow_syncs(ack: AckDurability) {
    let mem = new_image(64 << 20, false);
    let (a, b) = (0u64, 8u64 << 20);
    let (storage, gate) = SyncGate::new(mem.snapshot());
    let opts = OpenOptions {
        ack_durability: ack,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    // b is allocated and durable (its entry in the file): later writes to it are in place.
    q.write_vectored(b, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    q.flush_all().unwrap();
    // New clusters under another table: a dirty refcount block (and, with `memory`, a dirty
    // table) for the next flush.
    for i in 0..8u64 {
        q.write_vectored(a + i * 4096, &[IoSlice::new(&[1u8; 4096])])
            .unwrap();
    }
    gate.close();
    let q2 = q.clone();
    let flusher = std::thread::spawn(move || q2.flush_all());
    std::thread::sleep(Duration::from_millis(100)); // the flush waits in a sync now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(b, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    q.write_vectored(b, &[IoSlice::new(&[3u8; 4096])]).unwrap();
    let took = t0.elapsed();
    let blocked = !flusher.is_finished();
    gate.release();
    flusher.join().unwrap().unwrap();
    assert!(blocked, "{ack:?}: the flush was not held in its sync");
    assert_eq!(buf[0], 2);
    assert!(
        took < Duration::from_secs(2),
        "{ack:?}: a read and an in-place write waited {took:?} for a flush's sync"
    );
    // Everything is where it was written, across a clean close and reopen.
    q.close().unwrap();
    drop(q);
    let q =
        Qcow2::open_storage(Arc::new(gate.snapshot()), &OpenOptions::default(), None, 0).unwrap();
    assert_reads(
        &q,
        &[(a, 1), (a + 7 * 4096, 1), (b, 3)],
        &format!("{ack:?}"),
    );
}

/// The same for the dedup write path: the L2 table of the cluster it holds is read before the
/// lock is kept for the cluster's decision.
#[test]
fn a_dedup_write_reads_a_missing_table_without_the_metadata_lock() {
    let (a, b) = (0u64, 8u64 << 20);
    // The open walks all 64 tables, and the cache keeps only the last ones: b's is a miss.
    let (q, gate) = dedup_image_over_64_tables(&[(a, 1), (b, 2)], b);
    // The dedup write waits in its table read while a is read.
    let (took, first, r) = read_while_gated(&q, &gate, a, move |q| {
        q.write_vectored(b + 4096, &[IoSlice::new(&[3u8; 4096])])
    });
    r.unwrap();
    assert_eq!(first, 1);
    let mut buf = [0u8; 4096];
    q.read_vectored(b + 4096, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert_eq!(buf[0], 3, "the dedup write landed");
    assert_eq!(gate.held(), 1, "the write read its table");
    assert!(
        took < Duration::from_secs(2),
        "a read of another table waited {took:?} for a dedup write's table read"
    );
}

/// An allocation whose refcount block is not cached reads it without the metadata lock.
#[test]
fn an_allocation_reads_a_missing_refcount_block_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    let a = 0u64;
    {
        let q = Qcow2::open_storage(mem.clone(), &OpenOptions::default(), None, 0).unwrap();
        q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        q.close().unwrap();
    }
    let img = mem.snapshot();
    let block0 = refcount_block_0(&img);
    assert_ne!(block0, 0);
    let (storage, gate) = Gate::storage(img, block0, true);
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    // a's table is cached before the gate closes.
    let mut buf = [0u8; 4096];
    q.read_vectored(a, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    // A new cluster under a's table: the allocator needs refcount block 0.
    let (took, first, r) = read_while_gated(&q, &gate, a, move |q| {
        q.write_vectored(a + 4096, &[IoSlice::new(&[2u8; 4096])])
    });
    r.unwrap();
    assert_eq!(first, 1);
    q.read_vectored(a + 4096, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert_eq!(buf[0], 2, "the allocating write landed");
    assert_eq!(gate.held(), 1, "the allocation read its block");
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for an allocation's refcount-block read"
    );
}

/// The holes of the clusters a flush frees are punched without the metadata lock, and the
/// allocator does not hand those clusters out until the punch is done (it would zero what a
/// new write put there).
#[test]
fn a_flush_punches_freed_clusters_without_the_lock_and_reuses_none_meanwhile() {
    let mem = new_image(64 << 20, false);
    let gate = Arc::new(AtomicBool::new(true));
    let punches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(mem.snapshot()));
    let (g, p2) = (gate.clone(), punches.clone());
    hooked.on_punch = Some(Box::new(move |_, _| {
        if !g.load(Ordering::SeqCst) {
            p2.fetch_add(1, Ordering::SeqCst);
        }
        hold(&g);
    }));
    let storage: Arc<dyn Storage> = Arc::new(hooked);
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    let (a, x, b) = (0u64, 4096u64, 8192u64);
    q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap();
    q.write_vectored(x, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    q.flush_all().unwrap();
    q.discard(x, 4096).unwrap();
    gate.store(false, Ordering::SeqCst);
    let q2 = q.clone();
    let flusher = std::thread::spawn(move || q2.flush_all());
    std::thread::sleep(Duration::from_millis(100)); // the flush is in its punch now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(a, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    // A new cluster: the one being punched must not be it.
    q.write_vectored(b, &[IoSlice::new(&[3u8; 4096])]).unwrap();
    let took = t0.elapsed();
    gate.store(true, Ordering::SeqCst);
    flusher.join().unwrap().unwrap();
    assert_eq!(
        punches.load(Ordering::SeqCst),
        1,
        "the flush punched x's cluster"
    );
    assert_eq!(buf[0], 1);
    q.read_vectored(b, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    assert!(buf.iter().all(|&v| v == 3), "b's new cluster was punched");
    assert!(
        took < Duration::from_secs(2),
        "a read and an allocating write waited {took:?} for a flush's hole punch"
    );
}

/// A flush that closes a COPIED window (a dedup link cleared COPIED on a cluster whose entry
/// was in the file) writes its copies and syncs without the metadata lock too.
#[test]
fn a_flush_closing_a_copied_window_syncs_without_the_metadata_lock() {
    let mem = new_image(64 << 20, true);
    let gate = Arc::new(AtomicBool::new(true));
    let syncs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hooked = Hooked::new(MemStorage::from_vec(mem.snapshot()));
    let (g, n) = (gate.clone(), syncs.clone());
    hooked.on_flush = Some(Box::new(move || {
        if g.load(Ordering::SeqCst) {
            return;
        }
        n.fetch_add(1, Ordering::SeqCst);
        hold(&g);
    }));
    let hooked = Arc::new(hooked);
    let storage: Arc<dyn Storage> = hooked.clone();
    let opts = OpenOptions {
        dedup_mode: Some(DedupMode::Inline),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    let (a, b, c) = (0u64, 8u64 << 20, 16u64 << 20);
    let x: Vec<u8> = (0..4096u32).map(|i| (i % 199) as u8 + 1).collect();
    q.write_vectored(a, &[IoSlice::new(&x)]).unwrap();
    q.write_vectored(c, &[IoSlice::new(&[5u8; 4096])]).unwrap();
    q.flush_all().unwrap();
    // A link to a's cluster: COPIED goes from a's entry, in a DIRTY window.
    q.write_vectored(b, &[IoSlice::new(&x)]).unwrap();
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 1);
    gate.store(false, Ordering::SeqCst);
    let q2 = q.clone();
    let flusher = std::thread::spawn(move || q2.flush_all());
    std::thread::sleep(Duration::from_millis(100)); // the flush waits in a sync now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(c, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    let took = t0.elapsed();
    gate.store(true, Ordering::SeqCst);
    flusher.join().unwrap().unwrap();
    assert!(syncs.load(Ordering::SeqCst) >= 1, "the flush synced");
    assert_eq!(buf[0], 5);
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for the sync of a flush closing a COPIED window"
    );
    // The window is closed: DIRTY is clear in the file, and the image is consistent.
    q.close().unwrap();
    drop(q);
    let img = hooked.inner.snapshot();
    assert_eq!(img[79] & 1, 0, "DIRTY left set after a clean close");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    std::fs::write(&p, &img).unwrap();
    common::assert_check_clean(&p);
}

/// While that flush syncs without the lock, another write makes a new COPIED change whose
/// table piece goes to the file before the write returns (persist before ack). The flush must
/// not clear DIRTY over it: it sees the change (and the persister waits for its writeback lock
/// anyway). Whatever the disk kept, `qemu-img check` then accepts the image after a repair.
#[test]
fn a_copied_change_during_the_window_flush_keeps_dirty() {
    let mem = MemStorage::new();
    let o = CreateOptions {
        size: 64 << 20,
        cluster_bits: 12,
        dedup: true,
        ..Default::default()
    };
    create(&mem, &o).unwrap();
    let gate = Arc::new(AtomicBool::new(true));
    let mut hooked = Hooked::new(FaultStorage::new(mem.snapshot(), None));
    let g = gate.clone();
    hooked.on_flush = Some(Box::new(move || {
        hold(&g);
    }));
    let hooked = Arc::new(hooked);
    let storage: Arc<dyn Storage> = hooked.clone();
    let opts = OpenOptions {
        dedup_mode: Some(DedupMode::Inline),
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    let content = |k: u32| -> Vec<u8> { (0..4096u32).map(|i| ((i * k) % 253) as u8 + 1).collect() };
    let (x, y) = (content(3), content(7));
    q.write_vectored(0, &[IoSlice::new(&x)]).unwrap();
    q.write_vectored(4 << 20, &[IoSlice::new(&y)]).unwrap();
    q.flush_all().unwrap();
    // A COPIED window: a link to the cluster of 0.
    q.write_vectored(8 << 20, &[IoSlice::new(&x)]).unwrap();
    gate.store(false, Ordering::SeqCst);
    let q2 = q.clone();
    let flusher = std::thread::spawn(move || q2.flush_all());
    // The flush waits in a sync now. A new window while it syncs: a link to the cluster of
    // 4 MiB (COPIED goes from its entry).
    std::thread::sleep(Duration::from_millis(100));
    let q3 = q.clone();
    let linker =
        std::thread::spawn(move || q3.write_vectored(12 << 20, &[IoSlice::new(&y)]).unwrap());
    std::thread::sleep(Duration::from_millis(100));
    gate.store(true, Ordering::SeqCst);
    flusher.join().unwrap().unwrap();
    linker.join().unwrap();
    assert_eq!(q.dedup_stats().unwrap().clusters_deduplicated, 2);
    // A crash now: the image as the disk may hold it.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    for cm in [CrashMode::AllWrites, CrashMode::FlushedOnly] {
        let img = hooked.inner.crashed_image(cm);
        common::crash::check_crashed(&p, img, &format!("crash after the window flush ({cm:?})"));
    }
    drop(q);
}

/// The refcount block a flush's frees need is read without the metadata lock too.
#[test]
fn a_flush_reads_the_refcount_block_of_its_frees_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    let (a, x) = (0u64, 4096u64);
    {
        let q = Qcow2::open_storage(mem.clone(), &OpenOptions::default(), None, 0).unwrap();
        q.write_vectored(a, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        q.write_vectored(x, &[IoSlice::new(&[2u8; 4096])]).unwrap();
        q.close().unwrap();
    }
    let img = mem.snapshot();
    let block0 = refcount_block_0(&img);
    let (storage, gate) = Gate::storage(img, block0, true);
    let q = Arc::new(Qcow2::open_storage(storage, &OpenOptions::default(), None, 0).unwrap());
    let mut buf = [0u8; 4096];
    q.read_vectored(a, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    // A discard queues the free; the flush makes the unlink durable and applies it, which
    // needs refcount block 0 (not loaded since the open).
    q.discard(x, 4096).unwrap();
    let (took, first, r) = read_while_gated(&q, &gate, a, |q| q.flush_all());
    r.unwrap();
    assert_eq!(first, 1);
    assert_eq!(gate.held(), 1, "the flush read the block");
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a flush's refcount-block read"
    );
}

/// A cache full of dirty tables does not flush under the metadata lock: the allocating write
/// that finds it full takes a table over the cap and then flushes on its own thread, without
/// the lock, so a read and an in-place write on another thread go on while its sync is slow.
#[test]
fn a_full_cache_of_dirty_tables_flushes_without_the_metadata_lock() {
    let mem = new_image(64 << 20, false);
    let table = 2u64 << 20; // guest bytes one L2 table maps
    let (storage, gate) = SyncGate::new(mem.snapshot());
    let opts = OpenOptions {
        // The smallest cache: 16 tables, which stay dirty until a flush (with `file` ack a
        // persister writes them before each write returns, and they are clean).
        l2_cache_bytes: Some(16 * 4096),
        ack_durability: AckDurability::Memory,
        ..Default::default()
    };
    let q = Arc::new(Qcow2::open_storage(storage, &opts, None, 0).unwrap());
    // b: allocated and durable, in the first table; then one new cluster under each of the
    // 16 tables fills the cache with dirty ones.
    let b = 4096u64;
    q.write_vectored(b, &[IoSlice::new(&[2u8; 4096])]).unwrap();
    q.flush_all().unwrap();
    for t in 0..16u64 {
        q.write_vectored(t * table, &[IoSlice::new(&[1u8; 4096])])
            .unwrap();
    }
    gate.close();
    let q2 = q.clone();
    let writer =
        std::thread::spawn(move || q2.write_vectored(16 * table, &[IoSlice::new(&[5u8; 4096])]));
    std::thread::sleep(Duration::from_millis(100)); // its flush waits in a sync now
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    q.read_vectored(b, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    q.write_vectored(b, &[IoSlice::new(&[3u8; 4096])]).unwrap();
    let took = t0.elapsed();
    let blocked = !writer.is_finished();
    gate.release();
    writer.join().unwrap().unwrap();
    assert!(
        took < Duration::from_secs(2),
        "a read and an in-place write waited {took:?} for the full cache's flush"
    );
    assert!(blocked, "the write into a full cache ran no slow sync");
    assert_eq!(buf[0], 2);
    assert_eq!(q.stats().locked_flushes, 0, "no flush ran under the lock");
    q.close().unwrap();
    drop(q);
    let q =
        Qcow2::open_storage(Arc::new(gate.snapshot()), &OpenOptions::default(), None, 0).unwrap();
    assert_reads(&q, &[(b, 3), (15 * table, 1), (16 * table, 5)], "reopened");
}
