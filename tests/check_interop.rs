//! Our `check` against `qemu-img check` (QEMU 10) on real images: same exit codes and counters
//! on clean and damaged images, and our repair leaves images qemu-img calls clean with the guest
//! data intact.

use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions, RepairMode};
use vhost_user_qcow2::qcow2::format::entries::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED};
use vhost_user_qcow2::qcow2::format::{refblock, Header};
use vhost_user_qcow2::storage::FileStorage;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Create an image with `qemu-img create -o opts`, then run each qemu-io command on it.
fn make(dir: &Path, name: &str, opts: &str, size: &str, io: &[&str]) -> PathBuf {
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
fn json_check(cmd: &str, pre: &[&str], img: &Path) -> (i32, Value) {
    let mut args: Vec<&str> = pre.to_vec();
    args.extend(["check", "--output", "json", s(img)]);
    let o = run(cmd, &args);
    let code = o.status.code().expect("killed by a signal");
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(&out).unwrap_or(Value::Null);
    (code, v)
}

fn qemu_check(img: &Path) -> (i32, Value) {
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
fn ours_check(img: &Path) -> (i32, Value) {
    let st = FileStorage::new(std::fs::File::open(img).unwrap());
    match check(&st, &CheckOptions::default()) {
        Ok(r) => (r.exit_code() as i32, serde_json::to_value(&r).unwrap()),
        Err(_) => (1, Value::Null),
    }
}

/// The CLI's exit code and JSON.
fn cli_check(img: &Path) -> (i32, Value) {
    json_check(BIN, &[], img)
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

const FIELDS: [&str; 8] = [
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
fn agree(img: &Path) -> i32 {
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

fn repair(img: &Path, mode: &str) -> i32 {
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

fn identical(a: &Path, b: &Path) {
    let o = run("qemu-img", &["compare", "-q", s(a), s(b)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

fn copy(img: &Path, name: &str) -> PathBuf {
    let p = img.with_file_name(name);
    std::fs::copy(img, &p).unwrap();
    p
}

/// Where things are in an image, read with our codecs.
struct Geo {
    path: PathBuf,
    cb: u32,
    order: u32,
    l1: u64,
    reftable: u64,
}

impl Geo {
    fn new(path: &Path) -> Geo {
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
    fn cs(&self) -> u64 {
        1 << self.cb
    }
    fn read(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        let f = std::fs::File::open(&self.path).unwrap();
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }
    fn write(&self, off: u64, v: u64) {
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }
    fn l2(&self, l1_index: u64) -> u64 {
        self.read(self.l1 + 8 * l1_index) & L1E_OFFSET_MASK
    }
    /// File offset of L2 entry `i` of the table at L1 index `l1_index`.
    fn l2_entry(&self, l1_index: u64, i: u64) -> u64 {
        self.l2(l1_index) + 8 * i
    }
    fn block_of(&self, cluster: u64) -> (u64, usize) {
        let bits = self.cb + 3 - self.order;
        let b = self.read(self.reftable + 8 * (cluster >> bits)) & !0x1ff;
        assert_ne!(b, 0, "no refcount block for cluster {cluster}");
        (b, (cluster & ((1 << bits) - 1)) as usize)
    }
    fn refcount(&self, cluster: u64) -> u64 {
        let (b, i) = self.block_of(cluster);
        let mut blk = vec![0u8; self.cs() as usize];
        std::fs::File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut blk, b)
            .unwrap();
        refblock::get(&blk, i, self.order)
    }
    fn set_refcount(&self, cluster: u64, v: u64) {
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
    fn file_len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
}

const DATA: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -P 0xcd 3M 64k",
    "write -P 0xef 2M 4k",
    "write -P 0x12 1536k 8k",
];

#[test]
fn clean_images_agree() {
    let d = tempfile::tempdir().unwrap();
    let variants = [
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=64k",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=16,cluster_size=4k",
        "refcount_bits=64",
        "refcount_bits=1,cluster_size=512",
        "compat=0.10",
        "compat=0.10,cluster_size=4k",
        "compat=1.1,lazy_refcounts=on",
        "compression_type=zstd",
        "preallocation=metadata",
    ];
    for (i, o) in variants.iter().enumerate() {
        let empty = make(d.path(), &format!("e{i}.qcow2"), o, "64M", &[]);
        assert_eq!(agree(&empty), 0, "{o}");
        let full = make(d.path(), &format!("f{i}.qcow2"), o, "64M", DATA);
        assert_eq!(agree(&full), 0, "{o}");
    }
}

#[test]
fn zero_clusters_snapshots_compressed_bitmaps_agree() {
    let d = tempfile::tempdir().unwrap();
    // Plain and preallocated zero clusters.
    let z = make(d.path(), "z.qcow2", "cluster_size=64k", "64M", DATA);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -z 0 128k", s(&z)]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z -u 512k 128k", s(&z)],
    );
    ok("qemu-io", &["-f", "qcow2", "-c", "write -z 8M 128k", s(&z)]);
    assert_eq!(agree(&z), 0);

    // Internal snapshots: shared clusters, then COW.
    for (i, o) in ["cluster_size=64k", "cluster_size=512", "compat=0.10"]
        .iter()
        .enumerate()
    {
        let p = make(d.path(), &format!("s{i}.qcow2"), o, "64M", DATA);
        ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x77 64k 64k", s(&p)],
        );
        ok("qemu-img", &["snapshot", "-c", "two", s(&p)]);
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x78 0 4k", s(&p)],
        );
        assert_eq!(agree(&p), 0, "{o}");
        ok("qemu-img", &["snapshot", "-d", "one", s(&p)]);
        assert_eq!(agree(&p), 0, "{o}");
    }

    // Compressed clusters (zlib and zstd).
    let src = make(d.path(), "src.qcow2", "cluster_size=64k", "64M", DATA);
    for (i, t) in ["zlib", "zstd"].iter().enumerate() {
        let c = d.path().join(format!("c{i}.qcow2"));
        let o = format!("compression_type={t}");
        ok(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&c)],
        );
        assert_eq!(agree(&c), 0);
        let (_, v) = ours_check(&c);
        assert!(n(&v, "compressed-clusters") > 0, "{v}");
    }

    // A persistent bitmap (autoclear bit set: its directory and table are counted).
    let b = make(d.path(), "b.qcow2", "cluster_size=64k", "64M", DATA);
    ok("qemu-img", &["bitmap", "--add", s(&b), "b0"]);
    assert_eq!(agree(&b), 0);
}

#[test]
fn pure_leak_agrees_and_repairs() {
    let d = tempfile::tempdir().unwrap();
    for o in [
        "cluster_size=64k",
        "refcount_bits=1,cluster_size=4k",
        "refcount_bits=64",
    ] {
        let img = make(d.path(), "leak.qcow2", o, "64M", DATA);
        let before = copy(&img, "leak-before.qcow2");
        let g = Geo::new(&img);
        // Grow the file by two clusters and mark them used: nothing references them.
        let end = g.file_len().div_ceil(g.cs());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len((end + 2) * g.cs())
            .unwrap();
        g.set_refcount(end, 1);
        g.set_refcount(end + 1, 1);
        assert_eq!(agree(&img), 3, "{o}");
        let (_, v) = ours_check(&img);
        assert_eq!(n(&v, "leaks"), 2);
        assert_eq!(repair(&img, "leaks"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &before);
    }
}

#[test]
fn refcount_damage_agrees_and_repairs() {
    let d = tempfile::tempdir().unwrap();
    for o in [
        "cluster_size=64k",
        "cluster_size=512",
        "refcount_bits=64,cluster_size=4k",
    ] {
        let base = make(d.path(), "base.qcow2", o, "64M", DATA);
        let g = Geo::new(&base);
        let data = (g.read(g.l2_entry(0, 0)) & L2E_OFFSET_MASK) >> g.cb;
        let l2 = g.l2(0) >> g.cb;

        // Raised refcount on a data cluster: a leak, and COPIED now lies.
        let img = copy(&base, "raised.qcow2");
        let gi = Geo::new(&img);
        gi.set_refcount(data, 2);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);

        // Lowered to zero: the rebuild case (what a crash under lazy refcounts leaves).
        for cluster in [data, l2] {
            let img = copy(&base, "zero.qcow2");
            let gi = Geo::new(&img);
            gi.set_refcount(cluster, 0);
            assert_eq!(agree(&img), 2, "{o}");
            assert_eq!(repair(&img, "leaks"), 1, "{o}: leaks mode cannot rebuild");
            assert_eq!(repair(&img, "all"), 0, "{o}");
            assert_eq!(qemu_check(&img).0, 0, "{o}");
            identical(&img, &base);
        }

        // Lazy refcounts: a dirty image with refcounts missing.
        let img = copy(&base, "dirty.qcow2");
        let gi = Geo::new(&img);
        if gi.read(4) >> 32 == 3 {
            gi.write(72, gi.read(72) | 1);
            gi.set_refcount(data, 0);
            gi.set_refcount(data + 1, 0);
            assert_eq!(agree(&img), 2, "{o}");
            assert_eq!(repair(&img, "all"), 0, "{o}");
            assert_eq!(gi.read(72) & 1, 0, "dirty bit not cleared");
            assert_eq!(qemu_check(&img).0, 0, "{o}");
            identical(&img, &base);
        }
    }
}

#[test]
fn snapshot_refcount_damage() {
    let d = tempfile::tempdir().unwrap();
    let base = make(d.path(), "snap.qcow2", "cluster_size=64k", "64M", DATA);
    ok("qemu-img", &["snapshot", "-c", "one", s(&base)]);
    let g = Geo::new(&base);
    let data = (g.read(g.l2_entry(0, 0)) & L2E_OFFSET_MASK) >> g.cb;
    assert_eq!(g.refcount(data), 2);

    // Shared cluster down to 1: corruption, and the active entry's missing COPIED now lies.
    let img = copy(&base, "low.qcow2");
    Geo::new(&img).set_refcount(data, 1);
    assert_eq!(agree(&img), 2);
    assert_eq!(repair(&img, "all"), 0);
    assert_eq!(qemu_check(&img).0, 0);
    identical(&img, &base);

    // COPIED set on a shared entry.
    let img = copy(&base, "copied.qcow2");
    let gi = Geo::new(&img);
    let at = gi.l2_entry(0, 0);
    gi.write(at, gi.read(at) | OFLAG_COPIED);
    assert_eq!(agree(&img), 2);
    assert_eq!(repair(&img, "all"), 0);
    assert_eq!(qemu_check(&img).0, 0);
    assert_eq!(gi.read(at) & OFLAG_COPIED, 0);
    identical(&img, &base);
}

#[test]
fn entry_damage_agrees() {
    let d = tempfile::tempdir().unwrap();
    for o in [
        "cluster_size=64k",
        "cluster_size=4k,refcount_bits=16",
        "compat=0.10",
    ] {
        let base = make(d.path(), "base.qcow2", o, "64M", DATA);

        // COPIED cleared on a data cluster with refcount 1; then on the L1 entry.
        let img = copy(&base, "nocopied.qcow2");
        let g = Geo::new(&img);
        let at = g.l2_entry(0, 1);
        g.write(at, g.read(at) & !OFLAG_COPIED);
        g.write(g.l1, g.read(g.l1) & !OFLAG_COPIED);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "leaks"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);

        // Reserved bits in an L2 entry (neither checker repairs them).
        let img = copy(&base, "reserved.qcow2");
        let g = Geo::new(&img);
        let at = g.l2_entry(0, 2);
        g.write(at, g.read(at) | 0x2);
        assert_eq!(agree(&img), 2, "{o}");

        // An L2 entry past the end of the file: corruption plus a leaked data cluster.
        let img = copy(&base, "eof.qcow2");
        let g = Geo::new(&img);
        let at = g.l2_entry(0, 3);
        g.write(at, (1u64 << 36) | OFLAG_COPIED);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");

        // An unaligned data cluster offset.
        let img = copy(&base, "unaligned.qcow2");
        let g = Geo::new(&img);
        let at = g.l2_entry(0, 4);
        g.write(at, g.read(at) + 0x200);
        assert_eq!(agree(&img), 2, "{o}");

        // An unaligned L2 table offset in the L1 table.
        let img = copy(&base, "l1unaligned.qcow2");
        let g = Geo::new(&img);
        g.write(g.l1, g.read(g.l1) + 0x200);
        agree(&img);

        // Overlaps and loops: a data entry pointing at the refcount table; refcount block
        // pointers at the L1 table, past the end of the file, at the refcount table itself.
        let img = copy(&base, "overlap.qcow2");
        let g = Geo::new(&img);
        g.write(g.l2_entry(0, 6), g.reftable | OFLAG_COPIED);
        assert_eq!(agree(&img), 2, "{o}");
        let img = copy(&base, "refblock-l1.qcow2");
        let g = Geo::new(&img);
        g.write(g.reftable + 8 * 3, g.l1);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);
        let img = copy(&base, "refblock-outside.qcow2");
        let g = Geo::new(&img);
        g.write(g.reftable + 8 * 3, 1u64 << 40);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);
        let img = copy(&base, "refblock-self.qcow2");
        let g = Geo::new(&img);
        g.write(g.reftable + 8 * 3, g.reftable);
        assert_eq!(agree(&img), 2, "{o}");
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);

        // A refcount table entry with reserved bits.
        let img = copy(&base, "reftable.qcow2");
        let g = Geo::new(&img);
        g.write(g.reftable, g.read(g.reftable) | 1);
        agree(&img);
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        identical(&img, &base);
    }
}

