use super::persist::*;
use super::*;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

fn h(n: u64) -> [u8; 32] {
    hash_cluster(&n.to_le_bytes())
}

/// A hash with a chosen 32-bit fingerprint and distinct remaining bytes.
fn h_fp(fp: u32, n: u64) -> [u8; 32] {
    let mut x = [0u8; 32];
    x[0..4].copy_from_slice(&fp.to_be_bytes());
    x[4..12].copy_from_slice(&n.to_le_bytes());
    x
}

#[test]
fn insert_lookup_remove() {
    let mut idx = DedupIndex::new();
    assert!(idx.lookup(&h(1)).is_empty());
    assert_eq!(idx.insert(&h(1), 10), Ok(true));
    assert_eq!(idx.insert(&h(1), 10), Ok(false));
    assert_eq!(idx.insert(&h(2), 20), Ok(true));
    assert_eq!(idx.lookup(&h(1)), vec![10]);
    assert_eq!(idx.lookup(&h(2)), vec![20]);
    assert_eq!(idx.len(), 2);
    assert!(!idx.remove(&h(1), 11));
    assert!(idx.remove(&h(1), 10));
    assert!(idx.lookup(&h(1)).is_empty());
    assert_eq!(idx.lookup(&h(2)), vec![20]);
    assert_eq!(idx.len(), 1);
}

#[test]
fn cluster_cap() {
    let mut idx = DedupIndex::new();
    assert_eq!(idx.insert(&h(1), 0), Err(IndexError::ClusterTooLarge(0)));
    assert_eq!(
        idx.insert(&h(1), MAX_CLUSTER + 1),
        Err(IndexError::ClusterTooLarge(MAX_CLUSTER + 1))
    );
    assert_eq!(idx.insert(&h(1), MAX_CLUSTER), Ok(true));
    assert_eq!(idx.lookup(&h(1)), vec![MAX_CLUSTER]);
}

#[test]
fn tag_collisions_are_all_candidates() {
    // Same 32-bit fingerprint, different hashes: all are candidates (hints), removal is exact.
    let mut idx = DedupIndex::new();
    for n in 1..=50u64 {
        idx.insert(&h_fp(0xabcd_1234, n), n).unwrap();
    }
    // Neighbours in the same shard with nearby tags.
    for n in 1..=50u64 {
        idx.insert(&h_fp(0xabcd_1235, n), 1000 + n).unwrap();
        idx.insert(&h_fp(0xabcd_1233, n), 2000 + n).unwrap();
    }
    let mut c = idx.lookup(&h_fp(0xabcd_1234, 999));
    c.sort();
    assert_eq!(c, (1..=50).collect::<Vec<_>>());
    for n in (1..=50u64).step_by(2) {
        assert!(idx.remove(&h_fp(0xabcd_1234, 0), n));
    }
    let mut c = idx.lookup(&h_fp(0xabcd_1234, 0));
    c.sort();
    assert_eq!(c, (2..=50).step_by(2).collect::<Vec<_>>());
    assert_eq!(idx.lookup(&h_fp(0xabcd_1235, 0)).len(), 50);
    assert_eq!(idx.lookup(&h_fp(0xabcd_1233, 0)).len(), 50);
    assert_eq!(idx.remove_cluster_slow(1001), 1);
    assert_eq!(idx.lookup(&h_fp(0xabcd_1235, 0)).len(), 49);
}

#[test]
fn growth_keeps_everything() {
    let mut idx = DedupIndex::new();
    for n in 1..=100_000u64 {
        idx.insert(&h(n), n).unwrap();
    }
    assert_eq!(idx.len(), 100_000);
    for n in 1..=100_000u64 {
        assert!(idx.contains(&h(n), n), "{n}");
    }
    let load = idx.len() as f64 / idx.slots() as f64;
    assert!(load > 0.85 && load <= index::MAX_LOAD, "load {load}");
}

