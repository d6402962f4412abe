//! A QMP client for the control-socket tests: one connection, line by line.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One QMP connection: a line reader over the socket.
pub struct Qmp {
    r: BufReader<UnixStream>,
    pub w: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect and read the greeting (not negotiated yet).
    pub fn connect_raw(path: &Path) -> (Qmp, Value) {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
        };
        let g = q.read().expect("no greeting");
        (q, g)
    }

    /// Connect, retrying while the daemon is still at its client limit (clients that just
    /// left may not be reaped yet), and negotiate.
    pub fn connect_when_free(path: &Path) -> Qmp {
        let t0 = Instant::now();
        loop {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() > 0 {
                let mut q = Qmp {
                    r,
                    w: s,
                    events: Vec::new(),
                };
                assert_eq!(q.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
                return q;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no free client slot"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connect(path: &Path) -> Qmp {
        let (mut q, g) = Qmp::connect_raw(path);
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64(), "{g}");
        assert_eq!(q.cmd("qmp_capabilities", json!({})), json!({"return": {}}));
        q
    }

    /// The next message, or None at end of file.
    pub fn read(&mut self) -> Option<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l).unwrap() == 0 {
            return None;
        }
        assert!(l.ends_with("\r\n"), "{l:?}");
        Some(serde_json::from_str(&l).unwrap())
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).unwrap();
    }

    /// The next reply (events met on the way are kept).
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self
                .read()
                .expect("connection closed while waiting for a reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.send(msg.to_string().as_bytes());
        self.reply()
    }

    pub fn ok(&mut self, name: &str) -> Value {
        let r = self.cmd(name, json!({}));
        r.get("return")
            .unwrap_or_else(|| panic!("{name}: {r}"))
            .clone()
    }

    /// True when the daemon closed this connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.r.read_to_end(&mut rest).is_ok()
    }
}

pub fn error_class(v: &Value) -> &str {
    v["error"]["class"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}