#[test]
fn malformed_headers_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let base = make(d.path(), "base.qcow2", "cluster_size=64k", "64M", DATA);
    let cases: [(&str, u64, Vec<u8>); 5] = [
        ("huge-l1", 36, 0x1000_0000u32.to_be_bytes().to_vec()),
        ("huge-reftable", 56, 0x0100_0000u32.to_be_bytes().to_vec()),
        ("reftable-past-eof", 48, (1u64 << 40).to_be_bytes().to_vec()),
        ("l1-past-eof", 40, (1u64 << 40).to_be_bytes().to_vec()),
        ("bad-cluster-bits", 20, 40u32.to_be_bytes().to_vec()),
    ];
    for (name, off, bytes) in cases {
        let img = copy(&base, &format!("{name}.qcow2"));
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&bytes, off).unwrap();
        let o = run(BIN, &["check", s(&img)]);
        let code = o.status.code().expect("signal");
        assert!(
            code == 1 || code == 2,
            "{name}: exit {code}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let q = qemu_check(&img).0;
        assert_eq!(code == 1, q == 1, "{name}: ours {code}, qemu-img {q}");
        let o = run(BIN, &["info", s(&img)]);
        assert_ne!(o.status.code(), Some(101), "{name}: info panicked");
    }
    // The CLI says the same as the library, in qemu-img's JSON shape.
    let img = copy(&base, "cli.qcow2");
    let g = Geo::new(&img);
    g.set_refcount((g.file_len() - 1) >> g.cb, 2);
    let (code, v) = cli_check(&img);
    assert_eq!(code, qemu_check(&img).0);
    assert_eq!(n(&v, "leaks"), 1, "{v}");
    assert_eq!(v.get("format").and_then(Value::as_str), Some("qcow2"));
    let o = run(BIN, &["check", "-r", "leaks", s(&img)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 leaked clusters"));
    assert_eq!(qemu_check(&img).0, 0);

    // Truncated files.
    for len in [0u64, 50, 100, 65536, 65536 * 3] {
        let img = copy(&base, "trunc.qcow2");
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap();
        let o = run(BIN, &["check", s(&img)]);
        let code = o.status.code().expect("signal");
        assert_eq!(code, qemu_check(&img).0, "len {len}");
        let o = run(BIN, &["check", "-r", "all", s(&img)]);
        assert_ne!(o.status.code(), Some(101), "len {len}: repair panicked");
    }
}

#[test]
fn info_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let base = make(
        d.path(),
        "base.qcow2",
        "cluster_size=4k,lazy_refcounts=on",
        "64M",
        DATA,
    );
    ok("qemu-img", &["snapshot", "-c", "snap1", s(&base)]);
    let over = d.path().join("over.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&over),
        ],
    );
    let v2 = make(
        d.path(),
        "v2.qcow2",
        "compat=0.10,refcount_bits=16",
        "1G",
        &[],
    );
    for img in [&base, &over, &v2] {
        let q: Value =
            serde_json::from_slice(&run("qemu-img", &["info", "--output", "json", s(img)]).stdout)
                .unwrap();
        let o = run(BIN, &["info", "--output", "json", s(img)]);
        assert!(o.status.success());
        let ours: Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in [
            "virtual-size",
            "cluster-size",
            "format",
            "format-specific",
            "dirty-flag",
            "backing-filename",
            "backing-filename-format",
            "actual-size",
        ] {
            assert_eq!(ours.get(k), q.get(k), "{k} on {}", img.display());
        }
        let qs = q.get("snapshots").cloned().unwrap_or(Value::Array(vec![]));
        let os = ours
            .get("snapshots")
            .cloned()
            .unwrap_or(Value::Array(vec![]));
        assert_eq!(os, qs, "snapshots on {}", img.display());
    }
}

