//! Refcount blocks read without the metadata lock however many a request needs: a flush's
//! frees over many blocks, the first allocation after opening a full image.
use super::*;

/// The host offset of guest offset `off` in a 512-byte-cluster image (64 entries per table).
fn host_of(img: &[u8], off: u64) -> u64 {
    let be = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    let gc = off >> 9;
    let l2 = be(be(40) + (gc / 64) * 8) & 0x00ff_ffff_ffff_fe00;
    be(l2 + (gc % 64) * 8) & 0x00ff_ffff_ffff_fe00
}

/// A 16 MiB image of 512-byte clusters with its first 10 MiB written `bs` bytes at a time,
/// each 64 KiB holding the byte (its offset >> 16) | 1; its bytes after a close.
fn filled_image(bs: usize) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let o = CreateOptions {
        size: 16 << 20,
        cluster_bits: 9,
        ..Default::default()
    };
    create(&*mem, &o).unwrap();
    let q = Qcow2::open_storage(mem.clone(), &OpenOptions::default(), None, 0).unwrap();
    for off in (0..10u64 << 20).step_by(bs) {
        q.write_vectored(off, &[IoSlice::new(&vec![(off >> 16) as u8 | 1; bs])])
            .unwrap();
    }
    q.close().unwrap();
    mem.snapshot()
}

/// The image `img` opened with the reads of its refcount block `block` gated (open at
/// first), and the table of guest offset 0 cached (the timed read of `read_while_gated`).
fn open_with_block_gated(img: Vec<u8>, block: u64) -> (Arc<Qcow2>, Gate, Arc<dyn Storage>) {
    let be = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    let at = be(be(48) + block * 8);
    assert_ne!(at, 0, "refcount block {block} exists");
    let (storage, gate) = Gate::storage(img, at, true);
    let q =
        Arc::new(Qcow2::open_storage(storage.clone(), &OpenOptions::default(), None, 0).unwrap());
    let mut buf = [0u8; 4096];
    q.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
        .unwrap();
    (q, gate, storage)
}

/// Close `q` (its last reference) and check the image in `storage`: no error, no leak.
fn close_clean(q: Arc<Qcow2>, storage: &dyn Storage) {
    use vhost_user_qcow2::qcow2::check::{check, CheckOptions};
    q.close().unwrap();
    drop(q);
    let r = check(storage, &CheckOptions::default()).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

/// 512-byte clusters: a refcount block counts 256 clusters (128 KiB of the file). One cluster
/// is discarded in each 128 KiB of 10 MiB of data, so the flush's frees need about 80 blocks,
/// more than one round of reads takes (64). The block read last is gated: a read on another
/// thread goes on while the flush waits for it.
#[test]
fn a_flush_reads_every_refcount_block_of_many_frees_without_the_metadata_lock() {
    let img = filled_image(65536);
    let spots: Vec<u64> = (1..80u64).map(|k| k << 17).collect();
    let blocks: std::collections::BTreeSet<u64> = spots
        .iter()
        .map(|&g| (host_of(&img, g) >> 9) / 256)
        .collect();
    assert!(blocks.len() > 64, "the frees touch {} blocks", blocks.len());
    let last = *blocks.iter().next_back().unwrap();
    let (q, gate, storage) = open_with_block_gated(img, last);
    for &g in &spots {
        q.discard(g, 512).unwrap();
    }
    let (took, first, r) = read_while_gated(&q, &gate, 0, |q| q.flush_all());
    r.unwrap();
    assert_eq!(first, 1);
    assert_eq!(gate.held(), 1, "the flush read the last block");
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for a flush's refcount-block reads"
    );
    // Every discarded cluster is free again and reads as zeros; the rest is intact.
    for &g in &spots {
        let mut b = [1u8; 512];
        q.read_vectored(g, &mut [IoSliceMut::new(&mut b)]).unwrap();
        assert!(b.iter().all(|&x| x == 0), "discarded {g}");
    }
    close_clean(q, &*storage);
}

/// After an open the allocator's search starts at cluster 0: the first allocation in a full
/// image goes through every refcount block up to the first free cluster. 512-byte clusters,
/// 10 MiB written 4 KiB at a time (about 80 full blocks), reopened with a block in the middle
/// gated: a read on another thread goes on while the allocating write waits for it.
#[test]
fn the_first_allocation_after_open_reads_full_blocks_without_the_metadata_lock() {
    // 4 KiB at a time: runs of 8 clusters leave no free gap a later write could use.
    let img = filled_image(4096);
    let (q, gate, storage) = open_with_block_gated(img, 40);
    let new = 12 << 20;
    let (took, first, r) = read_while_gated(&q, &gate, 0, move |q| {
        q.write_vectored(new, &[IoSlice::new(&[7u8; 4096])])
    });
    r.unwrap();
    assert_eq!(first, 1);
    assert_eq!(
        gate.held(),
        1,
        "the allocation went through the middle block"
    );
    assert!(
        took < Duration::from_secs(2),
        "a read waited {took:?} for the allocator's refcount-block reads"
    );
    assert_reads(&q, &[(new, 7), (5 << 20, 81)], "after the write");
    close_clean(q, &*storage);
}
