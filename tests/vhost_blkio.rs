//! End-to-end tests of the vhost-user-blk daemon with a real client: the `blkio` crate's
//! virtio-blk-vhost-user driver (libblkio in Rust), which speaks vhost-user over the socket and
//! drives real virtqueues in shared memory.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
mod common;

use common::client::*;
use vhost_user_qcow2::block::{BlockDevice, MemDisk};
use vhost_user_qcow2::raw::RawDisk;
use vhost_user_qcow2::vhost::{serve, ServeConfig, StopHandle, VhostError};

struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<Result<(), VhostError>>>,
}

impl Server {
    fn start(dev: Arc<dyn BlockDevice>, num_queues: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let stop = StopHandle::new().unwrap();
        let mut cfg = ServeConfig::new(&socket);
        cfg.num_queues = num_queues;
        cfg.serial = "test-serial".into();
        cfg.stop = Some(stop.clone());
        let thread = std::thread::spawn(move || serve(dev, cfg));
        wait_for(&socket);
        Server {
            _dir: dir,
            socket,
            stop,
            thread: Some(thread),
        }
    }

    fn shutdown(mut self) -> Result<(), VhostError> {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The tests of this file run one at a time, so thread counts are this test's own.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Threads of this process whose name starts with `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim().starts_with(name))
        .count()
}

fn raw_image(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

/// More queues than host CPUs: the queues share at most one worker thread per CPU, and every
/// queue still serves.
#[test]
fn more_queues_than_cpus_share_one_thread_per_cpu() {
    let _serial = serial();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues = cpus * 2 + 1;
    let img = raw_image(16 << 20);
    let dev = Arc::new(RawDisk::open(img.path(), false).unwrap());
    let server = Server::start(dev, queues as u16);
    let mut c = Client::connect(&server.socket, queues as i32, false).unwrap();
    let t0 = Instant::now();
    while threads_named("vuq-queue") != cpus && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads_named("vuq-queue"), cpus, "one worker per CPU");
    for q in 0..queues {
        c.buf(0, 4096).copy_from_slice(&pattern(q as u64, 4096));
        assert_eq!(c.write(q, (q * 4096) as u64, 0, 4096), 0, "queue {q}");
    }
    for q in 0..queues {
        assert_eq!(c.read(q, (q * 4096) as u64, 0, 4096), 0, "queue {q}");
        assert!(
            c.buf(0, 4096) == &pattern(q as u64, 4096)[..],
            "queue {q} read back"
        );
    }
}

#[test]
fn two_queues_write_read_verify_at_depth() {
    let _serial = serial();
    let img = raw_image(64 << 20);
    let dev = Arc::new(RawDisk::open(img.path(), false).unwrap());
    let server = Server::start(dev, 2);
    let mut c = Client::connect(&server.socket, 2, false).unwrap();
    // One worker thread per queue (threads of an earlier test's daemon may still be exiting).
    let t0 = Instant::now();
    while threads_named("vuq-queue") != 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(threads_named("vuq-queue"), 2);
    let bs = 64 * 1024;
    // Each queue writes DEPTH requests at once into its own half of the disk, several rounds.
    for round in 0..4u64 {
        for q in 0..2usize {
            for i in 0..DEPTH {
                let slot = q * DEPTH + i;
                let data = pattern(round * 1000 + slot as u64, bs);
                c.buf(slot * bs, bs).copy_from_slice(&data);
                let disk = (((q * 32) << 20) + i * bs + round as usize * DEPTH * bs) as u64;
                let p = c.ptr(slot * bs);
                c.queues[q].write(disk, p, bs, slot, ReqFlags::empty());
            }
        }
        for q in 0..2 {
            for (_, ret) in c.reap(q, DEPTH) {
                assert_eq!(ret, 0);
            }
        }
    }
    assert_eq!(c.one(0, |q| q.flush(0, ReqFlags::empty())), 0);
    // Read everything back through the other queue and compare.
    for round in 0..4u64 {
        for q in 0..2usize {
            for i in 0..DEPTH {
                let slot = q * DEPTH + i;
                c.buf(slot * bs, bs).fill(0);
                let disk = (((q * 32) << 20) + i * bs + round as usize * DEPTH * bs) as u64;
                let p = c.ptr(slot * bs);
                c.queues[1 - q].read(disk, p, bs, slot, ReqFlags::empty());
            }
        }
        for q in 0..2 {
            for (_, ret) in c.reap(q, DEPTH) {
                assert_eq!(ret, 0);
            }
        }
        for slot in 0..2 * DEPTH {
            assert!(
                c.buf(slot * bs, bs) == pattern(round * 1000 + slot as u64, bs).as_slice(),
                "round {round} slot {slot} differs"
            );
        }
    }
    drop(c);
    server.shutdown().unwrap();
    // The data is in the file itself.
    let mut file = Vec::new();
    std::fs::File::open(img.path())
        .unwrap()
        .read_to_end(&mut file)
        .unwrap();
    assert_eq!(&file[0..bs], pattern(0, bs).as_slice());
    assert_eq!(
        &file[32 << 20..(32 << 20) + bs],
        pattern(DEPTH as u64, bs).as_slice()
    );
}

#[test]
fn flush_discard_write_zeroes_and_bad_ranges() {
    let _serial = serial();
    let disk = Arc::new(MemDisk::new(8 << 20, false));
    let server = Server::start(disk.clone(), 1);
    let mut c = Client::connect(&server.socket, 1, false).unwrap();
    let data = pattern(7, 1 << 20);
    c.buf(0, 1 << 20).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 1 << 20), 0);
    assert_eq!(c.one(0, |q| q.flush(0, ReqFlags::empty())), 0);
    assert_eq!(&disk.contents()[..1 << 20], data.as_slice());

    assert_eq!(
        c.one(0, |q| q.discard(64 << 10, 64 << 10, 0, ReqFlags::empty())),
        0
    );
    assert_eq!(
        c.one(0, |q| q.write_zeroes(256 << 10, 4096, 0, ReqFlags::empty())),
        0
    );
    assert_eq!(
        c.one(0, |q| q.write_zeroes(
            512 << 10,
            8192,
            0,
            ReqFlags::NO_UNMAP
        )),
        0
    );
    let got = disk.contents();
    let mut want = data.clone();
    want[64 << 10..128 << 10].fill(0);
    want[256 << 10..(256 << 10) + 4096].fill(0);
    want[512 << 10..(512 << 10) + 8192].fill(0);
    assert!(
        got[..1 << 20] == want[..],
        "discard/write-zeroes ranges wrong"
    );

    // Requests the device must refuse: past the end, straddling the end.
    assert_ne!(c.read(0, 8 << 20, 0, 4096), 0);
    assert_ne!(c.write(0, (8 << 20) - 512, 0, 1024), 0);
    assert_ne!(
        c.one(0, |q| q.discard(8 << 20, 4096, 0, ReqFlags::empty())),
        0
    );
    // And the daemon is still serving.
    c.buf(0, 4096).fill(0);
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert_eq!(c.buf(0, 4096), &data[..4096]);
    drop(c);
    server.shutdown().unwrap();
}

