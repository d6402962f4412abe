//! Target `dedup`: the dedup index and the record codecs.
//!
//! The first byte picks the part:
//! - 0: `DedupExtension::decode` of the rest (and again with its CRC made right, so the fields
//!   behind the checksum are reached); whatever decodes must encode and decode to itself.
//! - 1: `IndexCluster::decode` (cluster bits, generation and position from the input; magic and
//!   CRC made right when the input asks), round trip as above; then `load` of it.
//! - 2: `DedupIndex` against a model: a sequence of insert / remove / contains / lookup /
//!   shrink / remove-by-cluster operations; after each, the index and a set of (fingerprint,
//!   cluster) pairs must agree (the index keys on the first 32 bits of the hash).
//! - 3: `encode_records` of records from the input, then `load` of the result: every record
//!   that fits must come back.

use super::Cursor;
use std::collections::BTreeSet;
use vhost_user_qcow2::qcow2::dedup::persist::{
    records_per_cluster, DedupExtension, IndexCluster, EXT_LEN, INDEX_MAGIC,
};
use vhost_user_qcow2::qcow2::dedup::{encode_records, load, DedupIndex, MAX_CLUSTER};

/// Largest cluster size used here: 64 KiB (the codecs do not change above it).
const MAX_BITS: u32 = 16;

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    match c.u8() % 4 {
        0 => extension(c.rest()),
        1 => index_cluster(&mut c),
        2 => index_ops(&mut c),
        _ => records(&mut c),
    }
}

fn extension(b: &[u8]) {
    check_extension(b);
    if b.len() >= EXT_LEN {
        let mut v = b.to_vec();
        let crc = crc32c::crc32c(&v[..124]);
        v[124..128].copy_from_slice(&crc.to_be_bytes());
        check_extension(&v);
    }
}

fn check_extension(b: &[u8]) {
    if let Ok(e) = DedupExtension::decode(b) {
        let enc = e.encode();
        assert_eq!(enc.len(), EXT_LEN);
        assert_eq!(DedupExtension::decode(&enc).as_ref(), Ok(&e));
    }
}

fn index_cluster(c: &mut Cursor<'_>) {
    let bits = 9 + u32::from(c.u8()) % (MAX_BITS - 8);
    let generation = u64::from(c.u8());
    let k = u64::from(c.u16());
    let fix = c.u8();
    let mut b = c.rest().to_vec();
    let size = 1usize << bits;
    if fix & 1 != 0 && b.len() >= 8 {
        b[0..4].copy_from_slice(&INDEX_MAGIC.to_be_bytes());
    }
    if fix & 2 != 0 && b.len() >= size {
        let crc = crc32c::crc32c(&b[8..size]);
        b[4..8].copy_from_slice(&crc.to_be_bytes());
    }
    if let Ok(ic) = IndexCluster::decode(&b, bits, generation, k) {
        assert_eq!(ic.records.len() as u64, records_per_cluster(bits));
        let enc = ic.encode(bits);
        assert_eq!(enc.len(), size);
        assert_eq!(
            IndexCluster::decode(&enc, bits, generation, k).as_ref(),
            Ok(&ic)
        );
    }
    // As index cluster 0 of a load (any k other than 0 fails its position check).
    let (idx, rep) = load([&b[..]], bits, generation, 0);
    assert_eq!(idx.len(), rep.entries);
}

fn hash(c: &mut Cursor<'_>) -> [u8; 32] {
    // Few distinct fingerprints, so collisions, shared tags and full shards happen.
    let f = c.u16();
    let mut h = [0u8; 32];
    h[0] = (f >> 8) as u8 & 0x83;
    h[1] = (f >> 4) as u8 & 0x0f;
    h[2] = f as u8 & 0x0f;
    h[3] = (f >> 12) as u8;
    h
}

fn fp(h: &[u8; 32]) -> u32 {
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

fn index_ops(c: &mut Cursor<'_>) {
    let mut idx = if c.u8() & 1 != 0 {
        DedupIndex::with_capacity(u64::from(c.u16() % 8192))
    } else {
        DedupIndex::new()
    };
    let mut model: BTreeSet<(u32, u64)> = BTreeSet::new();
    let mut ops = 0;
    // Shrinking and removal by cluster walk every slot: at most a few per input.
    let mut walks = 0;
    while !c.is_empty() && ops < 512 {
        ops += 1;
        let op = c.u8();
        let h = hash(c);
        let cl = u64::from(c.u16()) % 64;
        // Now and then a cluster at or past the 36-bit cap.
        let cl = if op & 0x80 != 0 {
            MAX_CLUSTER - 1 + cl
        } else {
            cl
        };
        match op % 16 {
            0..=5 => {
                let r = idx.insert(&h, cl);
                if cl == 0 || cl > MAX_CLUSTER {
                    assert!(r.is_err(), "cluster {cl} indexed");
                } else {
                    assert_eq!(r, Ok(model.insert((fp(&h), cl))), "insert {h:?} {cl}");
                }
            }
            6..=9 => assert_eq!(
                idx.remove(&h, cl),
                model.remove(&(fp(&h), cl)),
                "remove {cl}"
            ),
            10..=13 => {
                let mut got = idx.lookup(&h);
                got.sort_unstable();
                let want: Vec<u64> = model
                    .range((fp(&h), 0)..=(fp(&h), u64::MAX))
                    .map(|&(_, c)| c)
                    .collect();
                assert_eq!(got, want, "lookup {h:?}");
                assert_eq!(idx.contains(&h, cl), model.contains(&(fp(&h), cl)));
            }
            14 | 15 if walks >= 4 => {}
            14 => {
                walks += 1;
                idx.shrink_to_fit();
            }
            _ => {
                walks += 1;
                let n = idx.remove_cluster_slow(cl);
                let before = model.len();
                model.retain(|&(_, c)| c != cl || cl == 0);
                assert_eq!(n, (before - model.len()) as u64, "remove_cluster_slow {cl}");
            }
        }
        assert_eq!(idx.len(), model.len() as u64);
    }
    assert!(idx.slots() >= idx.len());
}

fn records(c: &mut Cursor<'_>) {
    let bits = 9 + u32::from(c.u8()) % (MAX_BITS - 8);
    let generation = c.u64();
    let index_clusters = u64::from(c.u8() % 4);
    let mut recs = Vec::new();
    while !c.is_empty() && recs.len() < 1024 {
        let cl = u64::from(c.u16());
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&c.u32().to_be_bytes());
        h[31] = 1; // never the all-zero "no record"
        recs.push((cl, h));
    }
    let (enc, dropped) = encode_records(recs.iter().copied(), bits, generation, index_clusters);
    assert_eq!(enc.clusters.len() as u64, index_clusters);
    let covered = index_clusters * records_per_cluster(bits);
    assert_eq!(
        dropped,
        recs.iter().filter(|(cl, _)| *cl >= covered).count() as u64
    );
    let (idx, rep) = load(
        enc.clusters.iter().map(Vec::as_slice),
        bits,
        generation,
        recs.len() as u64,
    );
    assert!(rep.bad_clusters.is_empty());
    // The last record for a cluster wins; cluster 0 is never indexed.
    let mut last = std::collections::BTreeMap::new();
    for (cl, h) in &recs {
        if *cl < covered {
            last.insert(*cl, *h);
        }
    }
    for (cl, h) in &last {
        assert_eq!(idx.contains(h, *cl), *cl != 0, "record {cl}");
    }
    assert_eq!(rep.entries + rep.not_indexable, last.len() as u64);
}
