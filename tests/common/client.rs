//! The blkio client (libblkio's virtio-blk-vhost-user driver) and daemon-process helpers shared
//! by the daemon tests.
#![allow(dead_code)]

use std::io::Read;
use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const QUEUE_SIZE: i32 = 128;
pub const DEPTH: usize = 32; // libblkio needs a queue size of at least 3 x the depth

pub fn wait_for(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub struct Client {
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    // Dropped last: the queues and the region belong to it.
    _blkio: Blkio,
}

impl Client {
    pub fn connect(socket: &Path, num_queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        b.set_i32("queue-size", QUEUE_SIZE)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(8 << 20)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            queues: out.queues,
            region,
            _blkio: b,
        })
    }

    /// The disk's size as the client read it from the config space at connect.
    pub fn capacity(&self) -> u64 {
        self._blkio.get_u64("capacity").unwrap()
    }

    pub fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY (test): the region is mapped for the client's lifetime; callers use disjoint
        // ranges per in-flight request.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    /// Wait for `n` completions on queue `q`; returns them.
    pub fn reap(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut c: Vec<MaybeUninit<Completion>> =
                (0..n).map(|_| MaybeUninit::uninit()).collect();
            let mut timeout = Duration::from_secs(20);
            let got = self.queues[q]
                .do_io(&mut c, 1, Some(&mut timeout), None)
                .unwrap();
            assert!(got > 0, "no completion within 20 s");
            for slot in c.iter().take(got) {
                // SAFETY (test): do_io initialised the first `got` entries.
                let comp = unsafe { slot.assume_init_read() };
                out.push((comp.user_data, comp.ret));
            }
        }
        out
    }

    /// Run one request on queue `q` and return its result (0 or -errno).
    pub fn one(&mut self, q: usize, f: impl FnOnce(&mut Blkioq)) -> i32 {
        f(&mut self.queues[q]);
        self.reap(q, 1)[0].1
    }

    pub fn write(&mut self, q: usize, disk_off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.one(q, |queue| {
            queue.write(disk_off, p, len, 0, ReqFlags::empty())
        })
    }

    pub fn read(&mut self, q: usize, disk_off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.one(q, |queue| {
            queue.read(disk_off, p, len, 0, ReqFlags::empty())
        })
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Flags `./run test` adds to every daemon the tests start, for a second pass in other modes
/// (e.g. "--aio threads --cache none"); a test's own flags come after and win.
pub fn env_serve_args() -> Vec<String> {
    std::env::var("VUQ_TEST_SERVE_ARGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

pub fn spawn_binary(image: &Path, socket: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
        .arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--socket")
        .arg(socket)
        .args(env_serve_args())
        .args(extra)
        // The tests read the log at info level, and only at exit: more (RUST_LOG=debug from
        // the caller's environment) could fill the pipe and stall the daemon.
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("the daemon did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// Kill the daemon and fail the test with `what` and everything the daemon logged.
pub fn fail_with_log(child: &mut Child, what: &str) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}\n--- daemon stderr ---\n{}", stderr_of(child));
}

/// Connect to the daemon `child` serves, or fail the test with its log.
pub fn connect_or_fail(child: &mut Child, socket: &Path, num_queues: i32) -> Client {
    Client::connect(socket, num_queues, false)
        .unwrap_or_else(|e| fail_with_log(child, &format!("connect: {e}")))
}
