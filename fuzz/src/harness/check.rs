//! Target `check`: the consistency checker on an arbitrary image, then its repair (leaks or
//! all, on capped in-memory storage), then a check of the repaired image.
//!
//! Input: flags (1 byte: bits 0-1 repair none/leaks/all, bit 2 mark clean), then an image
//! container ([`super::image_bytes`]).

use super::{backing, image_bytes, Cursor, STORAGE_CAP};
use vhost_user_qcow2::qcow2::check::{check, CheckOptions, RepairMode};
use vhost_user_qcow2::storage::MemStorage;

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let mut img = image_bytes(&mut c);
    // The checker does not open backing files, but keep the inputs the same as `image`'s.
    backing::sanitize(&mut img);
    let storage = MemStorage::with_cap(img, STORAGE_CAP);
    let before = check(&storage, &CheckOptions::default());
    let repair = match flags & 3 {
        1 => RepairMode::Leaks,
        2 | 3 => RepairMode::All,
        _ => return,
    };
    if before.is_err() {
        return;
    }
    let opts = CheckOptions {
        repair: Some(repair),
        mark_clean: flags & 4 != 0,
        progress: None,
    };
    if check(&storage, &opts).is_ok() {
        let _ = check(&storage, &CheckOptions::default());
    }
}
