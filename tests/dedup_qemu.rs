//! The assumptions the dedup index format rests on, checked against real QEMU 10 tools
//! (docs/dedup.md): an index area of refcount-0 clusters is not a leak for `qemu-img check`;
//! QEMU keeps the DDUP extension verbatim; a writable open clears autoclear bit 63 (so the seal
//! protocol detects it) while a read-only open reopened read-write does not (so every hint must
//! be verified); and QEMU may allocate into the area, which the index cluster checksums catch.

mod common;

use common::{qemu_img, qemu_io};
use std::fs;
use std::io::Write;
use std::path::Path;
use vhost_user_qcow2::qcow2::format::dedup::{
    index_clusters_for, records_per_cluster, seal, trust, DedupCounters, DedupExtension, DedupMode,
    IndexCluster, SealInput, Trust, AUTOCLEAR_DEDUP, EXT_DEDUP,
};
use vhost_user_qcow2::qcow2::format::Header;
use vhost_user_qcow2::qcow2::hashindex::hash_cluster;

const BITS: u32 = 16;
const CS: usize = 1 << BITS;

fn header(img: &Path) -> Header {
    let b = fs::read(img).unwrap();
    Header::decode(&b[..CS]).unwrap()
}

fn seal_input(h: &Header, file_len: u64, generation: u64) -> SealInput {
    SealInput::of(h, file_len, generation)
}

/// Builds a sealed dedup image: qemu-io writes data, then we index every host cluster and append
/// the index area (refcount 0) at the end of the file, add the extension and set bit 63.
fn sealed_image(dir: &Path, name: &str) -> (std::path::PathBuf, DedupExtension, usize) {
    let img = dir.join(name);
    let p = img.to_str().unwrap();
    assert_eq!(qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]).0, 0);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 1 0 256k",
            "write -P 2 1M 256k",
            "write -P 1 4M 64k",
        ],
    );
    let data = fs::read(&img).unwrap();
    let host = (data.len() / CS) as u64;
    // Index every cluster of the file after the header (metadata too: it is only a test).
    let clusters: Vec<(u64, &[u8])> = (1..host)
        .map(|c| (c, &data[c as usize * CS..(c as usize + 1) * CS]))
        .collect();
    let encoded = encode_index(&clusters, host);
    let index_offset = data.len() as u64;
    let mut f = fs::OpenOptions::new().append(true).open(&img).unwrap();
    for c in &encoded {
        f.write_all(c).unwrap();
    }
    drop(f);
    let file_len = fs::metadata(&img).unwrap().len();
    let mut h = header(&img);
    let ext = DedupExtension {
        mode: DedupMode::Inline,
        paused: false,
        cluster_bits: BITS,
        share_cap: 32767,
        index_offset,
        index_clusters: encoded.len() as u64,
        generation: 1,
        seal: seal(&seal_input(&h, file_len, 1)),
        counters: DedupCounters::default(),
        rebuild_from: None,
    };
    h.autoclear_features |= AUTOCLEAR_DEDUP;
    h.set_extension(EXT_DEDUP, Some(ext.encode()));
    let hb = h.encode().unwrap();
    let mut all = fs::read(&img).unwrap();
    all[..CS].copy_from_slice(&hb);
    fs::write(&img, all).unwrap();
    (img, ext, encoded.len())
}

/// Index clusters (generation 1) with the hash of every non-zero cluster given, by position.
fn encode_index(clusters: &[(u64, &[u8])], n: u64) -> Vec<Vec<u8>> {
    let rpc = records_per_cluster(BITS);
    let mut out: Vec<IndexCluster> = (0..index_clusters_for(BITS, n))
        .map(|k| IndexCluster::empty(BITS, 1, k))
        .collect();
    for &(c, data) in clusters {
        if data.iter().any(|&b| b != 0) {
            out[(c / rpc) as usize].set((c % rpc) as usize, Some(&hash_cluster(data)));
        }
    }
    out.iter().map(|ic| ic.encode(BITS)).collect()
}

