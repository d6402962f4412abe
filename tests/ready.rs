//! Readiness of `serve`. `--pidfile`: written once the socket listens, refused when it names a
//! live process, replaced when stale, removed at a clean exit. `$NOTIFY_SOCKET`: systemd is sent
//! READY=1 once the socket listens.

mod common;

use common::client::{spawn_binary, stderr_of, wait_exit};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn sigterm(child: &Child) {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// Names created in `dir` (or moved into it), in order, from an inotify watch set up before.
struct Creations {
    fd: i32,
}

impl Creations {
    fn watch(dir: &Path) -> Self {
        // SAFETY: plain inotify calls on a path we own; the fd is closed in Drop.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let wd =
            unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) };
        assert!(wd >= 0);
        Creations { fd }
    }

    fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into our own buffer.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            let mut off = 0;
            while off + 16 <= n as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let name = &buf[off + 16..off + 16 + len];
                let name = name.split(|b| *b == 0).next().unwrap_or_default();
                out.push(String::from_utf8_lossy(name).into_owned());
                off += 16 + len;
            }
        }
    }
}

impl Drop for Creations {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

/// Wait until the pidfile holds a pid; fail with the daemon's log if it never does.
fn wait_pidfile(child: &mut Child, path: &Path) -> u32 {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.strip_suffix('\n').and_then(|s| s.parse().ok()))
        {
            return pid;
        }
        if t0.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no pidfile\n{}", stderr_of(child));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn written_once_listening_and_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let sock = dir.path().join("a.sock");
    let pidf = dir.path().join("a.pid");
    common::create_with_cli(&img, "64M", &[]);
    // A stale socket file from an earlier run must not be taken for the listening one.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let created = Creations::watch(dir.path());
    let mut child = spawn_binary(&img, &sock, &["--pidfile", pidf.to_str().unwrap()]);
    let pid = wait_pidfile(&mut child, &pidf);
    assert_eq!(pid, child.id());
    // The socket is there and listening when the pidfile appears.
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    let conn = std::os::unix::net::UnixStream::connect(&sock);
    assert!(conn.is_ok(), "socket not listening: {conn:?}");
    drop(conn);
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let log = stderr_of(&mut child);
    assert!(st.success(), "exit {st:?}\n{log}");
    assert!(!pidf.exists(), "pidfile left behind\n{log}");
    // The socket file appeared (the daemon links it into place once listening) before the
    // pidfile did.
    let names = created.names();
    let at = |n: &str| names.iter().position(|x| x == n);
    let (s, p) = (at("a.sock"), at("a.pid"));
    assert!(
        s.is_some() && p.is_some() && s < p,
        "creations in order: {names:?}"
    );
}

#[test]
fn refused_when_it_names_a_live_process() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    let sock = dir.path().join("b.sock");
    let pidf = dir.path().join("b.pid");
    common::create_with_cli(&img, "64M", &[]);
    // This test process is alive.
    let me = format!("{}\n", std::process::id());
    std::fs::write(&pidf, &me).unwrap();
    let mut child = spawn_binary(&img, &sock, &["--pidfile", pidf.to_str().unwrap()]);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let log = stderr_of(&mut child);
    if st.success() {
        panic!("started despite a live pidfile\n{log}");
    }
    assert!(log.contains("running; refusing to start"), "{log}");
    assert!(!sock.exists(), "the socket was bound\n{log}");
    assert_eq!(std::fs::read_to_string(&pidf).unwrap(), me);
}

#[test]
fn stale_pidfile_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    let sock = dir.path().join("c.sock");
    let pidf = dir.path().join("c.pid");
    common::create_with_cli(&img, "64M", &[]);
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    std::fs::write(&pidf, format!("{dead}\n")).unwrap();
    let mut child = spawn_binary(&img, &sock, &["--pidfile", pidf.to_str().unwrap()]);
    let t0 = Instant::now();
    let pid = loop {
        let pid = wait_pidfile(&mut child, &pidf);
        if pid != dead || t0.elapsed() > Duration::from_secs(20) {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(pid, child.id());
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    assert!(st.success(), "{}", stderr_of(&mut child));
    assert!(!pidf.exists());
}

/// Serve with NOTIFY_SOCKET=`env`, whose datagrams arrive on `rx`: READY=1 comes once the
/// socket listens, naming the daemon's pid.
fn ready_through(rx: &UnixDatagram, env: &str, dir: &Path) {
    let img = dir.join("n.qcow2");
    let sock = dir.join("n.sock");
    if !img.exists() {
        common::create_with_cli(&img, "64M", &[]);
    }
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
        .args(["serve", "--image", img.to_str().unwrap()])
        .args(["--socket", sock.to_str().unwrap()])
        .env("NOTIFY_SOCKET", env)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = match rx.recv(&mut buf) {
        Ok(n) => n,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no notification ({e})\n{}", stderr_of(&mut child));
        }
    };
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(
        msg.lines().any(|l| l == format!("MAINPID={}", child.id())),
        "{msg:?}"
    );
    // Listening by the time systemd hears of it.
    let conn = UnixStream::connect(&sock);
    assert!(conn.is_ok(), "socket not listening at READY=1: {conn:?}");
    drop(conn);
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    assert!(st.success(), "{st:?}\n{}", stderr_of(&mut child));
}

#[test]
fn systemd_hears_ready_once_listening() {
    let dir = tempfile::tempdir().unwrap();
    // A path, as systemd gives it.
    let path = dir.path().join("notify");
    let rx = UnixDatagram::bind(&path).unwrap();
    ready_through(&rx, path.to_str().unwrap(), dir.path());
    // An abstract name ("@..."), as systemd gives it too.
    let name = format!("vuq-notify-test-{}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let rx = UnixDatagram::bind_addr(&addr).unwrap();
    ready_through(&rx, &format!("@{name}"), dir.path());
}
