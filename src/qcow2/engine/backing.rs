//! Backing files: a raw file or another qcow2 image, opened read-only.

use super::Qcow2;
use crate::block::{check_range, BlockDevice, BlockError};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::storage::{FileStorage, Storage};
use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest backing chain we follow (QEMU allows deep chains; a loop must end somewhere).
pub(crate) const MAX_CHAIN: u32 = 64;

/// A raw backing file.
pub(crate) struct RawBacking {
    storage: FileStorage,
    size: u64,
}

impl BlockDevice for RawBacking {
    fn capacity(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_vectored(
        &self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> std::result::Result<(), BlockError> {
        let len = super::iov::len_mut(bufs);
        check_range(offset, len, self.size)?;
        Ok(self.storage.readv_at(bufs, offset)?)
    }
    fn write_vectored(&self, _: u64, _: &[IoSlice<'_>]) -> std::result::Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> std::result::Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::result::Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::result::Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
}

/// Where a backing file name points, relative names taken from the image's folder.
pub fn resolve(name: &str, image_dir: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    match image_dir {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open a backing file read-only; `format` from the header extension, else probed.
pub(crate) fn open(path: &Path, format: Option<&str>, depth: u32) -> Result<Arc<dyn BlockDevice>> {
    let wrap = |e: Qcow2Error| Qcow2Error::Backing {
        path: path.display().to_string(),
        source: Box::new(e),
    };
    if depth >= MAX_CHAIN {
        return Err(wrap(Qcow2Error::Unsupported(format!(
            "backing chain longer than {MAX_CHAIN} (or a loop)"
        ))));
    }
    let file = std::fs::File::open(path).map_err(|e| wrap(e.into()))?;
    let storage = FileStorage::new(file);
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0).map_err(|e| wrap(e.into()))?;
    let is_qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(f) => {
            return Err(wrap(Qcow2Error::Unsupported(format!(
                "backing format {f:?}"
            ))))
        }
        None => magic == [b'Q', b'F', b'I', 0xfb],
    };
    if is_qcow2 {
        let dir = path.parent().map(Path::to_path_buf);
        let img = Qcow2::open_storage(
            Arc::new(storage),
            &super::OpenOptions::read_only(true),
            dir.as_deref(),
            depth + 1,
        )
        .map_err(wrap)?;
        Ok(Arc::new(img))
    } else {
        let size = storage.len().map_err(|e| wrap(e.into()))?;
        Ok(Arc::new(RawBacking { storage, size }))
    }
}