/// The index clusters that do not decode (wrong magic, checksum, position, generation), and the
/// records of those that do.
fn decode_index(clusters: &[Vec<u8>]) -> (Vec<usize>, usize) {
    let (mut bad, mut records) = (Vec::new(), 0);
    for (k, b) in clusters.iter().enumerate() {
        match IndexCluster::decode(b, BITS, 1, k as u64) {
            Ok(ic) => {
                records += (0..records_per_cluster(BITS) as usize)
                    .filter(|&i| ic.get(i).is_some())
                    .count()
            }
            Err(_) => bad.push(k),
        }
    }
    (bad, records)
}

fn index_clusters(img: &Path, ext: &DedupExtension) -> Vec<Vec<u8>> {
    let b = fs::read(img).unwrap();
    (0..ext.index_clusters as usize)
        .map(|k| {
            let o = ext.index_offset as usize + k * CS;
            b.get(o..o + CS).unwrap_or(&[]).to_vec()
        })
        .collect()
}

fn trust_now(img: &Path) -> (Trust, Header, DedupExtension) {
    let h = header(img);
    let ext = DedupExtension::decode(h.extension(EXT_DEDUP).expect("DDUP extension kept")).unwrap();
    let len = fs::metadata(img).unwrap().len();
    (
        trust(h.autoclear_features, &ext, &seal_input(&h, len, 1)),
        h,
        ext,
    )
}

#[test]
fn sealed_index_is_clean_for_qemu_and_loads() {
    let d = tempfile::tempdir().unwrap();
    let (img, ext, n) = sealed_image(d.path(), "a.qcow2");
    let (code, out) = qemu_img(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "refcount-0 index area must not be a leak:\n{out}");
    let (t, _, e) = trust_now(&img);
    assert_eq!(t, Trust::Load);
    assert_eq!(e, ext);
    let cl = index_clusters(&img, &ext);
    let (bad, records) = decode_index(&cl);
    assert!(bad.is_empty() && records > 0, "{bad:?} {records} {n}");
    // A read-only open leaves everything as it was.
    let (code, out) = run_ro(&img, &["read -P 1 0 64k", "read -P 2 1M 64k"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(trust_now(&img).0, Trust::Load);
    // A writable open that only reads still clears bit 63.
    qemu_io(&img, "qcow2", &["read -P 1 0 64k"]);
    assert!(matches!(trust_now(&img).0, Trust::Rebuild(_)));
}

fn run_ro(img: &Path, cmds: &[&str]) -> (i32, String) {
    let mut args = vec!["-r", "-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    common::run("qemu-io", &args)
}

#[test]
fn writable_open_clears_bit_keeps_extension_and_may_reuse_the_area() {
    let d = tempfile::tempdir().unwrap();
    let (img, ext, _) = sealed_image(d.path(), "b.qcow2");
    // qemu-io opens writable and allocates a new cluster.
    qemu_io(&img, "qcow2", &["write -P 9 32M 64k"]);
    let (t, h, e) = trust_now(&img);
    assert_eq!(
        h.autoclear_features & AUTOCLEAR_DEDUP,
        0,
        "QEMU cleared bit 63"
    );
    assert_eq!(e, ext, "QEMU kept the DDUP extension verbatim");
    assert!(matches!(t, Trust::Rebuild(_)));
    // QEMU saw the refcount-0 index area as free and put its new cluster there: the first index
    // cluster no longer decodes.
    let cl = index_clusters(&img, &ext);
    assert_eq!(
        decode_index(&cl).0,
        vec![0],
        "QEMU allocated into the index area"
    );
    qemu_io(&img, "qcow2", &["read -P 9 32M 64k"]);
    assert_eq!(qemu_img(&["check", img.to_str().unwrap()]).0, 0);
}

#[test]
fn read_only_open_reopened_writable_keeps_bit() {
    // The qemu-img commit pattern: why the seal cannot be trusted for correctness.
    let d = tempfile::tempdir().unwrap();
    let (img, _, _) = sealed_image(d.path(), "c.qcow2");
    let (code, out) = run_ro(&img, &["reopen -w", "write -P 7 0 64k"]);
    assert_eq!(code, 0, "{out}");
    let (t, h, _) = trust_now(&img);
    assert_ne!(
        h.autoclear_features & AUTOCLEAR_DEDUP,
        0,
        "bit 63 survives a reopen to read-write"
    );
    // An in-place write changes neither the header nor the file length: the seal still matches
    // although cluster contents changed under the index.
    assert_eq!(t, Trust::Load);
    qemu_io(&img, "qcow2", &["read -P 7 0 64k"]);
}
