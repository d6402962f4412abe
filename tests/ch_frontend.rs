//! The daemon driven the way cloud-hypervisor's vhost-user-blk frontend drives it (its features,
//! protocol features and message order, replayed by tests/common/chfront.rs on the rust-vmm
//! `vhost` crate's `Frontend`), with real requests on its split rings in memfd guest memory:
//! activation and I/O on two queues, memory hotplug, a guest reboot, the dirty log of a
//! migration, a local migration and a reconnect to a restarted daemon, both with requests in
//! flight (the inflight region). A cloud-hypervisor guest itself cannot boot here (no usable
//! KVM).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::chfront::{ch_protocol_features, ch_virtio_features, page_dirty, Ch, Inflight};
use common::guest::{Backend, Which};
use common::vring::*;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// cloud-hypervisor's `--disk ...,num_queues=2,queue_size=128`.
const QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 128;
const DISK: u64 = 64 << 20;
const RAM: u64 = 64 << 20;
/// Where a hotplugged region goes.
const HOTPLUG_GPA: u64 = 1 << 30;
const HOTPLUG_SIZE: u64 = 4 << 20;
const SERIAL: &str = "ch-frontend-test";
const WAIT: Duration = Duration::from_secs(60);

fn ring_base(q: usize) -> u64 {
    0x10000 * (q as u64 + 1)
}

/// Request headers and status bytes, by queue and head: 32 bytes each.
fn hdr_addr(q: usize, head: u16) -> u64 {
    0x10_0000 + 0x1000 * q as u64 + 32 * u64::from(head)
}

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    daemon: Backend,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ch.qcow2");
    common::create_with_cli(&img, "64M", &[]);
    let sock = dir.path().join("ch.sock");
    let log = dir.path().join("daemon.log");
    let daemon = start_daemon(&img, &sock, &log);
    Setup {
        _dir: dir,
        img,
        sock,
        log,
        daemon,
    }
}

/// `serve` with no queue option (64 queues offered) and its default queue size.
fn start_daemon(img: &Path, sock: &Path, log: &Path) -> Backend {
    let mut d = Backend::start_with(Which::Ours, img, sock, log, &["--serial", SERIAL]);
    d.wait_listening(sock);
    d
}

/// The features a Linux guest acks of what cloud-hypervisor offers it (the intersection with
/// the backend's): everything but LOG_ALL, which no driver knows; PROTOCOL_FEATURES is kept by
/// cloud-hypervisor itself.
fn guest_acked(negotiated: u64) -> u64 {
    negotiated & !VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// `Blk::new` then activation: returns the connection, the features acked and the rings.
fn activate(s: &Setup, mem: &Mem, inflight: Option<&mut Inflight>) -> (Ch, u64, Vec<Ring>) {
    let mut ch = Ch::connect(&s.sock, QUEUES);
    let negotiated = ch.negotiate(ch_virtio_features(QUEUES), ch_protocol_features());
    if ch.acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
        let n = ch.get_queue_num();
        assert!(n >= QUEUES as u64, "backend offers only {n} queues");
    }
    let cfg = ch.get_config();
    assert_eq!(cfg.len(), 60);
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap());
    assert_eq!(capacity, DISK / 512, "config space capacity");
    let rings: Vec<Ring> = (0..QUEUES)
        .map(|q| Ring::new(mem, ring_base(q), QUEUE_SIZE))
        .collect();
    let acked = guest_acked(negotiated);
    ch.setup(mem, &rings, acked, inflight);
    (ch, acked, rings)
}

/// Post one request on `ring` (queue `q`), data buffers given; returns its head.
fn post(mem: &Mem, ring: &mut Ring, q: usize, kind: u32, sector: u64, data: &[Buf]) -> u16 {
    let h = hdr_addr(q, ring.next_head());
    let bufs = blk_request(mem, kind, sector, h, data, h + 16);
    ring.post(mem, &bufs)
}