/// Random operations against a HashMap model, with few distinct fingerprints so that tags collide
/// and runs wrap around the ends of shards. The index only sees the 32-bit fingerprint, so the model
/// is keyed by it: hashes sharing a fingerprint are the same key (a hint, verified by the engine).
#[test]
fn random_ops_match_model() {
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut idx = DedupIndex::new();
        let mut model: HashMap<[u8; 4], HashSet<u64>> = HashMap::new();
        // Four shards; tags over the whole range, including the last home of a shard (wrap).
        let mut fps: Vec<u32> = (0..62).map(|_| rng.random::<u32>() & 0x003f_ffff).collect();
        fps.extend([0x000f_ffff, 0x000f_fffe]);
        let hashes: Vec<[u8; 32]> = (0..400)
            .map(|i| h_fp(fps[rng.random_range(0..fps.len())], i))
            .collect();
        let fp = |x: &[u8; 32]| [x[0], x[1], x[2], x[3]];
        for _ in 0..10_000 {
            let hh = hashes[rng.random_range(0..hashes.len())];
            let c = rng.random_range(1..300u64);
            match rng.random_range(0..10) {
                0..=5 => {
                    let new = model.entry(fp(&hh)).or_default().insert(c);
                    assert_eq!(idx.insert(&hh, c).unwrap(), new, "seed {seed}");
                }
                6..=8 => {
                    let had = model.get_mut(&fp(&hh)).is_some_and(|s| s.remove(&c));
                    assert_eq!(idx.remove(&hh, c), had, "seed {seed}");
                }
                _ => {
                    let mut cands = idx.lookup(&hh);
                    cands.sort();
                    let mut want: Vec<u64> =
                        model.get(&fp(&hh)).into_iter().flatten().copied().collect();
                    want.sort();
                    assert_eq!(cands, want, "seed {seed}");
                }
            }
        }
        let total: usize = model.values().map(|s| s.len()).sum();
        assert_eq!(idx.len(), total as u64);
        for (k, set) in &model {
            let mut x = [0u8; 32];
            x[..4].copy_from_slice(k);
            let mut cands = idx.lookup(&x);
            cands.sort();
            let mut want: Vec<u64> = set.iter().copied().collect();
            want.sort();
            assert_eq!(cands, want);
        }
    }
}

/// Random ops with distinct fingerprints: exact model equality, including len.
#[test]
fn random_ops_exact_model() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut idx = DedupIndex::new();
    let mut model: HashMap<u64, u64> = HashMap::new(); // key n -> cluster
    for _ in 0..200_000 {
        let n = rng.random_range(0..5_000u64);
        let c = rng.random_range(1..1_000_000u64);
        if rng.random_bool(0.6) {
            if let Some(old) = model.insert(n, c) {
                assert!(idx.remove(&h(n), old));
            }
            idx.insert(&h(n), c).unwrap();
        } else if let Some(old) = model.remove(&n) {
            assert!(idx.remove(&h(n), old));
        }
        assert_eq!(idx.len(), model.len() as u64);
    }
    for (n, c) in &model {
        assert_eq!(idx.lookup(&h(*n)), vec![*c]);
    }
}

#[test]
fn ram_per_entry_1m() {
    let n = 1_000_000u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let hashes: Vec<[u8; 32]> = (0..n)
        .map(|_| {
            let mut x = [0u8; 32];
            rng.fill_bytes(&mut x);
            x
        })
        .collect();
    let t = Instant::now();
    let mut idx = DedupIndex::new();
    for (i, x) in hashes.iter().enumerate() {
        idx.insert(x, i as u64 + 1).unwrap();
    }
    let insert_s = t.elapsed().as_secs_f64();
    let per = idx.ram_bytes() as f64 / n as f64;
    let load = idx.len() as f64 / idx.slots() as f64;
    let t = Instant::now();
    let mut fp = 0u64;
    for x in &hashes {
        fp += idx.lookup(x).len() as u64 - 1;
    }
    let lookup_s = t.elapsed().as_secs_f64();
    println!(
        "dedup index 1M entries (grown): {} bytes, {per:.3} B/entry, load {load:.3}, \
         insert {insert_s:.3}s, lookup {lookup_s:.3}s, extra candidates {fp}",
        idx.ram_bytes()
    );
    assert!(per <= 8.0, "{per} bytes per entry");
    let pre = DedupIndex::with_capacity(n);
    println!(
        "dedup index presized for 1M: {:.3} B/entry",
        pre.ram_bytes() as f64 / n as f64
    );
    assert!(pre.ram_bytes() as f64 / n as f64 <= 8.0);
    // Shrinking after many removals keeps every entry.
    for (i, x) in hashes.iter().enumerate().step_by(2) {
        assert!(idx.remove(x, i as u64 + 1));
    }
    idx.shrink_to_fit();
    assert!(idx.ram_bytes() as f64 / idx.len() as f64 <= 8.0);
    for (i, x) in hashes.iter().enumerate() {
        assert_eq!(idx.contains(x, i as u64 + 1), i % 2 == 1);
    }
}

