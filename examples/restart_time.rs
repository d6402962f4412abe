//! Restart time after a daemon crash: from exec of `serve` to the first request served, on an
//! image with many allocated clusters that the previous daemon left unclean (SIGKILL after
//! allocating writes), for each refcount / dedup setting.
//!
//! `cargo run --release --example restart_time -- [--gib 8] [--cluster-size 8192]
//!  [--bin target/release/vhost-user-qcow2] [--dir D] [--only strict|lazy|dedup|dedup-lazy]`
//!
//! Needs `--gib` GiB of disk per setting (one image at a time) and the daemon binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::FileStorage;

#[path = "util/args.rs"]
mod args;
#[path = "util/fill.rs"]
mod fill;
use args::arg;

struct Setting {
    name: &'static str,
    lazy: bool,
    dedup: bool,
}

const SETTINGS: [Setting; 4] = [
    Setting {
        name: "strict",
        lazy: false,
        dedup: false,
    },
    Setting {
        name: "lazy",
        lazy: true,
        dedup: false,
    },
    Setting {
        name: "dedup",
        lazy: false,
        dedup: true,
    },
    Setting {
        name: "dedup-lazy",
        lazy: true,
        dedup: true,
    },
];

fn str_arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .cloned()
}

/// One synchronous request on queue 0 of a fresh blkio connection.
struct Client {
    q: blkio::Blkioq,
    buf: blkio::MemoryRegion,
    // Dropped last: the queue and the region belong to it.
    _blkio: Blkio,
}

impl Client {
    fn connect(sock: &Path) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", sock.to_str().unwrap_or_default())?;
        b.connect()?;
        b.set_i32("num-queues", 1)?;
        let mut out = b.start()?;
        let buf = b.alloc_mem_region(1 << 20)?;
        b.map_mem_region(&buf)?;
        let q = out.queues.remove(0);
        Ok(Client { q, buf, _blkio: b })
    }

    fn io(&mut self, write: bool, off: u64, len: usize) -> i32 {
        let p = self.buf.addr as *mut u8;
        if write {
            self.q.write(off, p, len, 0, ReqFlags::empty());
        } else {
            self.q.read(off, p, len, 0, ReqFlags::empty());
        }
        let mut c = [std::mem::MaybeUninit::<Completion>::uninit(); 1];
        let n = self.q.do_io(&mut c, 1, None, None).unwrap_or(0);
        if n == 1 {
            // SAFETY: do_io initialized the first `n` completions.
            unsafe { c[0].assume_init_ref() }.ret
        } else {
            -1
        }
    }
}

/// The daemon process; killed and reaped when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(bin: &Path, img: &Path, sock: &Path, s: &Setting, log: &Path) -> Daemon {
    let out = std::fs::File::create(log).expect("log file");
    Command::new(bin)
        .arg("serve")
        .arg("--image")
        .arg(img)
        .arg("--socket")
        .arg(sock)
        .args(["--lazy-refcounts", if s.lazy { "on" } else { "off" }])
        .args(["--dedup", if s.dedup { "inline" } else { "off" }])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .map(Daemon)
        .expect("cannot start the daemon")
}

fn fill(img: &Path, gib: u64, cs: u64, s: &Setting) -> anyhow::Result<u64> {
    let size = gib << 30;
    let o = CreateOptions {
        // Room past the filled part for the allocating writes before the crash.
        size: size + (64 << 20),
        cluster_bits: cs.trailing_zeros(),
        lazy_refcounts: s.lazy,
        dedup: s.dedup,
        ..Default::default()
    };
    create(&FileStorage::new(std::fs::File::create(img)?), &o)?;
    let q = Qcow2::open_with(
        img,
        &OpenOptions {
            dedup: Some(s.dedup),
            lazy_refcounts: Some(s.lazy),
            ..Default::default()
        },
    )?;
    let n = size / cs;
    fill::write_unique(&q, n, cs, |_| Ok(()))?;
    q.close()?;
    Ok(n)
}

fn main() -> anyhow::Result<()> {
    let gib = arg("--gib", 8);
    let cs = arg("--cluster-size", 8192);
    let bin =
        PathBuf::from(str_arg("--bin").unwrap_or_else(|| "target/release/vhost-user-qcow2".into()));
    let tmp = tempfile::tempdir()?;
    let dir = str_arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let only = str_arg("--only");
    println!("| setting | clusters | exec to first request | repair | dedup index |");
    println!("| --- | --- | --- | --- | --- |");
    for s in SETTINGS.iter() {
        if only.as_deref().is_some_and(|o| o != s.name) {
            continue;
        }
        let img = dir.join(format!("restart-{}.qcow2", s.name));
        let sock = dir.join("restart.sock");
        let log = dir.join(format!("restart-{}.log", s.name));
        let n = fill(&img, gib, cs, s)?;
        // The crash: allocating writes past the filled part, then SIGKILL.
        let d = serve(&bin, &img, &sock, s, &dir.join("before-crash.log"));
        let t = Instant::now();
        let mut c = loop {
            match Client::connect(&sock) {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(600) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => anyhow::bail!("cannot connect before the crash: {e}"),
            }
        };
        for i in 0..256u64 {
            let r = c.io(true, (gib << 30) + i * cs * 3, 4096);
            anyhow::ensure!(r == 0, "write before the crash failed: {r}");
        }
        drop(d);
        drop(c);
        let _ = std::fs::remove_file(&sock);
        // The restart.
        let t0 = Instant::now();
        let mut d = serve(&bin, &img, &sock, s, &log);
        let mut c = loop {
            match Client::connect(&sock) {
                Ok(c) => break c,
                Err(_) if t0.elapsed() < Duration::from_secs(600) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => anyhow::bail!("cannot connect after the restart: {e}"),
            }
        };
        let r = c.io(false, 0, 4096);
        let took = t0.elapsed();
        anyhow::ensure!(r == 0, "first read after the restart failed: {r}");
        drop(c);
        // SAFETY: signalling our own child, not reaped yet.
        unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
        d.0.wait()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let find = |what: &str| {
            text.lines()
                .find(|l| l.contains(what))
                .and_then(|l| l.split(what).nth(1))
                .map(|r| r.split(':').next().unwrap_or(r).trim().to_string())
                .unwrap_or_else(|| "-".into())
        };
        // The open leaves the hashing to the dedup worker: it logs the set-up instead.
        let index = match find("dedup index rebuilt in") {
            x if x == "-" => find("dedup index set up for a rebuild in"),
            x => x,
        };
        println!(
            "| {} | {n} | {took:.2?} | {} | {index} |",
            s.name,
            find("repair done in"),
        );
        std::fs::remove_file(&img)?;
    }
    Ok(())
}