/// Crash the repair after every possible number of writes, keeping only flushed writes, all of
/// them, or a random subset: the image must never be worse than before (no more corruptions in
/// qemu-img's eyes), and a second repair must finish the job with the guest data intact.
#[test]
fn crash_during_repair_never_makes_things_worse() {
    use vhost_user_qcow2::storage::{CrashMode, FaultStorage};
    let d = tempfile::tempdir().unwrap();
    let base = make(d.path(), "base.qcow2", "cluster_size=4k", "16M", DATA);
    ok("qemu-img", &["snapshot", "-c", "one", s(&base)]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x99 0 8k", s(&base)],
    );
    let g = Geo::new(&base);
    let shared = (g.read(g.l2_entry(0, 5)) & L2E_OFFSET_MASK) >> g.cb;
    let private = (g.read(g.l2_entry(0, 0)) & L2E_OFFSET_MASK) >> g.cb;
    assert_eq!((g.refcount(shared), g.refcount(private)), (2, 1));

    // Two kinds of damage: fixable in place, and needing a rebuild.
    type Damage<'a> = (&'a str, &'a dyn Fn(&Geo));
    let damages: [Damage; 2] = [
        ("in-place", &|g: &Geo| {
            g.set_refcount(shared, 3);
            let at = g.l2_entry(0, 1);
            g.write(at, g.read(at) & !OFLAG_COPIED);
            g.set_refcount(private, 2);
        }),
        ("rebuild", &|g: &Geo| {
            g.set_refcount(private, 0);
            g.set_refcount(shared, 1);
            let at = g.l2_entry(0, 1);
            g.write(at, g.read(at) & !OFLAG_COPIED);
        }),
    ];
    for (name, damage) in damages {
        let img = copy(&base, "damaged.qcow2");
        damage(&Geo::new(&img));
        let (code0, v0) = qemu_check(&img);
        assert_eq!(code0, 2, "{name}");
        let corr0 = n(&v0, "corruptions");
        let bytes = std::fs::read(&img).unwrap();
        let all = Some(RepairMode::All);
        let opts = CheckOptions {
            repair: all,
            mark_clean: true,
            progress: None,
        };

        let fs = FaultStorage::new(bytes.clone(), None);
        assert!(check(&fs, &opts).unwrap().is_clean(), "{name}");
        let total = fs.writes();
        assert!(total > 0);
        for crash_at in 0..total {
            for mode in [
                CrashMode::FlushedOnly,
                CrashMode::AllWrites,
                CrashMode::RandomSubset(crash_at * 31 + 7),
            ] {
                let fs = FaultStorage::new(bytes.clone(), Some(crash_at));
                assert!(check(&fs, &opts).is_err(), "{name}: no crash at {crash_at}");
                let p = d.path().join("crashed.qcow2");
                std::fs::write(&p, fs.crashed_image(mode)).unwrap();
                let (code, v) = qemu_check(&p);
                assert!(
                    matches!(code, 0 | 2 | 3) && n(&v, "corruptions") <= corr0,
                    "{name}: crash after {crash_at} writes ({mode:?}) left {v}"
                );
                assert_eq!(repair(&p, "all"), 0, "{name}: {crash_at} {mode:?}");
                assert_eq!(qemu_check(&p).0, 0, "{name}: {crash_at} {mode:?}");
                identical(&p, &base);
            }
        }
        eprintln!("{name}: crashed the repair at each of {total} writes");
    }
}

