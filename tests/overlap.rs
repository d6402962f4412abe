//! Metadata overlap checks on hand-crafted hostile images: an L2 entry made to point at each kind
//! of metadata in turn. The write there must be refused, the image marked corrupt, reads must go
//! on, and nothing but the header's feature bits may change on disk.

mod common;

use common::{qemu_img, qemu_io};
use std::io::{IoSlice, IoSliceMut};
use std::path::Path;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::qcow2::format::{self, header::EXT_BITMAPS, Header};
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2, Qcow2Error};

const COPIED: u64 = 1 << 63;
const MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(b: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
}

/// An image with data, an internal snapshot, a copied-on-write L2 table (so the snapshot has an
/// L2 table of its own) and a persistent bitmap.
fn hostile_base(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("base.qcow2");
    let p = img.to_str().unwrap();
    assert_eq!(qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]).0, 0);
    qemu_io(&img, "qcow2", &["write -P 1 0 4M"]);
    assert_eq!(qemu_img(&["snapshot", "-c", "s1", p]).0, 0);
    qemu_io(&img, "qcow2", &["write -P 2 0 64k"]);
    let (c, o) = qemu_img(&["bitmap", "--add", p, "bm0"]);
    assert_eq!(c, 0, "{o}");
    img
}

/// (name, host offset) of every kind of metadata in the image.
fn targets(bytes: &[u8]) -> Vec<(&'static str, u64)> {
    let h = Header::decode(bytes).unwrap();
    let l2 = be64(bytes, h.l1_table_offset) & MASK;
    let rb = be64(bytes, h.refcount_table_offset) & MASK;
    let (snaps, _) =
        format::snapshot::decode_table(&bytes[h.snapshots_offset as usize..], h.nb_snapshots)
            .unwrap();
    let s_l1 = snaps[0].l1_table_offset;
    let s_l2 = be64(bytes, s_l1) & MASK;
    assert_ne!(s_l2, l2, "the snapshot must have an L2 table of its own");
    let bm = h.extension(EXT_BITMAPS).expect("bitmap extension");
    let bm_dir = u64::from_be_bytes(bm[16..24].try_into().unwrap());
    vec![
        ("active L1 table", h.l1_table_offset),
        ("active L2 table", l2),
        ("refcount table", h.refcount_table_offset),
        ("refcount block", rb),
        ("snapshot table", h.snapshots_offset),
        ("inactive L1 table", s_l1),
        ("inactive L2 table", s_l2),
        ("bitmap directory", bm_dir),
    ]
}

/// Point the active L2 entry of guest cluster 1 at `target`, as a COPIED data cluster.
fn poke(bytes: &mut [u8], target: u64) {
    let h = Header::decode(bytes).unwrap();
    let l2 = be64(bytes, h.l1_table_offset) & MASK;
    let at = (l2 + 8) as usize;
    bytes[at..at + 8].copy_from_slice(&(target | COPIED).to_be_bytes());
}