fn status(mem: &Mem, q: usize, head: u16) -> u8 {
    mem.read_obj(GuestAddress(hdr_addr(q, head) + 16)).unwrap()
}

/// Run one request to completion on queue `q`: (status, used length).
fn run(mem: &Mem, ring: &mut Ring, q: usize, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
    let head = post(mem, ring, q, kind, sector, data);
    ring.kick();
    let (used, called) = ring.wait_used(mem, 1, WAIT);
    assert!(
        called,
        "queue {q}: no interrupt (call eventfd) for the completion"
    );
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, head, "queue {q}: used id");
    (status(mem, q, head), used[0].1)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

/// Write `data` at `gpa` to disk offset `off` through queue `q`, read it back into `back`.
fn write_read(mem: &Mem, ring: &mut Ring, q: usize, off: u64, gpa: u64, back: u64, data: &[u8]) {
    let len = data.len() as u32;
    mem.write_slice(data, GuestAddress(gpa)).unwrap();
    let w = [data_buf(VIRTIO_BLK_T_OUT, gpa, len)];
    assert_eq!(
        run(mem, ring, q, VIRTIO_BLK_T_OUT, off / 512, &w),
        (VIRTIO_BLK_S_OK, 1)
    );
    let r = [data_buf(VIRTIO_BLK_T_IN, back, len)];
    assert_eq!(
        run(mem, ring, q, VIRTIO_BLK_T_IN, off / 512, &r),
        (VIRTIO_BLK_S_OK, len + 1),
        "a read's used length is its data and the status byte"
    );
    let mut got = vec![0u8; data.len()];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert!(got == data, "queue {q}: data read back at {off} differs");
}

/// A read on queue `q` into `gpa`: succeeds.
fn read_into(mem: &Mem, ring: &mut Ring, q: usize, sector: u64, gpa: u64, len: u32) {
    let r = [data_buf(VIRTIO_BLK_T_IN, gpa, len)];
    assert_eq!(
        run(mem, ring, q, VIRTIO_BLK_T_IN, sector, &r),
        (VIRTIO_BLK_S_OK, len + 1)
    );
}

/// Writes, reads, a flush and GET_ID on every queue.
fn io_on_all_queues(mem: &Mem, rings: &mut [Ring], seed: u8) {
    for (q, ring) in rings.iter_mut().enumerate() {
        let off = (q as u64) << 20;
        let (gpa, back) = (
            0x20_0000 + (q as u64) * 0x4_0000,
            0x30_0000 + (q as u64) * 0x4_0000,
        );
        write_read(
            mem,
            ring,
            q,
            off,
            gpa,
            back,
            &pattern(seed ^ q as u8, 64 << 10),
        );
        // Unaligned inside a cluster, two data descriptors.
        let d = pattern(seed.wrapping_add(7), 4096);
        mem.write_slice(&d, GuestAddress(gpa)).unwrap();
        let w = [
            data_buf(VIRTIO_BLK_T_OUT, gpa, 1024),
            data_buf(VIRTIO_BLK_T_OUT, gpa + 1024, 3072),
        ];
        assert_eq!(
            run(mem, ring, q, VIRTIO_BLK_T_OUT, (off + 4608) / 512, &w),
            (VIRTIO_BLK_S_OK, 1)
        );
        read_into(mem, ring, q, (off + 4608) / 512, back, 4096);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert!(
            got == d,
            "queue {q}: two-descriptor write read back differs"
        );
        assert_eq!(
            run(mem, ring, q, VIRTIO_BLK_T_FLUSH, 0, &[]),
            (VIRTIO_BLK_S_OK, 1)
        );
        let id = [data_buf(VIRTIO_BLK_T_GET_ID, back, 20)];
        let (st, len) = run(mem, ring, q, VIRTIO_BLK_T_GET_ID, 0, &id);
        assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
        let mut got = [0u8; 20];
        mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(&got[..SERIAL.len()], SERIAL.as_bytes());
    }
}

