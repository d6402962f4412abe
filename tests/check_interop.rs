//! Our `check` against `qemu-img check` (QEMU 10) on real images: same exit codes and counters
//! on clean and damaged images, and our repair leaves images qemu-img calls clean with the guest
//! data intact.

mod check_support;

use check_support::*;
use vhost_user_qcow2::qcow2::format::entries::{L2E_OFFSET_MASK, OFLAG_COPIED};

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
