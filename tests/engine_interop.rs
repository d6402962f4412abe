//! Interop with QEMU's tools in both directions: images qemu-img/qemu-io make and fill are read
//! here; images written here are verified by qemu-io and checked by qemu-img. Also internal
//! snapshots (COW), compressed clusters (zlib, zstd), backing chains, refused features, bad input.

mod common;

use common::{assert_check_clean, assert_same_as_raw, qemu_img, qemu_io};
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{Qcow2, Qcow2Error};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read(q: &Qcow2, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    q.read_vectored(off, &mut [IoSliceMut::new(&mut b)])
        .unwrap();
    b
}

fn write(q: &Qcow2, off: u64, data: &[u8]) {
    q.write_vectored(off, &[IoSlice::new(data)]).unwrap();
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(s(&p));
    args.push(size);
    let (c, out) = qemu_img(&args);
    assert_eq!(c, 0, "{out}");
    p
}

#[test]
fn qemu_writes_we_read_we_write_qemu_reads() {
    let variants = [
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4096,refcount_bits=64",
        "cluster_size=65536",
        "cluster_size=2097152",
        "compat=0.10",
        "lazy_refcounts=on",
        "refcount_bits=8,cluster_size=16384",
    ];
    for opts in variants {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "a.qcow2", opts, "64M");
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0x11 0 1M",
                "write -P 0x22 3M 5000",
                "write -z 4M 1M",
                "write -P 0x33 10M 64k",
                "write -z -u 10M 64k",
                "write -P 0x44 63M 1M",
                "discard 63M 512k",
            ],
        );
        {
            let q = Qcow2::open(&img, true).unwrap();
            assert!(read(&q, 0, 1 << 20).iter().all(|&b| b == 0x11), "{opts}");
            let r = read(&q, 3 << 20, 8192);
            assert!(
                r[..5000].iter().all(|&b| b == 0x22) && r[5000..].iter().all(|&b| b == 0),
                "{opts}"
            );
            assert!(read(&q, 4 << 20, 1 << 20).iter().all(|&b| b == 0), "{opts}");
            assert!(read(&q, 10 << 20, 65536).iter().all(|&b| b == 0), "{opts}");
            assert!(
                read(&q, (63 << 20) + (512 << 10), 512 << 10)
                    .iter()
                    .all(|&b| b == 0x44),
                "{opts}"
            );
        }
        {
            let q = Qcow2::open(&img, false).unwrap();
            write(&q, 512, &[0x55; 1024]); // inside qemu's data: in place
            write(&q, 20 << 20, &[0x66; 200_000]); // fresh clusters
            write(&q, (4 << 20) + 4096, &[0x77; 4096]); // into zero clusters
            q.write_zeroes(0, 512, false).unwrap();
            q.close().unwrap();
        }
        assert_check_clean(&img);
        qemu_io(
            &img,
            "qcow2",
            &[
                "read -P 0 0 512",
                "read -P 0x55 512 1024",
                "read -P 0x11 1536 1047040",
                "read -P 0x66 20M 200000",
                "read -P 0 4M 4096",
                "read -P 0x77 4100k 4096",
                "read -P 0 4104k 1040384",
            ],
        );
    }
}

#[test]
fn internal_snapshot_clusters_are_copied_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "s.qcow2", "cluster_size=65536", "32M");
    qemu_io(&img, "qcow2", &["write -P 0xaa 0 2M"]);
    let (c, out) = qemu_img(&["snapshot", "-c", "snap1", s(&img)]);
    assert_eq!(c, 0, "{out}");
    {
        let q = Qcow2::open(&img, false).unwrap();
        write(&q, 4096, &[0xbb; 4096]); // partial write into a shared cluster: COW
        write(&q, 1 << 20, &[0xcc; 1 << 20]); // whole shared clusters
        q.discard(1 << 16, 1 << 16).unwrap(); // drop one reference of a shared cluster
        q.close().unwrap();
    }
    assert_check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0xaa 0 4096",
            "read -P 0xbb 4096 4096",
            "read -P 0xaa 8192 57344",
            "read -P 0 64k 64k",
            "read -P 0xcc 1M 1M",
        ],
    );
    // The snapshot still holds the old data.
    let (c, out) = qemu_img(&["snapshot", "-a", "snap1", s(&img)]);
    assert_eq!(c, 0, "{out}");
    qemu_io(&img, "qcow2", &["read -P 0xaa 0 2M"]);
    assert_check_clean(&img);
}

