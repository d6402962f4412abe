//! What a crash test checks in each image a crash left: `qemu-img check` accepts it (exit 0 or
//! 3, leaks only), after a repair when it is DIRTY (and then only refcounts may have been
//! behind), and the guest's view of it for the data checks.

use std::io::IoSliceMut;
use std::path::Path;
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};
use vhost_user_qcow2::storage::MemStorage;

/// Check the crashed image `bytes` (written to `path` for qemu-img) as described above.
/// Returns whether it was DIRTY and the guest's view of it (after the repair).
pub fn check_crashed(path: &Path, bytes: Vec<u8>, what: &str) -> (bool, Vec<u8>) {
    std::fs::write(path, &bytes).unwrap();
    let p = path.to_str().unwrap();
    let dirty = bytes[79] & 1 != 0;
    let bytes = if dirty {
        // Inside a DIRTY window only refcounts (and COPIED with them) may be behind: a repair
        // must not have to invent anything else (it would, for instance, zero the entries of
        // an L1 entry's table that never reached the disk).
        let (_, out) = super::qemu_img(&["check", p]);
        super::assert_only_refcount_errors(&out, what);
        let (code, out) = super::qemu_img(&["check", "-r", "all", p]);
        assert_eq!(code, 0, "{what}: repair:\n{out}");
        std::fs::read(path).unwrap()
    } else {
        bytes
    };
    let (code, out) = super::qemu_img(&["check", p]);
    assert!(
        code == 0 || code == 3,
        "{what} (dirty {dirty}): qemu-img check exit {code}\n{out}"
    );
    (dirty, read_all(bytes))
}

/// The guest's view of a whole image.
pub fn read_all(bytes: Vec<u8>) -> Vec<u8> {
    let size = u64::from_be_bytes(bytes[24..32].try_into().unwrap());
    let q = Qcow2::open_storage(
        Arc::new(MemStorage::from_vec(bytes)),
        &OpenOptions::read_only(true),
        None,
        0,
    )
    .unwrap_or_else(|e| panic!("reopen: {e}"));
    let mut disk = vec![0u8; size as usize];
    q.read_vectored(0, &mut [IoSliceMut::new(&mut disk)])
        .unwrap();
    disk
}