#[test]
fn read_only_device() {
    let _serial = serial();
    let disk = Arc::new(MemDisk::new(4 << 20, true));
    let server = Server::start(disk, 1);
    // A writable client is refused at start: the device offers VIRTIO_BLK_F_RO.
    let err = Client::connect(&server.socket, 1, false)
        .err()
        .expect("RO device accepted RW");
    assert!(
        err.message().to_lowercase().contains("read-only"),
        "{}",
        err.message()
    );
    let mut c = Client::connect(&server.socket, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 0, 4096), 0);
    assert_ne!(c.write(0, 0, 0, 4096), 0);
    drop(c);
    server.shutdown().unwrap();
}

#[test]
fn reconnect_after_client_disconnect() {
    let _serial = serial();
    let disk = Arc::new(MemDisk::new(4 << 20, false));
    let server = Server::start(disk, 2);
    for round in 0..3u64 {
        let mut c = Client::connect(&server.socket, 2, false).unwrap();
        if round > 0 {
            assert_eq!(c.read(1, 0, 0, 4096), 0);
            assert_eq!(c.buf(0, 4096), pattern(round - 1, 4096).as_slice());
        }
        c.buf(0, 4096).copy_from_slice(&pattern(round, 4096));
        assert_eq!(c.write(0, 0, 0, 4096), 0);
        drop(c);
    }
    server.shutdown().unwrap();
}