/// QEMU's iotest 039: a crash under lazy refcounts leaves a dirty image with refcounts missing;
/// `check -r all` rebuilds them, clears the dirty bit, and the data is intact.
#[test]
fn lazy_refcounts_crash_like_iotest_039() {
    let d = tempfile::tempdir().unwrap();
    for o in [
        "compat=1.1,lazy_refcounts=on",
        "lazy_refcounts=on,cluster_size=512",
    ] {
        let img = make(d.path(), "lazy.qcow2", o, "64M", &["write -P 0x11 0 64k"]);
        // qemu-io's "abort" kills it without a clean close.
        let out = run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 1M 512k",
                "-c",
                "abort",
                s(&img),
            ],
        );
        assert!(!out.status.success());
        let g = Geo::new(&img);
        assert_eq!(g.read(72) & 1, 1, "{o}: image should be dirty");
        assert_eq!(agree(&img), 2, "{o}");
        let info = run(BIN, &["info", "--output", "json", s(&img)]);
        let v: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v.get("dirty-flag"), Some(&Value::Bool(true)));
        // Mark it corrupt as well: repair clears that too, as qemu-img does.
        g.write(72, g.read(72) | 2);
        assert_eq!(repair(&img, "all"), 0, "{o}");
        assert_eq!(g.read(72) & 3, 0, "{o}: dirty/corrupt bits not cleared");
        assert_eq!(qemu_check(&img).0, 0, "{o}");
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x5a 1M 512k", s(&img)],
        );
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x11 0 64k", s(&img)],
        );
        let o2 = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "read -P 0x5a 1M 512k", s(&img)],
        );
        assert!(!String::from_utf8_lossy(&o2.stdout).contains("Pattern verification failed"));
    }
}