fn open(img: &Path, mode: OverlapMode) -> Qcow2 {
    Qcow2::open_with(
        img,
        &OpenOptions {
            overlap_check: mode,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn writes_into_every_kind_of_metadata_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(hostile_base(dir.path())).unwrap();
    let img = dir.path().join("h.qcow2");
    for (name, target) in targets(&base) {
        let mut bytes = base.clone();
        poke(&mut bytes, target);
        std::fs::write(&img, &bytes).unwrap();
        let q = open(&img, OverlapMode::All);
        let err = q
            .write_vectored(65536, &[IoSlice::new(&[0xee; 512])])
            .unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
        assert!(q.is_corrupt(), "{name}");
        // Reads go on; writes anywhere are refused from now on.
        let mut buf = vec![0u8; 65536];
        q.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert!(buf.iter().all(|&b| b == 2), "{name}: read after the event");
        assert!(q
            .write_vectored(8 << 20, &[IoSlice::new(&[1; 512])])
            .is_err());
        q.close().unwrap();
        drop(q);
        let after = std::fs::read(&img).unwrap();
        assert_eq!(after.len(), bytes.len(), "{name}");
        let changed: Vec<usize> = (0..after.len()).filter(|&i| after[i] != bytes[i]).collect();
        // Only the feature fields: the CORRUPT bit, and the autoclear bits a read-write open
        // clears (we keep no bitmaps in sync, as QEMU does with bits it does not know).
        assert!(
            changed.contains(&79) && changed.iter().all(|&i| i == 79 || (88..96).contains(&i)),
            "{name}: changed bytes {changed:?}"
        );
        assert_eq!(after[79] & 2, 2, "{name}: CORRUPT bit");
        // A later read-write open is refused; read-only works.
        assert!(
            matches!(Qcow2::open(&img, false), Err(Qcow2Error::MarkedCorrupt)),
            "{name}"
        );
        assert!(Qcow2::open(&img, true).is_ok());
        let (_, info) = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{name}: {info}");
    }
}

/// Without the check the same write lands in the metadata: the test above can fail.
#[test]
fn without_checks_the_write_destroys_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(hostile_base(dir.path())).unwrap();
    let img = dir.path().join("n.qcow2");
    let (_, target) = targets(&base)[2]; // the refcount table
    let mut bytes = base.clone();
    poke(&mut bytes, target);
    std::fs::write(&img, &bytes).unwrap();
    let q = open(&img, OverlapMode::None);
    q.write_vectored(65536, &[IoSlice::new(&[0xee; 512])])
        .unwrap();
    drop(q);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        &after[target as usize..target as usize + 512],
        &[0xee; 512][..]
    );
}

/// Our own metadata writes are guarded too: an L1 entry whose "L2 table" is the refcount table.
#[test]
fn metadata_writes_are_guarded() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(hostile_base(dir.path())).unwrap();
    let img = dir.path().join("m.qcow2");
    let mut bytes = base.clone();
    let h = Header::decode(&bytes).unwrap();
    // Point L1[0] at the refcount block, marked COPIED: a write then changes that "L2 table" and
    // the flush must refuse to write it back over the refcount block.
    let rb = be64(&bytes, h.refcount_table_offset) & MASK;
    let l1 = h.l1_table_offset as usize;
    bytes[l1..l1 + 8].copy_from_slice(&(rb | COPIED).to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let q = open(&img, OverlapMode::All);
    // Entry 100 of the refcount block read as an L2 table is zero: unallocated, so this
    // allocates and links in the fake L2 table; the flush must be refused.
    let r = q
        .write_vectored(100 * 65536, &[IoSlice::new(&[3; 4096])])
        .and_then(|_| q.flush());
    assert!(
        r.is_err(),
        "flushing an L2 table over a refcount block must fail"
    );
    assert!(q.is_corrupt());
    drop(q);
    let after = std::fs::read(&img).unwrap();
    let rb = rb as usize;
    assert_eq!(
        &after[rb..rb + 65536],
        &bytes[rb..rb + 65536],
        "refcount block untouched"
    );
}

/// Past the map's memory cap the snapshots' tables stop being tracked (with a warning); the other
/// kinds are still checked.
#[test]
fn over_the_map_cap_snapshot_tables_are_dropped_and_the_rest_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(hostile_base(dir.path())).unwrap();
    let img = dir.path().join("cap.qcow2");
    let t = targets(&base);
    for (name, target, refused) in [
        ("inactive L2 table", t[6].1, false),
        ("refcount table", t[2].1, true),
    ] {
        let mut bytes = base.clone();
        poke(&mut bytes, target);
        std::fs::write(&img, &bytes).unwrap();
        let opts = OpenOptions {
            overlap_map_cap: Some(1),
            ..Default::default()
        };
        let q = Qcow2::open_with(&img, &opts).unwrap();
        let r = q.write_vectored(65536, &[IoSlice::new(&[0xee; 512])]);
        assert_eq!(r.is_err(), refused, "{name}: {r:?}");
        drop(q);
    }
}
