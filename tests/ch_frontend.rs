//! The daemon driven the way cloud-hypervisor's vhost-user-blk frontend drives it (its features,
//! protocol features and message order, replayed by tests/common/chfront.rs on the rust-vmm
//! `vhost` crate's `Frontend`), with real requests on its split rings in memfd guest memory:
//! activation and I/O on two queues, memory hotplug, a guest reboot, the dirty log of a
//! migration, a local migration, a migration with DEVICE_STATE between two daemons, a
//! snapshot and resume, and a reconnect to a restarted daemon, all with requests in flight
//! (stopped rings and a saved state; the inflight region). A cloud-hypervisor guest itself
//! cannot boot here (no usable KVM).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::chfront::{ch_protocol_features, ch_virtio_features, page_dirty, Ch, Inflight};
use common::guest::{Backend, Which};
use common::vring::*;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
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
    // Offered: cloud-hypervisor then stops every ring (GET_VRING_BASE, which waits for the
    // requests in flight) and carries a backend state and the ring positions when it
    // snapshots or migrates (README, "cloud-hypervisor: what is verified").
    assert!(ch
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

    // Kill points from just after the kick to well past the batch's end: how long the batch
    // takes depends on the machine (on an idle CI machine all of it completed within 0.5 ms).
    const KILL_AFTER_US: [u64; 10] = [50, 150, 300, 500, 800, 1200, 1900, 2600, 3300, 4000];
    let mut caught_in_flight = 0;
    for (attempt, after) in (0u8..).zip(KILL_AFTER_US) {
        post_batch(&mem, &mut rings, attempt);
        std::thread::sleep(Duration::from_micros(after));
        s.daemon.kill9();
        let flagged: usize = (0..QUEUES).map(|q| inflight.flagged(q).len()).sum();
        let used: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        let posted: Vec<u16> = rings.iter().map(|r| r.avail_idx(&mem)).collect();
        eprintln!(
            "attempt {attempt}: killed {after} us after the kick with {flagged} requests flagged \
             in flight, used {used:?}, posted {posted:?}"
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

/// cloud-hypervisor's local live migration (`send-migration --local`): the source pauses
/// (rings disabled) with requests in flight; its snapshot, with DEVICE_STATE acked, stops
/// every ring (GET_VRING_BASE) and saves the backend state (without it, nothing is waited
/// for); the connection is closed. The destination, sharing the guest memory, connects, sets
/// the protocol features it was handed (no GET), loads the state, gets a new inflight region
/// and sets each ring's base to the carried one (without a state: the available index).
/// Every request completes once.
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
        // `pause_vhost_user`, then the snapshot's `state()` and `shutdown`.
        ch.pause(QUEUES);
        let used: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        let saved = proto
            .contains(VhostUserProtocolFeatures::DEVICE_STATE)
            .then(|| ch.save_backend_state(QUEUES).unwrap());
        drop(ch);
        let posted: Vec<u16> = rings.iter().map(|r| r.avail_idx(&mem)).collect();
        eprintln!("round {round}: paused at used {used:?} of posted {posted:?}");
        // The destination: `Blk::new` with a state, then activation.
        ch = Ch::connect(&s.sock, QUEUES);
        ch.set_protocol_features_again(proto);
        if let Some((state, _)) = &saved {
            ch.restore_backend_state(state).unwrap();
        }
        let mut fresh = Inflight::default();
        let bases = saved.as_ref().map(|(_, b)| b.as_slice());
        ch.setup_with_bases(&mem, &rings, acked, Some(&mut fresh), bases);
        check_batch(&mem, &mut rings, round);
    }
    io_on_all_queues(&mem, &mut rings, 8);
    finish(s, ch);
}

/// cloud-hypervisor's snapshot of a running VM, then `resume` on the same connection (also what
/// its source does when a migration fails after the snapshot): pause with requests in flight,
/// the rings stopped and the state saved; `resume` runs `setup_vhost_user` again with the
/// bases it kept and the inflight region it holds. The requests not yet taken run then, each
/// request completes once.
#[test]
fn snapshot_then_resume_continues_at_the_carried_bases() {
    let s = start();
    let mem = guest_memory(&[(0, RAM)]);
    let mut inflight = Inflight::default();
    let (mut ch, acked, mut rings) = activate(&s, &mem, Some(&mut inflight));
    io_on_all_queues(&mem, &mut rings, 11);
    for round in 0..2u8 {
        post_batch(&mem, &mut rings, round);
        ch.pause(QUEUES);
        let (_, bases) = ch.save_backend_state(QUEUES).unwrap();
        for (q, r) in rings.iter().enumerate() {
            assert_eq!(bases[q], u64::from(r.used_idx(&mem)), "queue {q}: base");
        }
        eprintln!("round {round}: snapshot at bases {bases:?}");
        ch.setup_with_bases(&mem, &rings, acked, Some(&mut inflight), Some(&bases));
        check_batch(&mem, &mut rings, round);
    }
    io_on_all_queues(&mem, &mut rings, 12);

    // A state whose position for queue 0 is not where its ring starts (as after guest memory
    // older than the state) is said loudly when the ring starts.
    ch.pause(QUEUES);
    let (mut state, bases) = ch.save_backend_state(QUEUES).unwrap();
    let later = (bases[0] as u16).wrapping_add(1);
    state[34..36].copy_from_slice(&later.to_le_bytes());
    ch.restore_backend_state(&state).unwrap();
    ch.setup_with_bases(&mem, &rings, acked, Some(&mut inflight), Some(&bases));
    let warning = format!(
        "queue 0 starts at available index {}, the source stopped at {later}",
        bases[0]
    );
    let log = s.daemon.log_text();
    assert!(log.contains(&warning), "no \"{warning}\" in:\n{log}");
    assert!(!log.contains("queue 1 starts at"), "{log}");
    io_on_all_queues(&mem, &mut rings, 13);
    finish(s, ch);
}

/// Guest memory as the destination of a migration receives it: a copy of the source's, made
/// at its last dirty-log read. Whatever the source's daemon writes after that never arrives.
fn copy_memory(src: &Mem) -> Mem {
    let dst = guest_memory(&[(0, RAM)]);
    let mut buf = vec![0u8; RAM as usize];
    src.read_slice(&mut buf, GuestAddress(0)).unwrap();
    dst.write_slice(&buf, GuestAddress(0)).unwrap();
    dst
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

fn control(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.qmp"))
}

fn set_active(dir: &Path, name: &str, on: bool) {
    let mut q = common::qmp::Qmp::connect(&control(dir, name));
    let r = q.cmd("blockdev-set-active", serde_json::json!({ "active": on }));
    assert_eq!(
        r,
        serde_json::json!({"return": {}}),
        "{name}: set active {on}"
    );
}

/// cloud-hypervisor's live migration with DEVICE_STATE between two daemons on one image
/// (shared storage), back and forth, with requests in flight when the VM pauses: the source
/// stops each ring (GET_VRING_BASE: its requests in flight finish first), saves its state
/// through a socket pair, CHECK_DEVICE_STATE; the guest memory the destination gets is a
/// copy made after that (a completion later than the copy would be lost); the image is
/// handed over (`blockdev-set-active`); the destination loads the state, CHECK_DEVICE_STATE,
/// and starts the rings at the carried bases with a new inflight region. Every request
/// completes exactly once, every write reads back, a guest-set write cache flag travels, and
/// a state the destination cannot serve is refused at CHECK_DEVICE_STATE.
#[test]
fn migration_with_device_state_between_two_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("ch.qcow2");
    common::create_with_cli(&img, "64M", &[]);
    let names = ["a", "b"];
    let mut daemons: Vec<Backend> = names
        .iter()
        .map(|n| {
            let (sock, ctl) = (d.join(format!("{n}.sock")), control(d, n));
            let mut args = vec!["--serial", SERIAL, "--control", ctl.to_str().unwrap()];
            if *n == "b" {
                args.push("--inactive");
            }
            let log = d.join(format!("{n}.log"));
            let mut b = Backend::start_with(Which::Ours, &img, &sock, &log, &args);
            b.wait_listening(&sock);
            b
        })
        .collect();
    let s = Setup {
        _dir: tempfile::tempdir().unwrap(),
        img: img.clone(),
        sock: d.join("a.sock"),
        log: d.join("a.log"),
        daemon: daemons.remove(0),
    };
    let mut mem = guest_memory(&[(0, RAM)]);
    let (mut ch, acked, mut rings) = activate(&s, &mem, Some(&mut Inflight::default()));
    assert!(ch
        .acked_protocol
        .contains(VhostUserProtocolFeatures::DEVICE_STATE));
    let proto = ch.acked_protocol;
    io_on_all_queues(&mem, &mut rings, 9);
    // The guest turns its write cache off (CONFIG_WCE): write-through from now on.
    ch.vu
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();

    let mut caught = 0;
    for round in 0..3u8 {
        let (src, dst) = (
            names[usize::from(round % 2)],
            names[usize::from(1 - round % 2)],
        );
        post_batch(&mem, &mut rings, round);
        // Pause, then `state()`: the rings stop, the state is saved.
        ch.pause(QUEUES);
        let used: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        let posted: Vec<u16> = rings.iter().map(|r| r.avail_idx(&mem)).collect();
        let src_log = d.join(format!("{src}.log"));
        let (state, bases) = ch
            .save_backend_state(QUEUES)
            .unwrap_or_else(|e| panic!("round {round}: {e}; {src}'s log:\n{}", read(&src_log)));
        let done: Vec<u16> = rings.iter().map(|r| r.used_idx(&mem)).collect();
        eprintln!(
            "round {round} {src}->{dst}: paused at used {used:?} of posted {posted:?}; \
             stopped at bases {bases:?}, used {done:?}; state of {} bytes",
            state.len()
        );
        caught += usize::from(used != posted);
        for q in 0..QUEUES {
            assert_eq!(
                bases[q],
                u64::from(done[q]),
                "round {round} queue {q}: GET_VRING_BASE answered with requests not in the \
                 used ring"
            );
        }
        // The last memory pass, then the snapshot's `shutdown`.
        let copy = copy_memory(&mem);
        let old = std::mem::replace(&mut mem, copy);
        drop(ch);
        // The destination: `Blk::new` with the state; the image handed over; activation.
        let dst_sock = d.join(format!("{dst}.sock"));
        ch = Ch::connect(&dst_sock, QUEUES);
        ch.set_protocol_features_again(proto);
        let dst_log = d.join(format!("{dst}.log"));
        ch.restore_backend_state(&state)
            .unwrap_or_else(|e| panic!("round {round}: {e}; {dst}'s log:\n{}", read(&dst_log)));
        set_active(d, src, false);
        set_active(d, dst, true);
        ch.setup_with_bases(
            &mem,
            &rings,
            acked,
            Some(&mut Inflight::default()),
            Some(&bases),
        );
        check_batch(&mem, &mut rings, round);
        // Nothing completed twice, nothing late on the source.
        std::thread::sleep(Duration::from_millis(100));
        for (q, r) in rings.iter().enumerate() {
            assert_eq!(
                r.used_idx(&mem),
                r.avail_idx(&mem),
                "queue {q}: extra completions"
            );
            assert_eq!(
                r.used_idx(&old),
                done[q],
                "queue {q}: completed on the source late"
            );
        }
        let cfg = ch.get_config();
        assert_eq!(
            cfg[32], 0,
            "round {round}: the write cache flag did not travel"
        );
        let log = read(&dst_log);
        assert!(!log.contains("disagree"), "round {round}:\n{log}");
    }
    assert!(caught > 0, "no pause caught requests in flight");
    io_on_all_queues(&mem, &mut rings, 10);
    // The disk grows (`block_resize`): a state says the size the guest is told now.
    let mut q = common::qmp::Qmp::connect(&control(d, names[1]));
    let r = q.cmd(
        "block_resize",
        serde_json::json!({"node-name": "disk", "size": 96u64 << 20}),
    );
    assert_eq!(r, serde_json::json!({"return": {}}));
    drop(q);

    let log = d.join(format!("{}.log", names[1]));
    let o = states_refused(d, &mut ch, proto, &log);
    drop(ch);
    for mut b in [s.daemon, o].into_iter().chain(daemons) {
        let st = b.terminate();
        assert!(st.success(), "{} exit {st}:\n{}", b.name, b.log_text());
    }
    common::assert_check_clean(&img);
}

/// The states a daemon refuses: a save while the rings behind `ch` run (the daemon whose log
/// is `active_log`), and at CHECK_DEVICE_STATE, a state of another disk and a truncated one
/// (a third daemon, returned, serving a smaller image).
fn states_refused(
    d: &Path,
    ch: &mut Ch,
    proto: VhostUserProtocolFeatures,
    active_log: &Path,
) -> Backend {
    // Saving while the rings run is refused (the phase is STOPPED), and says why.
    let (_keep, remote) = std::os::unix::net::UnixStream::pair().unwrap();
    let r = ch.vu.set_device_state_fd(
        VhostTransferStateDirection::SAVE,
        VhostTransferStatePhase::STOPPED,
        remote.into(),
    );
    assert!(r.is_err(), "a state saved from running rings");
    assert!(ch.vu.check_device_state().is_err());
    let log = read(active_log);
    assert!(
        log.contains("queue 0 is still running: stop every ring (GET_VRING_BASE) before saving"),
        "{log}"
    );

    // A destination that serves another disk refuses the state at CHECK_DEVICE_STATE.
    let (mut bad, _) = ch.save_backend_state(QUEUES).unwrap();
    let other = d.join("other.qcow2");
    common::create_with_cli(&other, "32M", &[]);
    let osock = d.join("other.sock");
    let mut o = Backend::start_with(Which::Ours, &other, &osock, &d.join("o.log"), &[]);
    o.wait_listening(&osock);
    let mut och = Ch::connect(&osock, QUEUES);
    och.set_protocol_features_again(proto);
    let e = och.restore_backend_state(&bad).unwrap_err();
    assert!(e.contains("VhostUserCheckDeviceState"), "{e}");
    bad.truncate(10);
    let e = och.restore_backend_state(&bad).unwrap_err();
    assert!(e.contains("VhostUserCheckDeviceState"), "{e}");
    let log = o.log_text();
    for refusal in [
        "the source served 196608 sectors, this daemon serves 65536",
        "state of 10 bytes, expected 32",
    ] {
        assert!(log.contains(refusal), "no \"{refusal}\" in:\n{log}");
    }
    o
}
