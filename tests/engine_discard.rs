//! Freed clusters go back to the file system in runs: a discard of a contiguous range punches
//! one hole, not one per cluster, and the range reads as zeros afterwards.

mod common;

use common::hooked::Hooked;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{MemStorage, Storage};

const CS: u64 = 65536;

#[test]
fn a_contiguous_discard_punches_one_hole() {
    let holes = Arc::new(Mutex::new(Vec::new()));
    let mut st = Hooked::new(MemStorage::new());
    let h = holes.clone();
    st.on_punch = Some(Box::new(move |off, len| {
        h.lock().unwrap_or_else(|e| e.into_inner()).push((off, len));
    }));
    let st = Arc::new(st);
    let o = CreateOptions {
        size: 64 << 20,
        ..Default::default()
    };
    create(st.as_ref(), &o).unwrap();
    let q = Qcow2::open_storage(st.clone(), &OpenOptions::default(), None, 0).unwrap();
    let n = 32u64;
    let data = vec![0x5au8; (n * CS) as usize];
    q.write_vectored(0, &[IoSlice::new(&data)]).unwrap();
    q.flush().unwrap();
    holes.lock().unwrap().clear();
    q.discard(0, n * CS).unwrap();
    q.flush().unwrap();
    let holes = holes.lock().unwrap().clone();
    assert_eq!(
        holes.len(),
        1,
        "one hole for one run of freed clusters: {holes:?}"
    );
    assert_eq!(holes[0].1, n * CS, "{holes:?}");
    let mut back = vec![1u8; (n * CS) as usize];
    q.read_vectored(0, &mut [IoSliceMut::new(&mut back)])
        .unwrap();
    assert!(back.iter().all(|&b| b == 0));
    // The freed space is reused: a new write lands there, not past the end of the file.
    let len = st.len().unwrap();
    q.write_vectored(CS * 100, &[IoSlice::new(&data[..CS as usize])])
        .unwrap();
    q.flush().unwrap();
    assert_eq!(st.len().unwrap(), len);
    q.close().unwrap();
}
