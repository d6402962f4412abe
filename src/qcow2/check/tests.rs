//! Unit tests of the checker on hand-built images in memory.

use super::*;
use crate::qcow2::format::header::{Header, OUR_HEADER_LEN};
use crate::qcow2::format::{encode_table, refblock};
use crate::storage::MemStorage;

const CB: u32 = 16;
const CS: u64 = 1 << CB;

/// A minimal valid image: header, refcount table (cluster 1), refcount block (2), L1 (3).
fn base_image() -> MemStorage {
    let h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: CB,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 2,
        l1_table_offset: 3 * CS,
        refcount_table_offset: CS,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: OUR_HEADER_LEN,
        compression_type: 0,
        extensions: vec![],
        backing_file: None,
    };
    let mut img = vec![0u8; 4 * CS as usize];
    img[..CS as usize].copy_from_slice(&h.encode().unwrap());
    let rt = encode_table(&[2 * CS]);
    img[CS as usize..CS as usize + 8].copy_from_slice(&rt);
    let rb = &mut img[2 * CS as usize..3 * CS as usize];
    for c in 0..4 {
        refblock::set(rb, c, 4, 1);
    }
    MemStorage::from_vec(img)
}

/// Add an L2 table at cluster 4 with one data cluster at 5 (refcounts set).
fn with_data(st: &MemStorage) {
    st.write_at(&((4 * CS) | (1 << 63)).to_be_bytes(), 3 * CS)
        .unwrap();
    st.write_at(&((5 * CS) | (1 << 63)).to_be_bytes(), 4 * CS)
        .unwrap();
    st.write_at(&[0xab; CS as usize], 5 * CS).unwrap();
    set_ref(st, 4, 1);
    set_ref(st, 5, 1);
}

fn set_ref(st: &MemStorage, cluster: u64, v: u64) {
    let mut b = vec![0u8; CS as usize];
    st.read_at(&mut b, 2 * CS).unwrap();
    refblock::set(&mut b, cluster as usize, 4, v);
    st.write_at(&b, 2 * CS).unwrap();
}

fn run(st: &MemStorage, repair: Option<RepairMode>) -> CheckReport {
    check(
        st,
        &CheckOptions {
            repair,
            mark_clean: true,
            progress: None,
        },
    )
    .unwrap()
}

#[test]
fn clean_images() {
    let st = base_image();
    let r = run(&st, None);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.image_end_offset, 4 * CS);
    with_data(&st);
    let r = run(&st, None);
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.allocated_clusters, 1);
    assert_eq!(r.total_clusters, (1 << 30) / CS);
}

#[test]
fn leak_then_repair() {
    let st = base_image();
    with_data(&st);
    // A refcount past the end of the file is not looked at (as in QEMU)...
    set_ref(&st, 7, 1);
    assert!(run(&st, None).is_clean());
    // ...but inside the file it is a leak.
    st.write_at(&[0u8; CS as usize], 7 * CS).unwrap();
    let r = run(&st, None);
    assert_eq!((r.leaks, r.corruptions, r.exit_code()), (1, 0, 3), "{r:?}");
    assert!(r
        .messages
        .iter()
        .any(|m| m == "Leaked cluster 7 refcount=1 reference=0"));
    let r = run(&st, Some(RepairMode::Leaks));
    assert_eq!((r.leaks, r.leaks_fixed, r.exit_code()), (0, 1, 0), "{r:?}");
    assert!(run(&st, None).is_clean());
}

#[test]
fn missing_refcount_needs_rebuild() {
    let st = base_image();
    with_data(&st);
    set_ref(&st, 5, 0);
    let r = run(&st, None);
    assert_eq!(r.exit_code(), 2, "{r:?}");
    // The COPIED flag of the entry disagrees with refcount 0 as well.
    assert_eq!(r.corruptions, 2, "{r:?}");
    assert!(r
        .messages
        .iter()
        .any(|m| m == "ERROR cluster 5 refcount=0 reference=1"));
    // "leaks" cannot rebuild.
    let r = run(&st, Some(RepairMode::Leaks));
    assert_eq!(r.exit_code(), 1, "{r:?}");
    let r = run(&st, Some(RepairMode::All));
    assert!(r.is_clean(), "{r:?}");
    assert!(r.rebuilt);
    let mut b = vec![0u8; CS as usize];
    st.read_at(&mut b, 5 * CS).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    assert!(run(&st, None).is_clean());
}

#[test]
fn copied_flag_is_fixed() {
    let st = base_image();
    with_data(&st);
    st.write_at(&(5 * CS).to_be_bytes(), 4 * CS).unwrap();
    let r = run(&st, None);
    assert_eq!(r.corruptions, 1, "{r:?}");
    assert!(r.messages[0].starts_with("ERROR OFLAG_COPIED data cluster: l2_entry=50000 refcount=1"));
    let r = run(&st, Some(RepairMode::All));
    assert!(r.is_clean() && r.corruptions_fixed == 1, "{r:?}");
}

