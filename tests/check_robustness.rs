//! The checker on hostile input (malformed headers, truncated files), the CLI (`check`, `info`),
//! crash safety of repair, lazy-refcount crashes (iotest 039), and our engine's crash leftovers.

mod check_support;

use check_support::*;
use serde_json::Value;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use vhost_user_qcow2::qcow2::check::{check, CheckOptions, RepairMode};
use vhost_user_qcow2::qcow2::format::entries::{L2E_OFFSET_MASK, OFLAG_COPIED};

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
        // actual-size is st_blocks: let writeback settle it before the two reads.
        std::fs::File::open(img).unwrap().sync_all().unwrap();
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
                CrashMode::TornSectors(crash_at * 17 + 9),
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
    use vhost_user_qcow2::qcow2::engine::OpenOptions as EngineOpen;
    use vhost_user_qcow2::qcow2::{create, CreateOptions, Qcow2};
    use vhost_user_qcow2::storage::{CrashMode, FaultStorage, MemStorage};

    /// Runs until the storage fails; returns how many flushes completed.
    fn workload(st: Arc<FaultStorage>) -> usize {
        let Ok(q) = Qcow2::open_storage(st, &EngineOpen::default(), None, 0) else {
            return 0;
        };
        let ops: [(u64, u64, u8); 6] = [
            (0, 8192, 1),
            (1 << 20, 12 << 10, 2),
            (3 << 20, 64 << 10, 3),
            (512, 1024, 4),
            (5 << 20, 4096, 5),
            (7 << 20, 100 << 10, 6),
        ];
        let mut flushes = 0;
        for (i, (off, len, v)) in ops.into_iter().enumerate() {
            if q.write_vectored(off, &[IoSlice::new(&vec![v; len as usize])])
                .is_err()
            {
                return flushes;
            }
            if i % 2 == 1 {
                if q.flush().is_err() {
                    return flushes;
                }
                flushes += 1;
            }
            if i == 3 && q.discard(1 << 20, 4096).is_err() {
                return flushes;
            }
        }
        let _ = q.close();
        flushes
    }

    /// (offset, length, byte) ranges that must read back once `flushes` flushes completed
    /// (only ranges nothing touched after that flush).
    fn durable(flushes: usize) -> Vec<(u64, u64, u8)> {
        let steps: [&[(u64, u64, u8)]; 3] = [
            &[
                (0, 512, 1),
                (1536, 8192 - 1536, 1),
                ((1 << 20) + 4096, 8192, 2),
            ],
            &[(3 << 20, 64 << 10, 3), (512, 1024, 4)],
            &[
                (5 << 20, 4096, 5),
                (7 << 20, 100 << 10, 6),
                (1 << 20, 4096, 0),
            ],
        ];
        steps[..flushes.min(3)].concat()
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
            let flushes = workload(st.clone());
            for mode in [
                CrashMode::FlushedOnly,
                CrashMode::RandomSubset(n * 13 + 5),
                CrashMode::TornSectors(n * 19 + 1),
            ] {
                std::fs::write(&path, st.crashed_image(mode)).unwrap();
                let code = agree(&path);
                codes[code as usize] += 1;
                if code != 0 {
                    assert_eq!(repair(&path, "all"), 0, "lazy {lazy}, crash at {n}");
                    assert_eq!(qemu_check(&path).0, 0, "lazy {lazy}, crash at {n}");
                }
                // Nothing flushed is lost, repaired or not.
                for (off, len, v) in durable(flushes) {
                    let cmd = format!("read -P {v} {off} {len}");
                    let o = run("qemu-io", &["-f", "qcow2", "-c", &cmd, s(&path)]);
                    let out = String::from_utf8_lossy(&o.stdout);
                    assert!(
                        o.status.success() && !out.contains("verification failed"),
                        "lazy {lazy}, crash at {n} ({mode:?}): {cmd}: {out}"
                    );
                }
            }
        }
        eprintln!("lazy={lazy}: {total} crash points, exit codes 0/1/2/3: {codes:?}");
    }
}
