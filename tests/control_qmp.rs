//! The QMP control socket of the real daemon (`serve --control`), driven from Rust over the
//! socket: negotiation, every command, statistics after real I/O through blkio, bad input of
//! every kind, too many clients, `quit` giving exit 0 and a clean image, and an injected
//! BLOCK_IMAGE_CORRUPTED event reaching every negotiated client. The `qemu.qmp` package's own
//! client is driven by tests/qmp_client.py.

mod common;

use common::client::*;
use common::qmp::{error_class, Qmp};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(extra: &[&str]) -> Daemon {
        Daemon::start_on("64M", &[], extra)
    }
    /// `start` on an image of `size` made with `create` options `create`.
    fn start_on(size: &str, create: &[&str], extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        common::create_with_cli(&img, size, create);
        let ctl = dir.path().join("c.sock");
        let mut args = vec!["--control", ctl.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = spawn_binary(&img, &dir.path().join("v.sock"), &args);
        wait_for(&ctl);
        wait_for(&dir.path().join("v.sock"));
        Daemon { child, dir }
    }
    fn ctl(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }
    fn sock(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }
    fn img(&self) -> PathBuf {
        self.dir.path().join("d.qcow2")
    }
    /// Panic with the daemon's log when `ok` is false.
    fn check(&mut self, ok: bool, what: &str) {
        if !ok {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("{what}; daemon log:\n{}", stderr_of(&mut self.child));
        }
    }
    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    /// `quit` over QMP: the reply, then SHUTDOWN, then EOF; exit 0; qemu-img check clean.
    /// Returns the daemon's log.
    fn quit(mut self) -> String {
        let mut q = Qmp::connect_when_free(&self.ctl());
        assert_eq!(q.cmd("quit", json!({})), json!({"return": {}}));
        let ev = q.read().expect("no SHUTDOWN event");
        assert_eq!(ev["event"], "SHUTDOWN", "{ev}");
        assert_eq!(ev["data"]["reason"], "host-qmp-quit");
        assert!(q.read().is_none(), "the connection stays open after quit");
        let st = wait_exit(&mut self.child, Duration::from_secs(30));
        let log = stderr_of(&mut self.child);
        assert!(st.success(), "exit status {st:?}; log:\n{log}");
        assert!(!self.ctl().exists(), "control socket left behind");
        assert!(!self.sock().exists(), "vhost-user socket left behind");
        common::assert_check_clean(&self.img());
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn commands_answer_and_quit_leaves_a_clean_image() {
    let mut d = Daemon::start(&[]);
    let mode = std::fs::metadata(d.ctl()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut q = Qmp::connect(&d.ctl());

    let st = q.ok("query-status");
    assert_eq!(st["status"], "running");
    assert_eq!(st["running"], true);
    assert_eq!(st["vmm-connected"], false);

    let info = q.ok("query-image");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(info["cluster-size"], 65536);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");

    let dd = q.ok("query-dedup");
    assert_eq!(dd["mode"], "off");
    assert_eq!(dd["running"], false);
    assert_eq!(dd["clusters-deduplicated"], 0);
    for c in ["dedup-pause", "dedup-resume"] {
        let r = q.cmd(c, json!({}));
        assert_eq!(error_class(&r), "GenericError");
        assert_eq!(
            r["error"]["desc"],
            "deduplication is not enabled on this image"
        );
    }
    let r = q.cmd("dedup-set-mode", json!({"mode": "background"}));
    assert_eq!(
        r["error"]["desc"],
        "deduplication is not enabled on this image"
    );

    // I/O through the vhost-user socket shows up in query-stats.
    let mut c = Client::connect(&d.sock(), 1, false).unwrap();
    assert_eq!(q.ok("query-status")["vmm-connected"], true);
    let data = pattern(1, 65536);
    c.buf(0, 65536).copy_from_slice(&data);
    for i in 0..4u64 {
        let r = c.write(0, i * 65536, 0, 65536);
        d.check(r == 0, &format!("write {i} returned {r}"));
    }
    let r = c.read(0, 0, 65536, 65536);
    d.check(r == 0, &format!("read returned {r}"));
    let s = q.ok("query-stats");
    let q0 = &s["queues"][0];
    assert_eq!(q0["write-requests"], 4, "{s}");
    assert_eq!(q0["bytes-written"], 4 * 65536);
    assert_eq!(q0["read-requests"], 1);
    assert_eq!(q0["bytes-read"], 65536);
    assert_eq!(q0["errors"], 0);
    let h = &q0["latency-histogram"];
    let bins: u64 = h["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(bins, q0["requests"].as_u64().unwrap());
    assert_eq!(
        h["bins"].as_array().unwrap().len(),
        h["boundaries-us"].as_array().unwrap().len() + 1
    );
    assert_eq!(s["total"]["bytes-written"], 4 * 65536);
    assert!(
        s["engine"]["clusters-allocated"].as_u64().unwrap() >= 4,
        "{s}"
    );
    // An out-of-range read is an error in the counters.
    assert_ne!(c.read(0, 64 << 20, 0, 4096), 0);
    assert_eq!(q.ok("query-stats")["queues"][0]["errors"], 1);
    // Quit with the VMM still connected: the same path as SIGTERM cuts the connection.
    drop(q);
    d.quit();
    drop(c);
}

/// With two queues, each queue's requests are counted under that queue (each worker thread
/// numbers its own vrings from 0: the daemon must map them back to the device's queues).
/// `serve --l2-cache-size` bounds the L2 cache: two passes over 512 L2 tables (4 KiB clusters,
/// 2 MiB per table) hit every time with the default cache and miss every time with 1M (256
/// tables).
#[test]
fn l2_cache_size_bounds_the_cache() {
    let mut misses = Vec::new();
    for extra in [&[][..], &["--l2-cache-size", "1M"][..]] {
        let mut d = Daemon::start_on("1G", &["--cluster-size", "4096"], extra);
        let mut q = Qmp::connect(&d.ctl());
        let mut c = Client::connect(&d.sock(), 1, false).unwrap();
        c.buf(0, 4096).copy_from_slice(&pattern(5, 4096));
        let stat = |q: &mut Qmp| {
            q.ok("query-stats")["engine"]["l2-cache-misses"]
                .as_u64()
                .unwrap()
        };
        for t in 0..512u64 {
            let r = c.write(0, t << 21, 0, 4096);
            d.check(r == 0, &format!("write in table {t} returned {r}"));
        }
        let before = stat(&mut q);
        for pass in 0..2 {
            for t in 0..512u64 {
                let r = c.read(0, t << 21, 0, 4096);
                d.check(
                    r == 0,
                    &format!("pass {pass}: read in table {t} returned {r}"),
                );
            }
        }
        misses.push(stat(&mut q) - before);
        drop(q);
        d.quit();
        drop(c);
    }
    assert_eq!(misses[0], 0, "default cache: {misses:?}");
    assert_eq!(misses[1], 1024, "256 tables, 512 used in turn: {misses:?}");
}

#[test]
fn each_queue_counts_its_own_requests() {
    let mut d = Daemon::start(&["--num-queues", "2"]);
    let mut q = Qmp::connect(&d.ctl());
    let mut c = Client::connect(&d.sock(), 2, false).unwrap();
    c.buf(0, 4096).copy_from_slice(&pattern(3, 4096));
    for (queue, writes) in [(0usize, 3u64), (1, 5)] {
        for i in 0..writes {
            let r = c.write(queue, (queue as u64 * 64 + i) * 4096, 0, 4096);
            d.check(r == 0, &format!("write {i} on queue {queue} returned {r}"));
        }
    }
    let r = c.read(1, 0, 0, 4096);
    d.check(r == 0, &format!("read returned {r}"));
    let s = q.ok("query-stats");
    let qs = s["queues"].as_array().unwrap();
    assert_eq!(qs.len(), 2, "{s}");
    assert_eq!(qs[0]["write-requests"], 3, "{s}");
    assert_eq!(qs[0]["read-requests"], 0, "{s}");
    assert_eq!(qs[1]["write-requests"], 5, "{s}");
    assert_eq!(qs[1]["read-requests"], 1, "{s}");
    assert_eq!(s["total"]["write-requests"], 8, "{s}");
    drop(q);
    d.quit();
    drop(c);
}

#[test]
fn bad_input_gets_errors_and_the_daemon_goes_on() {
    let mut d = Daemon::start(&[]);
    let (mut q, _) = Qmp::connect_raw(&d.ctl());
    // Before negotiation: CommandNotFound, as QEMU answers.
    let r = q.cmd("query-status", json!({}));
    assert_eq!(error_class(&r), "CommandNotFound");
    assert_eq!(q.cmd("qmp_capabilities", json!({})), json!({"return": {}}));

    for raw in [
        &b"{not json}\n"[..],
        b"[1,2,3]",
        b"{\"execute\": 42}",
        b"{\"execute\": \"query-status\", \"arguments\": \"x\"}",
        b"{\"execute\": \"query-status\", \"bogus\": 1}",
    ] {
        q.send(raw);
        let r = q.reply();
        assert_eq!(
            error_class(&r),
            "GenericError",
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    let r = q.cmd("no-such-command", json!({}));
    assert_eq!(error_class(&r), "CommandNotFound");
    let r = q.cmd("query-stats", json!({"verbose": true}));
    assert_eq!(error_class(&r), "GenericError");
    let r = q.cmd("dedup-set-mode", json!({"mode": 5}));
    assert_eq!(error_class(&r), "GenericError");
    let r = q.cmd("dedup-set-mode", json!({"mode": "sideways"}));
    assert_eq!(error_class(&r), "GenericError");
    // The id comes back on errors too.
    q.send(br#"{"execute": "nope", "id": "abc"}"#);
    assert_eq!(q.reply()["id"], "abc");
    q.send(br#"{"execute": "query-status", "id": [1]}"#);
    assert_eq!(q.reply()["id"], json!([1]));

    // A huge message closes that connection only.
    let mut huge = br#"{"execute": "query-status", "arguments": {"x": ""#.to_vec();
    huge.resize(3 << 20, b'a');
    let (mut big, _) = Qmp::connect_raw(&d.ctl());
    let _ = big.w.write_all(&huge); // may fail once the daemon closes
    assert!(big.closed());

    // A client that leaves mid-message.
    {
        let (mut half, _) = Qmp::connect_raw(&d.ctl());
        half.send(br#"{"execute": "qmp_capa"#);
    }
    // One that leaves with replies pending and never read.
    {
        let mut gone = Qmp::connect(&d.ctl());
        for _ in 0..200 {
            gone.send(br#"{"execute": "query-stats"}"#);
        }
    }

    assert!(d.alive());
    assert_eq!(q.ok("query-status")["running"], true);
    drop(q);
    d.quit();
}

#[test]
fn too_many_clients_are_closed_and_the_rest_served() {
    let d = Daemon::start(&[]);
    let max = vhost_user_qcow2::vhost::MAX_CLIENTS;
    let mut clients: Vec<Qmp> = (0..max).map(|_| Qmp::connect(&d.ctl())).collect();
    // One more: accepted and closed at once, no greeting.
    let s = UnixStream::connect(d.ctl()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = Vec::new();
    (&s).read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    for c in clients.iter_mut() {
        assert_eq!(c.ok("query-status")["running"], true);
    }
    // A slot freed is usable again.
    clients.pop();
    let mut again = Qmp::connect_when_free(&d.ctl());
    again.ok("query-status");
    drop(again);
    drop(clients);
    d.quit();
}

#[test]
fn many_clients_at_once_each_get_their_own_answers() {
    let d = Daemon::start(&[]);
    let ctl = d.ctl();
    let max = vhost_user_qcow2::vhost::MAX_CLIENTS;
    let threads: Vec<_> = (0..max)
        .map(|t| {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                let mut q = Qmp::connect(&ctl);
                // Pipelined: all requests first, then all replies, in order, ids intact.
                let mut batch = Vec::new();
                for i in 0..100 {
                    let name = if i % 2 == 0 {
                        "query-stats"
                    } else {
                        "query-status"
                    };
                    batch.extend_from_slice(
                        json!({"execute": name, "id": [t, i]})
                            .to_string()
                            .as_bytes(),
                    );
                }
                q.send(&batch);
                for i in 0..100 {
                    let r = q.reply();
                    assert_eq!(r["id"], json!([t, i]), "{r}");
                    assert!(r.get("return").is_some(), "{r}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    d.quit();
}

#[test]
fn stale_control_socket_replaced_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    common::create_with_cli(&img, "64M", &[]);
    let ctl = dir.path().join("c.sock");
    // Stale: a socket file nobody listens on.
    drop(UnixListener::bind(&ctl).unwrap());
    let d = {
        let child = spawn_binary(
            &img,
            &dir.path().join("v.sock"),
            &["--control", ctl.to_str().unwrap()],
        );
        Daemon { child, dir }
    };
    wait_for(&d.sock());
    // The stale file was there from the start: wait until the daemon's own socket answers.
    let t0 = Instant::now();
    while UnixStream::connect(d.ctl()).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "control socket never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Qmp::connect(&d.ctl()).ok("query-status");
    // Live: a second daemon on the same control socket is refused.
    let img2 = d.dir.path().join("e.qcow2");
    common::create_with_cli(&img2, "64M", &[]);
    let out = Command::new(BIN)
        .args(["serve", "--image", img2.to_str().unwrap(), "--socket"])
        .arg(d.dir.path().join("v2.sock"))
        .arg("--control")
        .arg(d.ctl())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    d.quit();
}

#[test]
fn statistics_line_at_the_interval() {
    let d = Daemon::start(&["--stats-interval", "1"]);
    std::thread::sleep(Duration::from_millis(2500));
    let log = d.quit();
    assert!(log.contains("io: 0 requests"), "{log}");
    assert!(log.contains("engine:"), "{log}");
}

#[test]
fn injected_corruption_event_reaches_every_negotiated_client() {
    use vhost_user_qcow2::block::MemDisk;
    use vhost_user_qcow2::control;
    use vhost_user_qcow2::vhost::{serve, ServeConfig, StopHandle};

    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("c.sock");
    let (tx, rx) = control::channel().unwrap();
    let stop = StopHandle::new().unwrap();
    let mut cfg = ServeConfig::new(dir.path().join("v.sock"));
    cfg.control = Some(ctl.clone());
    cfg.events = Some(rx);
    cfg.stop = Some(stop.clone());
    let disk = std::sync::Arc::new(MemDisk::new(1 << 20, false));
    let t = std::thread::spawn(move || serve(disk, cfg));
    wait_for(&ctl);

    let mut a = Qmp::connect(&ctl);
    let mut b = Qmp::connect(&ctl);
    let (mut raw, _) = Qmp::connect_raw(&ctl); // not negotiated: gets no events
                                               // The raw device has no engine: query-image still answers, query-stats has no engine part.
    assert_eq!(a.ok("query-image")["virtual-size"], 1 << 20);
    assert_eq!(a.ok("query-stats")["engine"], Value::Null);

    tx.image_corrupted(
        "drive0",
        "L2 table overlaps the L1 table",
        Some(0x30000),
        Some(65536),
        true,
    );
    for c in [&mut a, &mut b] {
        let ev = c.read().unwrap();
        assert_eq!(ev["event"], "BLOCK_IMAGE_CORRUPTED", "{ev}");
        assert_eq!(ev["data"]["node-name"], "drive0");
        assert_eq!(ev["data"]["offset"], 0x30000);
        assert_eq!(ev["data"]["size"], 65536);
        assert_eq!(ev["data"]["fatal"], true);
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }
    // The un-negotiated client got nothing: its next message is the reply to its command.
    let r = raw.cmd("qmp_capabilities", json!({}));
    assert_eq!(r, json!({"return": {}}));

    // Stop as SIGTERM does: every client sees SHUTDOWN then the end of the connection.
    let t0 = Instant::now();
    stop.stop();
    for c in [&mut a, &mut b, &mut raw] {
        let ev = c.read().unwrap();
        assert_eq!(ev["event"], "SHUTDOWN");
        assert_eq!(ev["data"]["reason"], "host-signal");
        assert!(c.read().is_none());
    }
    t.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!ctl.exists());
}

/// A real overlap-check hit in the engine reaches every negotiated client as
/// BLOCK_IMAGE_CORRUPTED; the guest's write fails, its reads go on.
#[test]
fn overlap_check_hit_is_a_qmp_event() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    common::create_with_cli(&img, "64M", &[]);
    common::qemu_io(&img, "qcow2", &["write -P 5 0 1M"]);
    // Point guest cluster 1 at the refcount table, as a COPIED data cluster.
    let mut b = std::fs::read(&img).unwrap();
    let be = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let (l1, rt) = (be(&b, 40) as usize, be(&b, 48));
    let l2 = (be(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    b[l2 + 8..l2 + 16].copy_from_slice(&(rt | 1 << 63).to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let (ctl, sock) = (dir.path().join("c.sock"), dir.path().join("v.sock"));
    let mut child = spawn_binary(&img, &sock, &["--control", ctl.to_str().unwrap()]);
    wait_for(&ctl);
    wait_for(&sock);
    let mut q = Qmp::connect(&ctl);
    let mut c = Client::connect(&sock, 1, false).unwrap();
    assert_ne!(
        c.write(0, 65536, 0, 4096),
        0,
        "a write into the refcount table must fail"
    );
    let ev = loop {
        let v = q.read().expect("no event before the connection closed");
        if v["event"] == "BLOCK_IMAGE_CORRUPTED" {
            break v;
        }
    };
    assert_eq!(ev["data"]["fatal"], true, "{ev}");
    assert!(
        ev["data"]["msg"]
            .as_str()
            .unwrap()
            .contains("refcount table"),
        "{ev}"
    );
    assert_eq!(c.read(0, 0, 0, 4096), 0, "reads go on");
    assert!(c.buf(0, 4096).iter().all(|&x| x == 5));
    drop(c);
    // SAFETY (test): signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
    let (_, info) = common::qemu_img(&["info", img.to_str().unwrap()]);
    assert!(info.contains("corrupt: true"), "{info}");
}

/// query-dedup reports the engine's dedup counters; pause and resume work.
#[test]
fn query_dedup_with_dedup_on() {
    let d = Daemon::start(&["--dedup", "on"]);
    let mut q = Qmp::connect(&d.ctl());
    let mut c = Client::connect(&d.sock(), 1, false).unwrap();
    let data = pattern(9, 65536);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 65536), 0);
    assert_eq!(c.write(0, 1 << 20, 0, 65536), 0);
    let dd = q.ok("query-dedup");
    assert_eq!(dd["mode"], "inline", "{dd}");
    assert_eq!(dd["clusters-deduplicated"], 1, "{dd}");
    assert_eq!(dd["clusters-written-unique"], 1, "{dd}");
    assert_eq!(dd["bytes-saved"], 65536, "{dd}");
    assert!(dd["index-ram-bytes"].as_u64().unwrap() > 0, "{dd}");
    assert_eq!(q.ok("dedup-pause"), json!({}));
    assert_eq!(q.ok("query-dedup")["paused"], true);
    assert_eq!(c.write(0, 2 << 20, 0, 65536), 0);
    assert_eq!(
        q.ok("query-dedup")["clusters-deduplicated"],
        1,
        "paused: written plain"
    );
    assert_eq!(q.ok("dedup-resume"), json!({}));
    assert_eq!(c.write(0, 3 << 20, 0, 65536), 0);
    assert_eq!(q.ok("query-dedup")["clusters-deduplicated"], 2);
    drop(c);
    drop(q);
    d.quit();
}

/// Background mode over QMP: writes complete plain, the worker merges them, pause and resume
/// stop and restart it, and dedup-set-mode switches to inline at run time.
#[test]
fn background_dedup_pause_resume_and_set_mode() {
    let mut d = Daemon::start(&["--dedup", "background"]);
    let mut q = Qmp::connect(&d.ctl());
    assert_eq!(q.ok("query-dedup")["mode"], "background");
    assert_eq!(q.ok("dedup-pause"), json!({}));
    let mut c = Client::connect(&d.sock(), 1, false).unwrap();
    // 16 clusters, 4 contents.
    for i in 0..16u64 {
        let data = pattern(i % 4 + 1, 65536);
        c.buf(0, data.len()).copy_from_slice(&data);
        assert_eq!(c.write(0, i << 16, 0, 65536), 0);
    }
    let dd = q.ok("query-dedup");
    assert_eq!(dd["pending-clusters"], 16, "{dd}");
    assert_eq!(dd["running"], false, "paused: {dd}");
    assert_eq!(dd["clusters-deduplicated"], 0, "{dd}");
    assert_eq!(q.ok("dedup-resume"), json!({}));
    let t0 = Instant::now();
    let dd = loop {
        let dd = q.ok("query-dedup");
        if dd["pending-clusters"] == 0 && dd["running"] == false {
            break dd;
        }
        let slow = t0.elapsed() > Duration::from_secs(30);
        d.check(!slow, &format!("the worker did not catch up: {dd}"));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(dd["clusters-deduplicated"], 12, "{dd}");
    assert_eq!(dd["bytes-saved"], 12 * 65536, "{dd}");
    assert_eq!(
        q.cmd("dedup-set-mode", json!({"mode": "inline"})),
        json!({"return": {}})
    );
    let data = pattern(1, 65536);
    c.buf(0, data.len()).copy_from_slice(&data);
    assert_eq!(c.write(0, 40 << 16, 0, 65536), 0);
    let dd = q.ok("query-dedup");
    assert_eq!(
        (dd["mode"].clone(), dd["clusters-deduplicated"].clone()),
        (json!("inline"), json!(13))
    );
    for i in 0..16u64 {
        assert_eq!(c.read(0, i << 16, 0, 65536), 0);
        assert!(c.buf(0, 65536) == pattern(i % 4 + 1, 65536).as_slice());
    }
    drop(c);
    drop(q);
    d.quit();
}