/// Images our own engine leaves behind after a crash at every write (with and without lazy
/// refcounts): our check agrees with qemu-img's, and our repair makes qemu-img call them clean.
#[test]
fn engine_crash_leftovers_agree() {
    use std::io::IoSlice;
    use std::sync::Arc;
    use vhost_user_qcow2::block::BlockDevice;
    use vhost_user_qcow2::qcow2::{create, CreateOptions, Qcow2};
    use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

    fn workload(st: Arc<FaultStorage>) {
        let Ok(q) = Qcow2::open_storage(st, false, None, 0) else {
            return;
        };
        let ops: [(u64, u64, u8); 6] = [
            (0, 8192, 1),
            (1 << 20, 12 << 10, 2),
            (3 << 20, 64 << 10, 3),
            (512, 1024, 4),
            (5 << 20, 4096, 5),
            (7 << 20, 100 << 10, 6),
        ];
        for (i, (off, len, v)) in ops.into_iter().enumerate() {
            if q.write_vectored(off, &[IoSlice::new(&vec![v; len as usize])])
                .is_err()
            {
                return;
            }
            if i % 2 == 1 && q.flush().is_err() {
                return;
            }
            if i == 3 && q.discard(1 << 20, 4096).is_err() {
                return;
            }
        }
        let _ = q.close();
    }

    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("crashed.qcow2");
    for lazy in [false, true] {
        let mem = MemStorage::new();
        let o = CreateOptions {
            size: 8 << 20,
            cluster_bits: 12,
            lazy_refcounts: lazy,
            ..Default::default()
        };
        create(&mem, &o).unwrap();
        let initial = mem.snapshot();
        let dry = Arc::new(FaultStorage::new(initial.clone(), None));
        workload(dry.clone());
        let total = dry.writes();
        let mut codes = [0u32; 4];
        for n in 0..total {
            let st = Arc::new(FaultStorage::new(initial.clone(), Some(n)));
            workload(st.clone());
            for mode in [CrashMode::FlushedOnly, CrashMode::RandomSubset(n * 13 + 5)] {
                std::fs::write(&path, st.crashed_image(mode)).unwrap();
                let code = agree(&path);
                codes[code as usize] += 1;
                if code != 0 {
                    assert_eq!(repair(&path, "all"), 0, "lazy {lazy}, crash at {n}");
                    assert_eq!(qemu_check(&path).0, 0, "lazy {lazy}, crash at {n}");
                }
            }
        }
        eprintln!("lazy={lazy}: {total} crash points, exit codes 0/1/2/3: {codes:?}");
    }
}