#[test]
fn hash_throughput() {
    let buf = vec![0x5au8; 64 * 1024];
    let n = 512;
    let t = Instant::now();
    let mut acc = 0u8;
    for i in 0..n {
        let mut b = buf.clone();
        b[0] = i as u8;
        acc ^= hash_cluster(&b)[0];
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "sha256 64 KiB clusters: {:.0} MB/s on one core (xor {acc})",
        (n * buf.len()) as f64 / s / 1e6
    );
    let small = vec![0x5au8; 4096];
    let t = Instant::now();
    for _ in 0..8192 {
        acc ^= hash_cluster(&small)[1];
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "sha256 4 KiB clusters: {:.0} MB/s on one core (xor {acc})",
        (8192 * 4096) as f64 / s / 1e6
    );
    assert_eq!(
        hash_pieces([&buf[..100], &buf[100..]]),
        hash_cluster(&buf),
        "pieces hash like the whole"
    );
}

fn ext() -> DedupExtension {
    DedupExtension {
        mode: DedupMode::Inline,
        paused: true,
        cluster_bits: 16,
        share_cap: 32767,
        index_offset: 0x50000,
        index_clusters: 3,
        generation: 42,
        seal: 0xdead_beef_0123_4567,
        counters: DedupCounters {
            deduplicated: 1,
            written_unique: 2,
            zero_detected: 3,
            bytes_saved: 4,
            partial_reads: 5,
            cap_hits: 6,
            stale_rejected: 7,
            reserved: 0,
        },
    }
}

#[test]
fn extension_round_trip_and_errors() {
    let e = ext();
    let b = e.encode();
    assert_eq!(b.len(), EXT_LEN);
    assert_eq!(DedupExtension::decode(&b), Ok(e.clone()));
    // Padding after the data is fine.
    let mut p = b.clone();
    p.extend_from_slice(&[0; 8]);
    assert_eq!(DedupExtension::decode(&p), Ok(e.clone()));
    for m in [DedupMode::Off, DedupMode::Background] {
        let e2 = DedupExtension {
            mode: m,
            paused: false,
            ..e.clone()
        };
        assert_eq!(DedupExtension::decode(&e2.encode()), Ok(e2));
    }
    assert_eq!(
        DedupExtension::decode(&b[..100]),
        Err(PersistError::Truncated(100))
    );
    let mut c = b.clone();
    c[60] ^= 1;
    assert!(matches!(
        DedupExtension::decode(&c),
        Err(PersistError::BadChecksum { .. })
    ));
    let mut v = b.clone();
    v[3] = 2;
    assert_eq!(DedupExtension::decode(&v), Err(PersistError::BadVersion(2)));
    let unaligned = DedupExtension {
        index_offset: 0x50200,
        ..e.clone()
    };
    assert!(matches!(
        DedupExtension::decode(&unaligned.encode()),
        Err(PersistError::Invalid(_))
    ));
    let bad_mode = DedupExtension { ..e.clone() }.encode();
    let mut bm = bad_mode.clone();
    bm[7] = 3; // mode 3
    let crc = crc32c::crc32c(&bm[..124]);
    bm[124..].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        DedupExtension::decode(&bm),
        Err(PersistError::Invalid(_))
    ));
}

