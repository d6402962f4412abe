//! Freed clusters go back to the file system in runs: a discard of a contiguous range punches
//! one hole, not one per cluster, and the range reads as zeros afterwards.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex};
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::{MemStorage, Storage};

const CS: u64 = 65536;

/// Memory storage that records every hole punched.
struct Punches {
    inner: MemStorage,
    holes: Mutex<Vec<(u64, u64)>>,
}

impl Storage for Punches {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.holes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((offset, len));
        self.inner.punch_hole(offset, len)
    }
}

#[test]
fn a_contiguous_discard_punches_one_hole() {
    let st = Arc::new(Punches {
        inner: MemStorage::new(),
        holes: Mutex::new(Vec::new()),
    });
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
    st.holes.lock().unwrap().clear();
    q.discard(0, n * CS).unwrap();
    q.flush().unwrap();
    let holes = st.holes.lock().unwrap().clone();
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
