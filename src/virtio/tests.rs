//! Request-layer tests on a mock virtqueue: well-formed requests and every malformed shape.

use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::block::{BlockDevice, MemDisk};

const W: u16 = 2; // VRING_DESC_F_WRITE
const R: u16 = 0;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x1f_0000;
const MEM_SIZE: u64 = 0x20_0000;

struct Env {
    mem: GuestMemoryMmap<()>,
    disk: Arc<MemDisk>,
    ctx: DeviceCtx,
}

fn env(read_only: bool) -> Env {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let disk = Arc::new(MemDisk::new(1 << 20, read_only));
    let cfg = BlkConfig::new(1 << 20, 1, 16, 4096, true);
    let ctx = DeviceCtx::new(disk.clone(), cfg, "serial-123");
    Env { mem, disk, ctx }
}

impl Env {
    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }
    /// Run a chain of (addr, len, flags); returns (used length, status byte at STATUS).
    fn run(&self, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        let used = process_chain(&self.ctx, 0, &self.mem, chain);
        (used, self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }
}

#[test]
fn write_then_read_multi_segment() {
    let e = env(false);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
    e.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    e.header(VIRTIO_BLK_T_OUT, 3);
    let (used, st) = e.run(&[
        (HDR, 16, R),
        (DATA, 512, R),
        (DATA + 512, 1024, R),
        (STATUS, 1, W),
    ]);
    assert_eq!((used, st), (1, VIRTIO_BLK_S_OK));
    assert_eq!(&e.disk.contents()[3 * 512..3 * 512 + 1536], &pattern[..]);

    e.mem.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
    e.header(VIRTIO_BLK_T_IN, 3);
    let (used, st) = e.run(&[
        (HDR, 16, R),
        (DATA, 1024, W),
        (DATA + 1024, 512, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((used, st), (1537, VIRTIO_BLK_S_OK));
    let mut back = vec![0u8; 1536];
    e.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn status_sharing_a_descriptor_with_read_data() {
    let e = env(false);
    e.disk
        .write_vectored(0, &[std::io::IoSlice::new(&[9u8; 512])])
        .unwrap();
    e.header(VIRTIO_BLK_T_IN, 0);
    // 512 data bytes followed by the status byte in one descriptor.
    let (used, st) = e.run(&[(HDR, 16, R), (STATUS - 512, 513, W)]);
    assert_eq!((used, st), (513, VIRTIO_BLK_S_OK));
    assert_eq!(e.mem.read_obj::<u8>(GuestAddress(STATUS - 1)).unwrap(), 9);
}

#[test]
fn flush_and_get_id() {
    let e = env(false);
    e.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(e.run(&[(HDR, 16, R), (STATUS, 1, W)]), (1, VIRTIO_BLK_S_OK));
    e.header(VIRTIO_BLK_T_GET_ID, 0);
    let (used, st) = e.run(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!((used, st), (21, VIRTIO_BLK_S_OK));
    let mut id = [0u8; 20];
    e.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert_eq!(&id[10..], &[0u8; 10]);
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes_segments() {
    let e = env(false);
    e.disk
        .write_vectored(0, &[std::io::IoSlice::new(&vec![0xaau8; 8192])])
        .unwrap();
    let mut segs = Vec::new();
    segs.extend_from_slice(&segment(0, 2, 0));
    segs.extend_from_slice(&segment(8, 2, 0));
    e.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    e.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_OK)
    );
    let c = e.disk.contents();
    assert!(c[..1024].iter().all(|&b| b == 0));
    assert!(c[1024..4096].iter().all(|&b| b == 0xaa));
    assert!(c[4096..5120].iter().all(|&b| b == 0));

    // Discard with the UNMAP flag is UNSUPP (spec), write-zeroes with UNMAP is fine.
    e.mem
        .write_slice(&segment(12, 1, 1), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_UNSUPP)
    );
    e.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_OK)
    );
    assert!(e.disk.contents()[12 * 512..13 * 512]
        .iter()
        .all(|&b| b == 0));
    // Unknown flag bits, bad list lengths, ranges past the end.
    e.mem
        .write_slice(&segment(12, 1, 4), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_UNSUPP)
    );
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 15, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        e.run(&[(HDR, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    e.mem
        .write_slice(&segment(2047, 2, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
}

#[test]
fn malformed_chains() {
    let e = env(false);
    e.header(VIRTIO_BLK_T_IN, 0);
    // Status descriptor read-only, or missing entirely: nothing written, used length 0.
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]),
        (0, 0xff)
    );
    // The data buffer then holds the status in its last byte: 511 data bytes is not a sector.
    assert_eq!(e.run(&[(HDR, 16, R), (DATA, 512, W)]).0, 1);
    assert_eq!(
        e.mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(e.run(&[(HDR, 16, R)]), (0, 0xff));
    assert_eq!(e.run(&[(HDR, 16, R), (STATUS, 0, W)]), (0, 0xff));
    // Status outside guest memory.
    assert_eq!(e.run(&[(HDR, 16, R), (MEM_SIZE + 4096, 1, W)]), (0, 0xff));
    // Header only as status, header writable, header short.
    assert_eq!(e.run(&[(STATUS, 1, W)]), (1, VIRTIO_BLK_S_IOERR));
    assert_eq!(
        e.run(&[(HDR, 16, W), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    assert_eq!(
        e.run(&[(HDR, 8, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Wrong direction: a read with a read-only buffer, a write with a writable one.
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    e.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Length not a multiple of 512.
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 100, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Past capacity (disk has 2048 sectors), and a sector number that overflows.
    e.header(VIRTIO_BLK_T_OUT, 2047);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    e.header(VIRTIO_BLK_T_IN, u64::MAX / 2);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Data buffer outside guest memory.
    e.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (MEM_SIZE - 256, 512, W), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    // Unknown type.
    e.header(99, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_UNSUPP)
    );
    // The disk is untouched by all of this.
    assert!(e.disk.contents().iter().all(|&b| b == 0));
}

#[test]
fn read_only_device_refuses_writes() {
    let e = env(true);
    e.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    e.mem
        .write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    e.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_IOERR)
    );
    e.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
        (513, VIRTIO_BLK_S_OK)
    );
}

/// Counts flushes; otherwise a MemDisk.
struct CountingDisk(MemDisk, std::sync::atomic::AtomicUsize);

impl BlockDevice for CountingDisk {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored(
        &self,
        o: u64,
        b: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<(), crate::block::BlockError> {
        self.0.read_vectored(o, b)
    }
    fn write_vectored(
        &self,
        o: u64,
        b: &[std::io::IoSlice<'_>],
    ) -> Result<(), crate::block::BlockError> {
        self.0.write_vectored(o, b)
    }
    fn flush(&self) -> Result<(), crate::block::BlockError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), crate::block::BlockError> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<(), crate::block::BlockError> {
        self.0.write_zeroes(o, l, u)
    }
    fn resize(&self, n: u64) -> Result<(), crate::block::BlockError> {
        self.0.resize(n)
    }
}

#[test]
fn writethrough_flushes_every_write() {
    let mut e = env(false);
    let disk = Arc::new(CountingDisk(
        MemDisk::new(1 << 20, false),
        Default::default(),
    ));
    let cfg = BlkConfig::new(1 << 20, 1, 16, 4096, false);
    e.ctx = DeviceCtx::new(disk.clone(), cfg, "");
    let flushes = || disk.1.load(std::sync::atomic::Ordering::Relaxed);
    e.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        e.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
        (1, VIRTIO_BLK_S_OK)
    );
    assert_eq!(flushes(), 1);
    e.header(VIRTIO_BLK_T_IN, 0);
    e.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(flushes(), 1, "reads do not flush");
    // The driver turns the cache on (CONFIG_WCE): writes no longer flush.
    e.ctx
        .writeback
        .store(true, std::sync::atomic::Ordering::Relaxed);
    e.header(VIRTIO_BLK_T_OUT, 0);
    e.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(flushes(), 1);
}

/// A device whose every call panics (a bug in the engine, say in a decompressor).
struct PanickingDisk;

impl BlockDevice for PanickingDisk {
    fn capacity(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored(
        &self,
        _offset: u64,
        _bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<(), crate::block::BlockError> {
        panic!("injected read panic")
    }
    fn write_vectored(
        &self,
        _offset: u64,
        _bufs: &[std::io::IoSlice<'_>],
    ) -> Result<(), crate::block::BlockError> {
        panic!("injected write panic")
    }
    fn flush(&self) -> Result<(), crate::block::BlockError> {
        panic!("injected flush panic")
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), crate::block::BlockError> {
        panic!("injected discard panic")
    }
    fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _unmap: bool,
    ) -> Result<(), crate::block::BlockError> {
        panic!("injected write-zeroes panic")
    }
}

/// A panic below the request layer fails that request with IOERR; the queue thread goes on.
#[test]
fn a_panicking_device_fails_the_request_not_the_queue() {
    let mut e = env(false);
    e.ctx = DeviceCtx::new(
        Arc::new(PanickingDisk),
        BlkConfig::new(1 << 20, 1, 16, 4096, true),
        "serial-123",
    );
    for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        e.header(t, 0);
        let f = if t == VIRTIO_BLK_T_IN { W } else { R };
        let (_, st) = e.run(&[(HDR, 16, R), (DATA, 512, f), (STATUS, 1, W)]);
        assert_eq!(st, VIRTIO_BLK_S_IOERR);
    }
    e.header(VIRTIO_BLK_T_FLUSH, 0);
    let (used, st) = e.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!((used, st), (1, VIRTIO_BLK_S_IOERR));
}

/// Submit one chain on `exec`: a request of `t` at sector 0 over DATA..DATA+4096.
fn submit_4k(e: &Env, exec: &mut QueueExec<Arc<GuestMemoryMmap<()>>>, head: u16, t: u32) {
    e.header(t, 0);
    let q = MockSplitQueue::new(&e.mem, 16);
    let data_flags = if t == VIRTIO_BLK_T_IN { W } else { R };
    let raw: Vec<RawDescriptor> = [(HDR, 16, R), (DATA, 4096, data_flags), (STATUS, 1, W)]
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
        .collect();
    let chain = q.build_desc_chain(&raw).unwrap();
    assert_eq!(exec.submit(Arc::new(e.mem.clone()), head, chain), None);
}

/// Wait (at most 10 s) until `exec` has finished `n` requests.
fn reap_n(exec: &mut QueueExec<Arc<GuestMemoryMmap<()>>>, n: usize) -> Vec<(u16, u32)> {
    let mut done = Vec::new();
    let t0 = std::time::Instant::now();
    while done.len() < n && t0.elapsed() < std::time::Duration::from_secs(10) {
        exec.reap(&mut done);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    done
}

/// A read that goes to the device is handed to the kernel by `submit`, not held until the end
/// of the event-loop turn: a batch held back waits for every later request's planning and
/// reaches the disk as one burst (QD32 on a virtio disk: 74K IOPS batched, 88K not), but
/// only while fewer than `SUBMIT_AT_ONCE_BELOW` operations are in the ring; past that it
/// waits for the turn (one submission for the turn's requests). A buffered write lands in
/// the page cache and stays batched until `flush_submissions`.
#[test]
fn a_read_for_the_device_is_submitted_at_once_and_a_buffered_write_waits_for_the_turn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
    let pool = crate::aio::Pool::new(2, "test-pool").unwrap();
    let e = env(false);
    for direct in [true, false] {
        let disk = match crate::raw::RawDisk::open_with(&path, false, direct) {
            Ok(d) => Arc::new(d),
            Err(err) => {
                eprintln!("no O_DIRECT here ({err}); that case skipped");
                continue;
            }
        };
        let cfg = BlkConfig::new(1 << 20, 1, 16, 4096, true);
        let ctx = Arc::new(DeviceCtx::new(disk, cfg, "serial-123"));
        let Ok(mut exec) = QueueExec::new(ctx, pool.clone(), 0, 16, true) else {
            panic!("no executor");
        };
        if !exec.has_ring() {
            eprintln!("no io_uring here; skipped");
            return;
        }
        e.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
        if direct {
            submit_4k(&e, &mut exec, 0, VIRTIO_BLK_T_IN);
            assert_eq!(exec.unsubmitted(), 0, "the O_DIRECT read waits in the ring");
            assert_eq!(reap_n(&mut exec, 1), vec![(0, 4097)]);
            let mut back = [0u8; 4096];
            e.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
            assert!(back.iter().all(|&b| b == 0x5a));
            // Not reaped, the ring's operations count: the 16th read waits for the turn.
            let deep = super::queue::SUBMIT_AT_ONCE_BELOW as u16;
            for head in 0..deep - 1 {
                submit_4k(&e, &mut exec, head, VIRTIO_BLK_T_IN);
                assert_eq!(exec.unsubmitted(), 0, "read {head} goes at once");
            }
            submit_4k(&e, &mut exec, deep - 1, VIRTIO_BLK_T_IN);
            assert_eq!(
                exec.unsubmitted(),
                1,
                "the ring is deep: the read waits for the turn"
            );
            exec.flush_submissions();
            assert_eq!(exec.unsubmitted(), 0);
            assert_eq!(reap_n(&mut exec, deep as usize).len(), deep as usize);
        } else {
            e.mem
                .write_slice(&[0x77u8; 4096], GuestAddress(DATA))
                .unwrap();
            submit_4k(&e, &mut exec, 1, VIRTIO_BLK_T_OUT);
            assert_eq!(exec.unsubmitted(), 1, "a buffered write is batched");
            exec.flush_submissions();
            assert_eq!(exec.unsubmitted(), 0);
            assert_eq!(reap_n(&mut exec, 1), vec![(1, 1)]);
        }
    }
}