#[test]
fn compressed_clusters_zlib_and_zstd() {
    for ctype in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let mut data = vec![0u8; 4 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = ((i / 1000) % 251) as u8;
        }
        std::fs::write(&raw, &data).unwrap();
        let img = dir.path().join("c.qcow2");
        let opt = format!("compression_type={ctype}");
        let (c, out) = qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opt,
            s(&raw),
            s(&img),
        ]);
        assert_eq!(c, 0, "{out}");
        {
            let q = Qcow2::open(&img, false).unwrap();
            assert_eq!(read(&q, 0, 4 << 20), data, "{ctype} read");
            // Partial overwrite of a compressed cluster: the rest is decompressed and copied.
            write(&q, 70_000, &[0xee; 3000]);
            q.close().unwrap();
        }
        data[70_000..73_000].fill(0xee);
        std::fs::write(&raw, &data).unwrap();
        assert_check_clean(&img);
        assert_same_as_raw(&img, &raw);
    }
}

#[test]
fn backing_chain_with_relative_names() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = sub.join("base.raw");
    std::fs::write(&base, vec![0x10u8; 8 << 20]).unwrap();
    let mid = sub.join("mid.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "16M",
    ]);
    assert_eq!(c, 0, "{o}");
    qemu_io(&mid, "qcow2", &["write -P 0x20 1M 1M"]);
    let top = sub.join("top.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "16M",
    ]);
    assert_eq!(c, 0, "{o}");
    qemu_io(&top, "qcow2", &["write -P 0x30 1536k 4k"]);
    {
        let q = Qcow2::open(&top, false).unwrap();
        assert!(read(&q, 0, 1 << 20).iter().all(|&b| b == 0x10));
        let r = read(&q, 1 << 20, 1 << 20);
        assert!(r[..512 << 10].iter().all(|&b| b == 0x20));
        assert!(r[512 << 10..(512 << 10) + 4096].iter().all(|&b| b == 0x30));
        assert!(
            read(&q, 8 << 20, 8 << 20).iter().all(|&b| b == 0),
            "past the raw base: zeros"
        );
        // A partial write over backing data copies the rest of the cluster from the chain.
        write(&q, (1 << 20) + 100 * 512, &[0x40; 512]);
        q.close().unwrap();
    }
    assert_check_clean(&top);
    qemu_io(
        &top,
        "qcow2",
        &[
            "read -P 0x20 1M 51200",
            "read -P 0x40 1099776 512",
            "read -P 0x20 1100288 472576",
            "read -P 0x30 1536k 4k",
        ],
    );
}

