//! Helpers for the checker tests: running qemu-img / qemu-io / our binary, comparing both
//! checkers, and poking bytes into images (located with our codecs).
#![allow(dead_code)]

use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions, RepairMode};
use vhost_user_qcow2::qcow2::format::entries::L1E_OFFSET_MASK;
use vhost_user_qcow2::qcow2::format::{refblock, Header};
use vhost_user_qcow2::storage::FileStorage;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

pub fn ok(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Create an image with `qemu-img create -o opts`, then run each qemu-io command on it.
pub fn make(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
    let p = dir.join(name);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, s(&p), size],
    );
    for c in io {
        ok("qemu-io", &["-f", "qcow2", "-c", c, s(&p)]);
    }
    p
}

/// Exit code and JSON of a check run.
pub fn json_check(cmd: &str, pre: &[&str], img: &Path) -> (i32, Value) {
    let mut args: Vec<&str> = pre.to_vec();
    args.extend(["check", "--output", "json", s(img)]);
    let o = run(cmd, &args);
    let code = o.status.code().expect("killed by a signal");
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(&out).unwrap_or(Value::Null);
    (code, v)
}

pub fn qemu_check(img: &Path) -> (i32, Value) {
    let o = run(
        "qemu-img",
        &["check", "-f", "qcow2", "--output", "json", s(img)],
    );
    let code = o.status.code().expect("killed by a signal");
    let v = serde_json::from_str(&String::from_utf8_lossy(&o.stdout)).unwrap_or(Value::Null);
    (code, v)
}

/// Our check through the library (the binary in the shared target directory may be rebuilt by
/// another worktree while tests run; the CLI has its own tests below).
pub fn ours_check(img: &Path) -> (i32, Value) {
    let st = FileStorage::new(std::fs::File::open(img).unwrap());
    match check(&st, &CheckOptions::default()) {
        Ok(r) => (r.exit_code() as i32, serde_json::to_value(&r).unwrap()),
        Err(_) => (1, Value::Null),
    }
}

/// The CLI's exit code and JSON.
pub fn cli_check(img: &Path) -> (i32, Value) {
    json_check(BIN, &[], img)
}

pub fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

pub const FIELDS: [&str; 8] = [
    "corruptions",
    "leaks",
    "check-errors",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

/// Both checkers agree on `img`; returns the exit code.
pub fn agree(img: &Path) -> i32 {
    let (qc, qv) = qemu_check(img);
    let (oc, ov) = ours_check(img);
    let detail = || {
        let st = FileStorage::new(std::fs::File::open(img).unwrap());
        let msgs = match check(&st, &CheckOptions::default()) {
            Ok(r) => r.messages.join("\n"),
            Err(e) => e.to_string(),
        };
        let q = run("qemu-img", &["check", s(img)]);
        format!(
            "ours ({oc}): {ov}\n{msgs}\nqemu-img ({qc}): {qv}\n{}",
            String::from_utf8_lossy(&q.stderr)
        )
    };
    assert_eq!(
        oc,
        qc,
        "exit codes differ on {}\n{}",
        img.display(),
        detail()
    );
    for f in FIELDS {
        assert_eq!(
            n(&ov, f),
            n(&qv, f),
            "{f} differs on {}\n{}",
            img.display(),
            detail()
        );
    }
    oc
}

pub fn repair(img: &Path, mode: &str) -> i32 {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let st = FileStorage::new(f);
    let repair = Some(if mode == "all" {
        RepairMode::All
    } else {
        RepairMode::Leaks
    });
    let opts = CheckOptions {
        repair,
        mark_clean: true,
        progress: None,
    };
    match check(&st, &opts) {
        Ok(r) => r.exit_code() as i32,
        Err(_) => 1,
    }
}

pub fn identical(a: &Path, b: &Path) {
    let o = run("qemu-img", &["compare", "-q", s(a), s(b)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

pub fn copy(img: &Path, name: &str) -> PathBuf {
    let p = img.with_file_name(name);
    std::fs::copy(img, &p).unwrap();
    p
}

/// Where things are in an image, read with our codecs.
pub struct Geo {
    pub path: PathBuf,
    pub cb: u32,
    pub order: u32,
    pub l1: u64,
    pub reftable: u64,
}

impl Geo {
    pub fn new(path: &Path) -> Geo {
        let mut b = vec![0u8; 4096];
        let f = std::fs::File::open(path).unwrap();
        let _ = f.read_at(&mut b, 0).unwrap();
        let cb = Header::probe_cluster_bits(&b).unwrap();
        let mut b = vec![0u8; 1 << cb];
        let _ = f.read_at(&mut b, 0).unwrap();
        let h = Header::decode(&b).unwrap();
        Geo {
            path: path.to_path_buf(),
            cb,
            order: h.refcount_order,
            l1: h.l1_table_offset,
            reftable: h.refcount_table_offset,
        }
    }
    pub fn cs(&self) -> u64 {
        1 << self.cb
    }
    pub fn read(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        let f = std::fs::File::open(&self.path).unwrap();
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }
    pub fn write(&self, off: u64, v: u64) {
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }
    pub fn l2(&self, l1_index: u64) -> u64 {
        self.read(self.l1 + 8 * l1_index) & L1E_OFFSET_MASK
    }
    /// File offset of L2 entry `i` of the table at L1 index `l1_index`.
    pub fn l2_entry(&self, l1_index: u64, i: u64) -> u64 {
        self.l2(l1_index) + 8 * i
    }
    pub fn block_of(&self, cluster: u64) -> (u64, usize) {
        let bits = self.cb + 3 - self.order;
        let b = self.read(self.reftable + 8 * (cluster >> bits)) & !0x1ff;
        assert_ne!(b, 0, "no refcount block for cluster {cluster}");
        (b, (cluster & ((1 << bits) - 1)) as usize)
    }
    pub fn refcount(&self, cluster: u64) -> u64 {
        let (b, i) = self.block_of(cluster);
        let mut blk = vec![0u8; self.cs() as usize];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut blk, b)
            .unwrap();
        refblock::get(&blk, i, self.order)
    }
    pub fn set_refcount(&self, cluster: u64, v: u64) {
        let (b, i) = self.block_of(cluster);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap();
        let mut blk = vec![0u8; self.cs() as usize];
        f.read_exact_at(&mut blk, b).unwrap();
        refblock::set(&mut blk, i, self.order, v);
        f.write_all_at(&blk, b).unwrap();
    }
    pub fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
}

pub const DATA: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -P 0xcd 3M 64k",
    "write -P 0xef 2M 4k",
    "write -P 0x12 1536k 8k",
];