/// Shut the connection and the daemon down as cloud-hypervisor's shutdown and a SIGTERM do:
/// exit 0, `qemu-img check` clean.
fn finish(mut s: Setup, ch: Ch) {
    drop(ch);
    let st = s.daemon.terminate();
    assert!(st.success(), "daemon exit {st}:\n{}", s.daemon.log_text());
    common::assert_check_clean(&s.img);
}

#[test]
fn activation_features_and_io_on_two_queues() {
    let s = start();
    let mem = guest_memory(&[(0, RAM)]);
    let mut inflight = Inflight::default();
    let (ch, acked, mut rings) = activate(&s, &mem, Some(&mut inflight));

    // What cloud-hypervisor needs of the backend.
    let needed = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD;
    assert!(
        ch.acked_protocol.contains(needed),
        "protocol features acked {:?}, cloud-hypervisor uses {needed:?}",
        ch.acked_protocol
    );
    // Not offered: cloud-hypervisor then snapshots without a backend state and stops no ring
    // before a migration's last pass (README, "cloud-hypervisor: what is verified", says what
    // that means; offering it changes that text and this line).
    assert!(!ch
        .acked_protocol
        .contains(VhostUserProtocolFeatures::DEVICE_STATE));
    // Migration needs LOG_ALL besides LOG_SHMFD; multiqueue needs MQ.
    assert!(ch.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
    assert!(acked & (1 << VIRTIO_BLK_F_MQ) != 0);
    assert!(
        inflight.fd.is_some() && inflight.info.mmap_size > 0,
        "no inflight region"
    );

    io_on_all_queues(&mem, &mut rings, 1);
    finish(s, ch);
}

#[test]
fn memory_hotplug_reboot_and_dirty_log() {
    let s = start();
    let mut mem = guest_memory(&[(0, RAM)]);
    let mut inflight = Inflight::default();
    let (mut ch, acked, mut rings) = activate(&s, &mem, Some(&mut inflight));
    io_on_all_queues(&mem, &mut rings, 2);

    // Memory hotplug: a new region, ADD_MEM_REG, a read into it.
    mem = mem
        .insert_region(guest_region(HOTPLUG_GPA, HOTPLUG_SIZE))
        .unwrap();
    ch.add_memory_region(&mem, HOTPLUG_GPA);
    read_into(&mem, &mut rings[1], 1, 0, HOTPLUG_GPA + 0x1000, 4096);
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(HOTPLUG_GPA + 0x1000))
        .unwrap();
    assert!(got == pattern(2, 4096), "read into hotplugged memory");

    // Migration: the dirty log, as cloud-hypervisor's start_dirty_log / dirty_log.
    let last = mem.last_addr().0;
    ch.start_dirty_log(last);
    let (rd, wr, hp) = (0x80_0000u64, 0x90_0000u64, HOTPLUG_GPA + 0x10_0000);
    mem.write_slice(&pattern(9, 8192), GuestAddress(wr))
        .unwrap();
    let w = [data_buf(VIRTIO_BLK_T_OUT, wr, 8192)];
    let st = run(&mem, &mut rings[0], 0, VIRTIO_BLK_T_OUT, 4096, &w);
    assert_eq!(st, (VIRTIO_BLK_S_OK, 1));
    read_into(&mem, &mut rings[0], 0, 4096, rd, 8192);
    read_into(&mem, &mut rings[1], 1, 4096, hp, 4096);
    let log = ch.dirty_log(last);
    for (what, gpa) in [
        ("read buffer (first page)", rd),
        ("read buffer (second page)", rd + 4096),
        ("read buffer in hotplugged memory", hp),
        ("status byte", hdr_addr(0, 0)),
        ("queue 0 used ring", rings[0].used),
        ("queue 1 used ring", rings[1].used),
    ] {
        assert!(
            page_dirty(&log, gpa),
            "{what} at {gpa:#x} not in the dirty log"
        );
    }
    for (what, gpa) in [("write buffer", wr), ("untouched page", 0x300_0000)] {
        assert!(!page_dirty(&log, gpa), "{what} at {gpa:#x} marked dirty");
    }
    // The next round's log has only what came after the swap.
    read_into(&mem, &mut rings[0], 0, 0, rd + 0x10_0000, 4096);
    let log = ch.dirty_log(last);
    assert!(page_dirty(&log, rd + 0x10_0000));
    assert!(!page_dirty(&log, rd), "the swapped-out log's page again");
    ch.stop_dirty_log();
    io_on_all_queues(&mem, &mut rings, 3);

    // Guest reboot: reset (disable, GET_VRING_BASE), the driver zeroes its rings, activation
    // again on the same connection with a new inflight region.
    let bases = ch.reset(QUEUES);
    for (q, b) in bases.iter().enumerate() {
        assert_eq!(*b, u32::from(rings[q].avail_idx(&mem)), "queue {q}: base");
    }
    let mut rings: Vec<Ring> = (0..QUEUES)
        .map(|q| Ring::new(&mem, ring_base(q), QUEUE_SIZE))
        .collect();
    let mut inflight = Inflight::default();
    ch.setup(&mem, &rings, acked, Some(&mut inflight));
    io_on_all_queues(&mem, &mut rings, 4);
    finish(s, ch);
}

