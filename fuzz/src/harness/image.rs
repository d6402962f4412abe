//! Target `image`: open an image (read-only or read-write, with the open options the input
//! picks) on capped in-memory storage, run up to [`MAX_OPS`] requests (reads, writes, discard,
//! write-zeroes, flush, background dedup steps), then close it.
//!
//! Input: flags (1 byte), [`MAX_OPS`] ops of 8 bytes, then an image container
//! ([`super::image_bytes`]). Op: kind, fill byte, length in sectors (u16, at most
//! [`MAX_SECTORS`]), offset in sectors (u32, modulo the disk's sectors + 8 so that most land
//! inside and a few past the end).

use super::{backing, image_bytes, Cursor, STORAGE_CAP};
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vhost_user_qcow2::block::BlockDevice;
use vhost_user_qcow2::qcow2::engine::OverlapMode;
use vhost_user_qcow2::qcow2::format::dedup::DedupMode;
use vhost_user_qcow2::qcow2::{OpenOptions, Qcow2};
use vhost_user_qcow2::storage::MemStorage;

pub const MAX_OPS: usize = 12;
pub const OP_BYTES: usize = 8;
/// Largest request: 1 MiB.
pub const MAX_SECTORS: u64 = 2048;
/// Bytes before the image container.
pub const PREFIX: usize = 1 + MAX_OPS * OP_BYTES;

/// The open options flags byte `f` selects.
pub fn options(f: u8) -> OpenOptions {
    OpenOptions {
        read_only: f & 1 != 0,
        lazy_refcounts: match (f >> 1) & 3 {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        },
        dedup_mode: match (f >> 3) & 3 {
            1 => Some(DedupMode::Off),
            2 => Some(DedupMode::Inline),
            3 => Some(DedupMode::Background),
            _ => None,
        },
        overlap_check: match (f >> 5) & 3 {
            0 => OverlapMode::All,
            1 => OverlapMode::Cached,
            2 => OverlapMode::Constant,
            _ => OverlapMode::None,
        },
        dedup_index_at_open: Some(f & 0x80 == 0),
        // Bounded like everything else here (the default is sized for real disks).
        dedup_cache_bytes: Some(4 << 20),
        ..Default::default()
    }
}

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let ops = c.take(MAX_OPS * OP_BYTES);
    let mut img = image_bytes(&mut c);
    backing::sanitize(&mut img);
    let storage = Arc::new(MemStorage::with_cap(img, STORAGE_CAP));
    let opts = options(flags);
    let Ok(q) = Qcow2::open_storage(storage, &opts, Some(backing::dir()), 0) else {
        return;
    };
    let sectors = q.capacity() / 512;
    let mut buf = Vec::new();
    let mut ops = Cursor::new(ops);
    while !ops.is_empty() {
        let kind = ops.u8();
        let fill = ops.u8();
        let n = u64::from(ops.u16()) % (MAX_SECTORS + 1);
        let off = u64::from(ops.u32()) % (sectors + 8) * 512;
        let len = n * 512;
        buf.clear();
        buf.resize(len as usize, fill);
        let _ = match kind % 9 {
            0 => q.read_vectored(off, &mut [IoSliceMut::new(&mut buf)]),
            1 => q.write_vectored(off, &[IoSlice::new(&buf)]),
            2 => q.discard(off, len),
            3 => q.write_zeroes(off, len, false),
            4 => q.write_zeroes(off, len, true),
            5 => q.flush(),
            6 => q
                .dedup_step()
                .map(|_| ())
                .map_err(vhost_user_qcow2::block::BlockError::from),
            7 => {
                // Three pieces of uneven (sector-multiple) sizes.
                let (a, rest) = buf.split_at_mut((len / 1024 * 512) as usize);
                let (b, d) = rest.split_at_mut(rest.len().min(512));
                q.read_vectored(
                    off,
                    &mut [IoSliceMut::new(a), IoSliceMut::new(b), IoSliceMut::new(d)],
                )
            }
            _ => {
                let (a, rest) = buf.split_at((len / 1024 * 512) as usize);
                let (b, d) = rest.split_at(rest.len().min(512));
                q.write_vectored(off, &[IoSlice::new(a), IoSlice::new(b), IoSlice::new(d)])
            }
        };
    }
    let _ = BlockDevice::close(&q);
}