#[test]
fn seal_and_trust() {
    let s = SealInput {
        generation: 42,
        file_len: 1 << 30,
        size: 1 << 34,
        l1_table_offset: 0x30000,
        l1_size: 32,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        snapshots_offset: 0,
        nb_snapshots: 0,
    };
    let e = DedupExtension {
        seal: seal(&s),
        ..ext()
    };
    assert_eq!(trust(AUTOCLEAR_DEDUP, &e, &s), Trust::Load);
    assert!(matches!(trust(0, &e, &s), Trust::Rebuild(_)));
    for changed in [
        SealInput {
            file_len: s.file_len + 65536,
            ..s
        },
        SealInput {
            nb_snapshots: 1,
            ..s
        },
        SealInput {
            l1_table_offset: 0x40000,
            ..s
        },
        SealInput {
            refcount_table_clusters: 2,
            ..s
        },
        SealInput { size: 1, ..s },
        SealInput {
            generation: 43,
            ..s
        },
    ] {
        assert!(matches!(
            trust(AUTOCLEAR_DEDUP, &e, &changed),
            Trust::Rebuild(_)
        ));
    }
    let none = DedupExtension {
        index_offset: 0,
        index_clusters: 0,
        ..e
    };
    assert!(matches!(
        trust(AUTOCLEAR_DEDUP, &none, &s),
        Trust::Rebuild(_)
    ));
}

#[test]
fn index_cluster_round_trip_and_errors() {
    for bits in [9u32, 12, 16, 21] {
        let rpc = records_per_cluster(bits);
        let mut ic = IndexCluster::empty(bits, 5, 2);
        assert_eq!(ic.first, 2 * rpc);
        assert!(ic.set(0, Some(&h(1))));
        assert!(ic.set(rpc as usize - 1, Some(&h(2))));
        assert!(!ic.set(rpc as usize, Some(&h(3))));
        let b = ic.encode(bits);
        assert_eq!(b.len(), 1 << bits);
        let d = IndexCluster::decode(&b, bits, 5, 2).unwrap();
        assert_eq!(d, ic);
        assert_eq!(d.get(0), Some(&h(1)));
        assert_eq!(d.get(1), None);
        // Corrupt a record byte: checksum.
        let mut c = b.clone();
        c[INDEX_HEADER_LEN + 5] ^= 0x80;
        assert!(matches!(
            IndexCluster::decode(&c, bits, 5, 2),
            Err(PersistError::BadChecksum { .. })
        ));
        // Truncated.
        assert!(matches!(
            IndexCluster::decode(&b[..b.len() - 1], bits, 5, 2),
            Err(PersistError::Truncated(_))
        ));
        // Wrong generation, wrong position, bad magic.
        assert!(IndexCluster::decode(&b, bits, 6, 2).is_err());
        assert!(IndexCluster::decode(&b, bits, 5, 3).is_err());
        let mut m = b.clone();
        m[0] = 0;
        assert!(IndexCluster::decode(&m, bits, 5, 2).is_err());
        // Guest data that happens to sit where the index was: rejected.
        assert!(IndexCluster::decode(&vec![0u8; 1 << bits], bits, 5, 2).is_err());
    }
    assert_eq!(locate(16, 2047), (1, 0));
    assert_eq!(index_clusters_for(16, 2047), 1);
    assert_eq!(index_clusters_for(16, 2048), 2);
}

fn cluster_data(bits: u32, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; 1 << bits];
    v[..8].copy_from_slice(&(n / 2).to_le_bytes()); // pairs of equal content
    v
}

