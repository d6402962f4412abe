//! Target `dedup`: the dedup index and the record codecs.
//!
//! The first byte picks the part:
//! - 0: `DedupExtension::decode` of the rest (and again with its CRC made right, so the fields
//!   behind the checksum are reached); whatever decodes must encode and decode to itself.
//! - 1: `IndexCluster::decode` (cluster bits, generation and position from the input; magic and
//!   CRC made right when the input asks), round trip as above.
//! - 2: `DedupIndex` against a model: a sequence of insert / remove / contains / lookup
//!   operations; after each, the index and a set of (fingerprint, cluster) pairs must agree (the
//!   index keys on the first 32 bits of the hash).
//! - 3: records from the input set into index clusters (`IndexCluster::set`, by position),
//!   encoded and decoded: every record must come back, the last one set for a position winning.

use super::Cursor;
use std::collections::BTreeSet;
use vhost_user_qcow2::qcow2::format::dedup::{
    index_clusters_for, records_per_cluster, DedupExtension, IndexCluster, EXT_LEN, INDEX_MAGIC,
};
use vhost_user_qcow2::qcow2::hashindex::{DedupIndex, MAX_CLUSTER};

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
    let mut idx = DedupIndex::new();
    let mut model: BTreeSet<(u32, u64)> = BTreeSet::new();
    let mut ops = 0;
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
        match op % 14 {
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
            _ => {
                let mut got = idx.lookup(&h);
                got.sort_unstable();
                let want: Vec<u64> = model
                    .range((fp(&h), 0)..=(fp(&h), u64::MAX))
                    .map(|&(_, c)| c)
                    .collect();
                assert_eq!(got, want, "lookup {h:?}");
                assert_eq!(idx.contains(&h, cl), model.contains(&(fp(&h), cl)));
            }
        }
        assert_eq!(idx.len(), model.len() as u64);
    }
}

fn records(c: &mut Cursor<'_>) {
    let bits = 9 + u32::from(c.u8()) % (MAX_BITS - 8);
    let generation = c.u64();
    let rpc = records_per_cluster(bits);
    let mut recs = Vec::new();
    while !c.is_empty() && recs.len() < 1024 {
        let cl = u64::from(c.u16());
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&c.u32().to_be_bytes());
        h[31] = 1; // never the all-zero "no record"
        recs.push((cl, h));
    }
    let n = index_clusters_for(bits, recs.iter().map(|&(cl, _)| cl + 1).max().unwrap_or(0));
    let mut ics: Vec<IndexCluster> = (0..n)
        .map(|k| IndexCluster::empty(bits, generation, k))
        .collect();
    let mut last = std::collections::BTreeMap::new();
    for &(cl, h) in &recs {
        assert!(ics[(cl / rpc) as usize].set((cl % rpc) as usize, Some(&h)));
        last.insert(cl, h);
    }
    for (k, ic) in ics.iter().enumerate() {
        let enc = ic.encode(bits);
        let back = IndexCluster::decode(&enc, bits, generation, k as u64);
        assert_eq!(back.as_ref(), Ok(ic), "index cluster {k}");
    }
    for (cl, h) in &last {
        let ic = &ics[(cl / rpc) as usize];
        assert_eq!(ic.get((cl % rpc) as usize), Some(h), "record {cl}");
    }
}