fn open_err(img: &Path, rw: bool) -> String {
    match Qcow2::open(img, !rw) {
        Ok(_) => panic!("{} opened but should not", img.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_features_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = create(d, "x.qcow2", "extended_l2=on", "1M");
    assert!(open_err(&img, true).contains("extended L2"));
    let img = d.join("e.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        s(&img),
        "1M",
    ]);
    assert_eq!(c, 0, "{o}");
    assert!(open_err(&img, true).contains("encryption"));
    let df = d.join("data.raw");
    let img = create(d, "df.qcow2", &format!("data_file={}", s(&df)), "1M");
    assert!(open_err(&img, true).contains("external data file"));
    // Unknown incompatible bit, corrupt bit (refused read-write only).
    for (bit, rw_only, word) in [
        (1u64 << 40, false, "unknown incompatible"),
        (2, true, "corrupt"),
    ] {
        let img = create(d, "b.qcow2", "", "1M");
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[72..80].copy_from_slice(&bit.to_be_bytes());
        std::fs::write(&img, &bytes).unwrap();
        assert!(open_err(&img, true).contains(word), "{word}");
        assert_eq!(Qcow2::open(&img, true).is_ok(), rw_only, "{word} read-only");
    }
}

/// QEMU iotest 039's "open for write auto-repairs": a dirty image whose refcounts lag behind its
/// tables opens read-only as it is, and read-write after a repair, with the data intact.
#[test]
fn dirty_image_is_repaired_on_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "d.qcow2", "lazy_refcounts=on", "64M");
    // qemu-io with lazy refcounts, killed with abort: DIRTY stays set, refcounts are missing.
    let (_, out) = common::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 512k",
            "-c",
            "abort",
            s(&img),
        ],
    );
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[79] & 1 != 0,
        "qemu-io abort should leave DIRTY set: {out}"
    );
    let (code, _) = qemu_img(&["check", s(&img)]);
    assert_eq!(code, 2, "refcounts lag behind the tables");
    {
        let q = Qcow2::open(&img, true).unwrap();
        assert!(
            read(&q, 0, 512 << 10).iter().all(|&b| b == 0x5a),
            "read-only access works"
        );
    }
    {
        let q = Qcow2::open(&img, false).unwrap();
        assert!(read(&q, 0, 512 << 10).iter().all(|&b| b == 0x5a));
        write(&q, 1 << 20, &[0x6b; 4096]);
        q.close().unwrap();
    }
    assert_eq!(std::fs::read(&img).unwrap()[79] & 1, 0, "DIRTY cleared");
    assert_check_clean(&img);
    qemu_io(
        &img,
        "qcow2",
        &["read -P 0x5a 0 512k", "read -P 0x6b 1M 4k"],
    );
}

#[test]
fn damaged_images_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = create(d, "g.qcow2", "", "64M");
    qemu_io(&good, "qcow2", &["write -P 1 0 1M"]);
    let orig = std::fs::read(&good).unwrap();
    let poke = |name: &str, f: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let mut b = orig.clone();
        f(&mut b);
        let p = d.join(name);
        std::fs::write(&p, &b).unwrap();
        p
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (poke("trunc", &|b| b.truncate(50)), "truncated"),
        (
            poke("l1big", &|b| {
                b[36..40].copy_from_slice(&0x7fff_ffffu32.to_be_bytes())
            }),
            "L1",
        ),
        (
            poke("l1off", &|b| {
                b[40..48].copy_from_slice(&(1u64 << 50).to_be_bytes())
            }),
            "L1",
        ),
        (
            poke("rtbig", &|b| {
                b[56..60].copy_from_slice(&0xffff_fff0u32.to_be_bytes())
            }),
            "refcount table",
        ),
        (
            poke("rtoff", &|b| {
                b[48..56].copy_from_slice(&0x1234u64.to_be_bytes())
            }),
            "refcount table",
        ),
        (poke("magic", &|b| b[0] = b'X'), "magic"),
        (poke("cbits", &|b| b[23] = 40), "cluster_bits"),
    ];
    for (p, word) in cases {
        let e = match Qcow2::open(&p, false) {
            Ok(_) => panic!("{} opened", p.display()),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(word), "{}: {e}", p.display());
    }
    // An L2 entry pointing past the end of the file, and one unaligned: reads fail cleanly.
    let q = Qcow2::open(&good, true).unwrap();
    drop(q);
    let l1_off = u64::from_be_bytes(orig[40..48].try_into().unwrap()) as usize;
    let l2_off = (u64::from_be_bytes(orig[l1_off..l1_off + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    let p = poke("l2past", &|b| {
        b[l2_off..l2_off + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | (1 << 40)).to_be_bytes())
    });
    let q = Qcow2::open(&p, false).unwrap();
    let mut buf = vec![0u8; 512];
    // Reading past EOF is harmless (zeros); what matters is no panic and no wild write.
    let _ = q.read_vectored(0, &mut [IoSliceMut::new(&mut buf)]);
    let p = poke("l2unal", &|b| {
        b[l2_off..l2_off + 8].copy_from_slice(&(0x8000_0000_0005_0200u64).to_be_bytes())
    });
    let q = Qcow2::open(&p, false).unwrap();
    let e = q
        .read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
        .unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
    assert!(q.write_vectored(0, &[IoSlice::new(&buf)]).is_err());
    let _: Option<Qcow2Error> = None;
}