#[test]
fn socket_mode_live_and_stale_sockets() {
    let _serial = serial();
    let disk: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(1 << 20, false));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = {
        let stop = StopHandle::new().unwrap();
        let mut cfg = ServeConfig::new(&sock);
        cfg.stop = Some(stop.clone());
        let d = disk.clone();
        let t = std::thread::spawn(move || serve(d, cfg));
        (stop, t)
    };
    // Wait until it listens (the stale file exists from the start, so try connecting).
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live socket is refused.
    let err = serve(disk.clone(), ServeConfig::new(&sock)).unwrap_err();
    assert!(matches!(err, VhostError::SocketInUse { .. }), "{err}");
    // A client can still use the first server (the probe connection above was harmless).
    let mut c = Client::connect(&sock, 1, false).unwrap();
    assert_eq!(c.read(0, 0, 0, 512), 0);
    drop(c);
    server.0.stop();
    server.1.join().unwrap().unwrap();
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn binary_serves_raw_image_and_exits_cleanly_on_sigterm() {
    let _serial = serial();
    let img = raw_image(16 << 20);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bin.sock");
    let mut child = spawn_binary(
        img.path(),
        &sock,
        &["--num-queues", "2", "--writeback", "off"],
    );
    wait_for(&sock);

    // A second server on the same image is refused by the image lock, with a clear message.
    let mut second = spawn_binary(img.path(), &dir.path().join("other.sock"), &[]);
    let st = wait_exit(&mut second, Duration::from_secs(20));
    assert!(!st.success());
    let msg = stderr_of(&mut second);
    assert!(msg.contains("in use by another process"), "{msg}");
    // qemu-io cannot write it either.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(img.path())
        .output()
        .expect("qemu-io is installed by ./run test");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "qemu-io was not refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut c = Client::connect(&sock, 2, false).unwrap();
    let data = pattern(42, 256 << 10);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(1, 4096, 0, data.len()), 0);
    // SIGTERM while the client is still connected.
    // SAFETY (test): sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = wait_exit(&mut child, Duration::from_secs(20));
    let log = stderr_of(&mut child);
    assert!(st.success(), "exit status {st:?}; log:\n{log}");
    assert!(!sock.exists(), "socket left behind");
    drop(c);

    let mut file = Vec::new();
    std::fs::File::open(img.path())
        .unwrap()
        .read_to_end(&mut file)
        .unwrap();
    assert_eq!(&file[4096..4096 + data.len()], data.as_slice());
    // The lock is gone with the process.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(img.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn binary_exits_cleanly_on_sigint_when_idle() {
    let _serial = serial();
    let img = raw_image(1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("int.sock");
    let mut child = spawn_binary(img.path(), &sock, &["--read-only"]);
    wait_for(&sock);
    // SAFETY (test): sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the daemon"
    );
    // SAFETY (test): as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let st = wait_exit(&mut child, Duration::from_secs(20));
    assert!(st.success(), "{st:?}: {}", stderr_of(&mut child));
    assert!(!sock.exists());
}

#[test]
fn binary_reports_a_missing_image() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_binary(
        &dir.path().join("nope.img"),
        &dir.path().join("s.sock"),
        &[],
    );
    let st = wait_exit(&mut child, Duration::from_secs(20));
    assert!(!st.success());
    let msg = stderr_of(&mut child);
    assert!(
        msg.contains("cannot open image") && msg.contains("nope.img"),
        "{msg}"
    );
    let _ = std::io::stderr().flush();
}

/// A disk whose first MiB fails reads with EIO and whose second MiB fails writes with ENOSPC.
struct FlakyDisk(MemDisk);

impl BlockDevice for FlakyDisk {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Result<(), vhost_user_qcow2::block::BlockError> {
        if offset < 1 << 20 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        self.0.read_vectored(offset, bufs)
    }
    fn write_vectored(
        &self,
        offset: u64,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Result<(), vhost_user_qcow2::block::BlockError> {
        if (1 << 20..2 << 20).contains(&offset) {
            return Err(vhost_user_qcow2::block::BlockError::NoSpace);
        }
        self.0.write_vectored(offset, bufs)
    }
    fn flush(&self) -> Result<(), vhost_user_qcow2::block::BlockError> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> Result<(), vhost_user_qcow2::block::BlockError> {
        self.0.discard(o, l)
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        u: bool,
    ) -> Result<(), vhost_user_qcow2::block::BlockError> {
        self.0.write_zeroes(o, l, u)
    }
}

#[test]
fn image_errors_reach_the_guest_and_the_daemon_goes_on() {
    let _serial = serial();
    let server = Server::start(Arc::new(FlakyDisk(MemDisk::new(4 << 20, false))), 1);
    let mut c = Client::connect(&server.socket, 1, false).unwrap();
    for _ in 0..3 {
        assert_ne!(c.read(0, 0, 0, 4096), 0, "EIO must reach the guest");
        assert_ne!(
            c.write(0, 1 << 20, 0, 4096),
            0,
            "ENOSPC must reach the guest"
        );
        c.buf(0, 4096).copy_from_slice(&pattern(3, 4096));
        assert_eq!(c.write(0, 3 << 20, 0, 4096), 0);
        c.buf(0, 4096).fill(0);
        assert_eq!(c.read(0, 3 << 20, 0, 4096), 0);
        assert_eq!(c.buf(0, 4096), pattern(3, 4096).as_slice());
    }
    drop(c);
    server.shutdown().unwrap();
}

#[test]
fn the_timer_hook_ticks_on_the_main_loop() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = StopHandle::new().unwrap();
    let mut cfg = ServeConfig::new(dir.path().join("t.sock"));
    cfg.stop = Some(stop.clone());
    cfg.tick_interval = Duration::from_millis(10);
    let t = ticks.clone();
    cfg.tick = Some(Box::new(move || {
        t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    let server = std::thread::spawn(move || serve(Arc::new(MemDisk::new(1 << 20, false)), cfg));
    let t0 = Instant::now();
    while ticks.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the tick never ran 3 times"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.stop();
    server.join().unwrap().unwrap();
}