/// Per queue, requests of this size in one batch.
const BATCH: usize = 16;
const BATCH_LEN: u32 = 256 << 10;

fn batch_gpa(q: usize, i: usize) -> u64 {
    0x100_0000 * (q as u64 + 1) + u64::from(BATCH_LEN) * i as u64
}

fn batch_off(q: usize, i: usize) -> u64 {
    u64::from(BATCH_LEN) * (q * BATCH + i) as u64
}

fn batch_data(attempt: u8, q: usize, i: usize) -> Vec<u8> {
    pattern(
        attempt.wrapping_mul(31) ^ (q * BATCH + i) as u8,
        BATCH_LEN as usize,
    )
}

/// A batch of large writes on every queue (unique data per request and attempt), kicked.
fn post_batch(mem: &Mem, rings: &mut [Ring], attempt: u8) {
    for (q, ring) in rings.iter_mut().enumerate() {
        for i in 0..BATCH {
            let gpa = batch_gpa(q, i);
            mem.write_slice(&batch_data(attempt, q, i), GuestAddress(gpa))
                .unwrap();
            let w = [data_buf(VIRTIO_BLK_T_OUT, gpa, BATCH_LEN)];
            let sector = batch_off(q, i) / 512;
            post(mem, ring, q, VIRTIO_BLK_T_OUT, sector, &w);
        }
    }
    for r in rings.iter() {
        r.kick();
    }
}

/// Every request posted completes with OK; then everything the batch wrote reads back.
fn check_batch(mem: &Mem, rings: &mut [Ring], attempt: u8) {
    for (q, ring) in rings.iter_mut().enumerate() {
        let n = usize::from(ring.pending());
        let (done, _) = ring.wait_used(mem, n, WAIT);
        for (head, len) in done {
            assert_eq!(
                status(mem, q, head),
                VIRTIO_BLK_S_OK,
                "queue {q} head {head}"
            );
            assert_eq!(len, 1, "queue {q} head {head}: used length of a write");
        }
        let back = 0x40_0000 + (q as u64) * 0x40_0000;
        for i in 0..BATCH {
            read_into(mem, ring, q, batch_off(q, i) / 512, back, BATCH_LEN);
            let mut got = vec![0u8; BATCH_LEN as usize];
            mem.read_slice(&mut got, GuestAddress(back)).unwrap();
            assert!(
                got == batch_data(attempt, q, i),
                "attempt {attempt}: queue {q} request {i} lost its data"
            );
        }
    }
}