#[test]
fn dangling_entry_becomes_zero() {
    let st = base_image();
    with_data(&st);
    st.write_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), 4 * CS + 8)
        .unwrap();
    let r = run(&st, None);
    assert_eq!(r.exit_code(), 2, "{r:?}");
    let r = run(&st, Some(RepairMode::All));
    assert!(r.is_clean(), "{r:?}");
    let mut b = [0u8; 8];
    st.read_at(&mut b, 4 * CS + 8).unwrap();
    assert_eq!(u64::from_be_bytes(b), 1);
}

#[test]
fn dirty_bit_cleared_after_repair() {
    let st = base_image();
    with_data(&st);
    st.write_at(&1u64.to_be_bytes(), 72).unwrap();
    set_ref(&st, 5, 0);
    let r = run(&st, Some(RepairMode::All));
    assert!(r.is_clean(), "{r:?}");
    let mut b = [0u8; 8];
    st.read_at(&mut b, 72).unwrap();
    assert_eq!(u64::from_be_bytes(b), 0);
}

#[test]
fn malformed_headers_are_errors() {
    // Huge L1.
    let st = base_image();
    st.write_at(&0x4000_0000u32.to_be_bytes(), 36).unwrap();
    assert!(matches!(run_err(&st), CheckError::Invalid(_)));
    // Huge refcount table.
    let st = base_image();
    st.write_at(&0xffff_ffffu32.to_be_bytes(), 56).unwrap();
    assert!(matches!(run_err(&st), CheckError::Invalid(_)));
    // Truncated.
    let st = MemStorage::from_vec(base_image().snapshot()[..50].to_vec());
    assert!(matches!(run_err(&st), CheckError::Format(_)));
    // Empty.
    assert!(check(&MemStorage::new(), &CheckOptions::default()).is_err());
}

fn run_err(st: &MemStorage) -> CheckError {
    check(st, &CheckOptions::default()).unwrap_err()
}

#[test]
fn hostile_tables_do_not_panic() {
    // Refcount table far past EOF; L1 pointing at itself; L2 pointing at the header.
    let st = base_image();
    st.write_at(&(1u64 << 50).to_be_bytes(), 48).unwrap();
    let r = run(&st, None);
    assert!(r.exit_code() >= 1, "{r:?}");
    let st = base_image();
    st.write_at(&(3 * CS).to_be_bytes(), 3 * CS).unwrap();
    let r = run(&st, None);
    assert_eq!(r.exit_code(), 2, "{r:?}");
    // Repair may raise the refcount (QEMU does the same); it must not panic.
    let _ = run(&st, Some(RepairMode::All));
    let st = base_image();
    st.write_at(&0x200u64.to_be_bytes(), 3 * CS).unwrap();
    let r = run(&st, None);
    assert_eq!(r.exit_code(), 2, "{r:?}");
    // Every byte of the header region garbage after the magic.
    let mut img = base_image().snapshot();
    for (i, b) in img[104..CS as usize].iter_mut().enumerate() {
        *b = (i * 37 % 251) as u8;
    }
    let _ = check(&MemStorage::from_vec(img), &CheckOptions::default());
}

#[test]
fn repair_never_writes_into_other_metadata() {
    // The L1 entry points at the refcount block as if it were an L2 table; an "entry" there
    // looks like a data cluster past the end of the file. The entry fix (which runs while the
    // block is still the refcount block) must not touch it.
    let st = base_image();
    with_data(&st);
    st.write_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), 2 * CS + 64)
        .unwrap();
    st.write_at(&((2 * CS) | (1 << 63)).to_be_bytes(), 3 * CS + 8)
        .unwrap();
    let r = run(&st, None);
    assert_eq!(r.exit_code(), 2, "{r:?}");
    let r = run(&st, Some(RepairMode::All));
    assert!(
        r.messages
            .iter()
            .any(|m| m.starts_with("Not repairing L2 entry")),
        "{r:?}"
    );
    // After the rebuild cluster 2 is only a (garbage) L2 table; nothing panics either way.
    let _ = run(&st, Some(RepairMode::All));
}

/// An L1 entry that points at a data cluster must not make repair write into guest data, even
/// where that data, read as an L2 table, looks like entries to fix.
#[test]
fn repair_never_writes_into_guest_data_an_l1_entry_points_at() {
    let st = base_image();
    with_data(&st);
    // Guest data: words that read as "normal cluster past the end of the file", with COPIED
    // wrong, and one with reserved bits (as random data has).
    let mut data = vec![0u8; CS as usize];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        let v = if i == 7 {
            0x00ff_0000_0000_0101u64
        } else {
            (1u64 << 40) + ((i as u64) << 16)
        };
        w.copy_from_slice(&v.to_be_bytes());
    }
    st.write_at(&data, 5 * CS).unwrap();
    // The second L1 entry points at the data cluster.
    st.write_at(&((5 * CS) | (1 << 63)).to_be_bytes(), 3 * CS + 8)
        .unwrap();
    let _ = run(&st, Some(RepairMode::All));
    let mut after = vec![0u8; CS as usize];
    st.read_at(&mut after, 5 * CS).unwrap();
    assert!(after == data, "repair wrote into guest data");
}