#[test]
fn rebuild_encode_load_round_trip() {
    let bits = 12;
    let host = 1000u64;
    let data: Vec<(u64, Vec<u8>)> = (3..host)
        .map(|c| {
            if c % 7 == 0 {
                (c, vec![0u8; 1 << bits])
            } else {
                (c, cluster_data(bits, c))
            }
        })
        .collect();
    let (idx, enc) = rebuild(data.iter().map(|(c, d)| (*c, &d[..])), bits, 9, host).unwrap();
    assert_eq!(enc.clusters.len() as u64, index_clusters_for(bits, host));
    let nonzero = data.iter().filter(|(_, d)| !is_zero(d)).count() as u64;
    assert_eq!(idx.len(), nonzero);
    for (c, d) in &data {
        let found = idx.lookup(&hash_cluster(d)).contains(c);
        assert_eq!(found, !is_zero(d), "cluster {c}");
    }
    let (loaded, rep) = load(enc.clusters.iter().map(|b| &b[..]), bits, 9, host);
    assert_eq!(rep.entries, nonzero);
    assert!(rep.bad_clusters.is_empty());
    for (c, d) in data.iter().filter(|(_, d)| !is_zero(d)) {
        assert!(loaded.contains(&hash_cluster(d), *c));
    }
    // One corrupt index cluster loses only its own hints.
    let mut bad = enc.clusters.clone();
    bad[1][100] ^= 1;
    let (partial, rep) = load(bad.iter().map(|b| &b[..]), bits, 9, host);
    assert_eq!(rep.bad_clusters, vec![1]);
    let rpc = records_per_cluster(bits);
    for (c, d) in data.iter().filter(|(_, d)| !is_zero(d)) {
        assert_eq!(partial.contains(&hash_cluster(d), *c), c / rpc != 1);
    }
    // A stale generation loads nothing.
    let (none, rep) = load(enc.clusters.iter().map(|b| &b[..]), bits, 10, host);
    assert!(none.is_empty());
    assert_eq!(rep.bad_clusters.len(), enc.clusters.len());
    // The streaming builder yields the same clusters in order, as they complete.
    let mut b = IndexBuilder::new(bits, 9, host, host);
    let mut got = Vec::new();
    let mut first_emit = None;
    for (c, d) in &data {
        let out = b.push(*c, d).unwrap();
        if first_emit.is_none() && !out.is_empty() {
            first_emit = Some(*c);
        }
        got.extend(out);
    }
    let (sidx, rest) = b.finish();
    got.extend(rest);
    assert_eq!(
        first_emit,
        Some(rpc),
        "cluster 0 is emitted when cluster rpc arrives"
    );
    assert_eq!(
        got.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        (0..enc.clusters.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        got.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        enc.clusters
    );
    assert_eq!(sidx.len(), nonzero);
    // Sparse input: index clusters with no data are still produced (empty).
    let one = cluster_data(bits, 5);
    let (_, sparse) = rebuild([(host - 1, &one[..])], bits, 9, host).unwrap();
    assert_eq!(sparse.clusters.len(), enc.clusters.len());
    let (l, rep) = load(sparse.clusters.iter().map(|b| &b[..]), bits, 9, 0);
    assert_eq!((l.len(), rep.entries), (1, 1));
    assert!(l.contains(&hash_cluster(&one), host - 1));
    // Input errors.
    let short = [0u8; 10];
    assert!(matches!(
        rebuild([(5u64, &short[..])], bits, 1, host),
        Err(DedupError::BadClusterLen { .. })
    ));
    let a = cluster_data(bits, 10);
    assert!(matches!(
        rebuild([(5u64, &a[..]), (5, &a[..])], bits, 1, host),
        Err(DedupError::OutOfOrder(5))
    ));
}

#[test]
fn open_time_1m_entries() {
    // 1M unique host clusters at 64 KiB: 489 index clusters (32 MiB). Time the decode + RAM
    // index build from buffers already in memory (the disk read is the engine's).
    let bits = 16;
    let n = 1_000_000u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let records = (1..=n).map(|c| {
        let mut x = [0u8; 32];
        rng.fill_bytes(&mut x);
        (c, x)
    });
    let count = index_clusters_for(bits, n + 1);
    let (enc, dropped) = encode_records(records, bits, 1, count);
    assert_eq!(dropped, 0);
    let t = Instant::now();
    let (idx, rep) = load(enc.clusters.iter().map(|b| &b[..]), bits, 1, n);
    let s = t.elapsed().as_secs_f64();
    assert_eq!(rep.entries, n);
    assert!(idx.ram_bytes() as f64 / n as f64 <= 8.0);
    println!(
        "dedup index load of 1M entries from {} index clusters ({} MiB): {:.3}s, \
         {:.3} B/entry",
        count,
        count * 64 / 1024,
        s,
        idx.ram_bytes() as f64 / n as f64
    );
}