#[test]
fn reconnect_after_a_daemon_crash_runs_requests_in_flight_again() {
    let mut s = start();
    let mem = guest_memory(&[(0, RAM)]);
    let mut inflight = Inflight::default();
    let (mut ch, acked, mut rings) = activate(&s, &mem, Some(&mut inflight));
    // As cloud-hypervisor: the region only if the backend acked it.
    let use_inflight = ch
        .acked_protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
    let proto = ch.acked_protocol;
    io_on_all_queues(&mem, &mut rings, 5);

    let mut caught_in_flight = 0;
    for attempt in 0..6u8 {
        post_batch(&mem, &mut rings, attempt);
        std::thread::sleep(Duration::from_micros(500 + 700 * u64::from(attempt)));
        s.daemon.kill9();
        let flagged: usize = (0..QUEUES).map(|q| inflight.flagged(q).len()).sum();
        let used: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        let posted: Vec<u16> = rings.iter().map(|r| r.avail_idx(&mem)).collect();
        eprintln!(
            "attempt {attempt}: killed with {flagged} requests flagged in flight, used {used:?}, \
             posted {posted:?}"
        );
        caught_in_flight += usize::from(flagged > 0);

        // cloud-hypervisor sees the hang-up and reconnects to the restarted daemon.
        drop(ch);
        let log_before = s.daemon.log_text().len();
        s.daemon = start_daemon(&s.img, &s.sock, &s.log);
        ch = Ch::connect(&s.sock, QUEUES);
        ch.set_protocol_features_again(proto);
        ch.setup(&mem, &rings, acked, use_inflight.then_some(&mut inflight));
        check_batch(&mem, &mut rings, attempt);
        if flagged > 0 {
            let log = s.daemon.log_text();
            assert!(
                log[log_before..].contains("left in flight by the previous run are run again"),
                "attempt {attempt}: the new daemon did not run the requests again:\n{log}"
            );
        }
        if caught_in_flight > 0 && attempt >= 1 {
            break;
        }
    }
    assert!(
        caught_in_flight > 0,
        "no kill caught a request in flight: the reconnect path was not exercised"
    );
    io_on_all_queues(&mem, &mut rings, 6);
    finish(s, ch);
}

/// cloud-hypervisor's local live migration (`send-migration --local`), on a daemon without
/// DEVICE_STATE: the source pauses (rings disabled, nothing waited for), snapshots no backend
/// state and closes the connection with requests in flight; the destination, sharing the guest
/// memory, connects, sets the protocol features it was handed (no GET), gets a new inflight
/// region and sets each ring's base to the available index. Every request completes once.
#[test]
fn local_migration_with_requests_in_flight() {
    let s = start();
    let mem = guest_memory(&[(0, RAM)]);
    let mut inflight = Inflight::default();
    let (mut ch, acked, mut rings) = activate(&s, &mem, Some(&mut inflight));
    let proto = ch.acked_protocol;
    io_on_all_queues(&mem, &mut rings, 7);
    for round in 0..3u8 {
        post_batch(&mem, &mut rings, round);
        // `pause_vhost_user`, then the snapshot's `shutdown`.
        ch.pause(QUEUES);
        let used: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        drop(ch);
        let posted: Vec<u16> = rings.iter().map(|r| r.avail_idx(&mem)).collect();
        eprintln!("round {round}: paused at used {used:?} of posted {posted:?}");
        // The destination: `Blk::new` with a state, then activation.
        ch = Ch::connect(&s.sock, QUEUES);
        ch.set_protocol_features_again(proto);
        let mut fresh = Inflight::default();
        ch.setup(&mem, &rings, acked, Some(&mut fresh));
        check_batch(&mem, &mut rings, round);
    }
    io_on_all_queues(&mem, &mut rings, 8);
    finish(s, ch);
}