/// Many L1 entries pointing at one L2 table full of bad entries: the fixes are recorded once.
#[test]
fn fixes_of_a_table_reached_many_times_are_recorded_once() {
    let st = base_image();
    with_data(&st);
    for i in 1..CS / 8 {
        st.write_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), 4 * CS + 8 * i)
            .unwrap();
    }
    // Grow the L1 to 2 entries both pointing at the table (l1_size is 2 in the header).
    st.write_at(&((4 * CS) | (1 << 63)).to_be_bytes(), 3 * CS + 8)
        .unwrap();
    let img = image::Image::load(&st).unwrap();
    let (f, _) = analyze(&st, &img, None).unwrap();
    assert_eq!(f.fixes.len() as u64, CS / 8 - 1);
}

/// Point the first `n` entries of the L1 table at the L2 table in cluster 4 (the header's
/// l1_size becomes `n`).
fn l1_all_at_table_4(st: &MemStorage, n: u64) {
    st.write_at(&(n as u32).to_be_bytes(), 36).unwrap();
    let l1: Vec<u64> = (0..n).map(|_| (4 * CS) | (1 << 63)).collect();
    st.write_at(&encode_table(&l1), 3 * CS).unwrap();
}

/// Make the image use 1-bit refcounts (clusters 0 to 5 in use).
fn one_bit_refcounts(st: &MemStorage) {
    st.write_at(&0u32.to_be_bytes(), 96).unwrap();
    let mut rb = vec![0u8; CS as usize];
    for c in 0..6 {
        refblock::set(&mut rb, c, 0, 1);
    }
    st.write_at(&rb, 2 * CS).unwrap();
}

/// A table reached from many L1 entries counts one reference per entry, as QEMU's check does
/// (the walk reads it once and counts the rest in bulk).
#[test]
fn a_table_reached_many_times_counts_every_reference() {
    let st = base_image();
    with_data(&st);
    l1_all_at_table_4(&st, 1000);
    let r = run(&st, None);
    assert_eq!(
        r.messages,
        [
            "ERROR cluster 4 refcount=1 reference=1000",
            "ERROR cluster 5 refcount=1 reference=1000"
        ],
        "{r:?}"
    );
    assert_eq!((r.corruptions, r.allocated_clusters), (2, 1000), "{r:?}");
    // A data entry without COPIED (refcount 1): one error per visit of the table.
    st.write_at(&(5 * CS).to_be_bytes(), 4 * CS).unwrap();
    let r = run(&st, None);
    assert_eq!(r.corruptions, 1002, "{r:?}");
    let copied = "ERROR OFLAG_COPIED data cluster: l2_entry=50000 refcount=1";
    assert_eq!(r.messages.iter().filter(|m| *m == copied).count(), 1000);
}

/// Overflows of a table reached many times come one per reference, in visit order.
#[test]
fn overflows_of_a_table_reached_many_times_are_each_reported() {
    let st = base_image();
    with_data(&st);
    one_bit_refcounts(&st);
    l1_all_at_table_4(&st, 3);
    let r = run(&st, None);
    let (o4, o5) = (
        "ERROR: overflow cluster offset=0x40000",
        "ERROR: overflow cluster offset=0x50000",
    );
    assert_eq!(r.messages, [o4, o5, o4, o5], "{r:?}");
    assert_eq!(r.corruptions, 4, "{r:?}");
}

/// Past the message limit the overflows are still counted, each one.
#[test]
fn overflows_past_the_message_limit_are_counted() {
    let st = base_image();
    with_data(&st);
    one_bit_refcounts(&st);
    // A second data cluster in the table (the L1 table's own cluster): three clusters
    // overflow on every further visit.
    st.write_at(&((3 * CS) | (1 << 63)).to_be_bytes(), 4 * CS + 8)
        .unwrap();
    let n = CS / 8;
    l1_all_at_table_4(&st, n);
    let r = run(&st, None);
    // Cluster 3 (the L1 table) is counted once before: it overflows on the first visit too.
    let over = 3 * n - 2;
    assert_eq!(r.corruptions, over, "{r:?}");
    let more = r.messages.last().unwrap();
    let listed = r.messages.len() as u64 - 1;
    assert_eq!(more, &format!("... and {} more messages", over - listed));
    let pattern = [
        "ERROR: overflow cluster offset=0x30000",
        "ERROR: overflow cluster offset=0x40000",
        "ERROR: overflow cluster offset=0x50000",
    ];
    for (i, m) in r.messages[..listed as usize].iter().enumerate() {
        assert_eq!(m, pattern[i % 3], "message {i}");
    }
}

#[test]
fn nonzero_entries_skips_zero_runs_and_keeps_indexes() {
    let mut t = vec![0u64; 300];
    for i in [0usize, 63, 64, 200, 299] {
        t[i] = i as u64 + 1;
    }
    let got: Vec<(usize, u64)> = walk::nonzero_entries(&t).collect();
    assert_eq!(
        got,
        vec![(0, 1), (63, 64), (64, 65), (200, 201), (299, 300)]
    );
    assert_eq!(walk::nonzero_entries(&[]).count(), 0);
}
