//! Backing files: a raw file or another qcow2 image, opened read-only.

use super::image::{OpenOptions, Qcow2};
use crate::block::BlockDevice;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::storage::{FileStorage, Storage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest backing chain we follow (QEMU allows deep chains; a loop must end somewhere).
pub(crate) const MAX_CHAIN: u32 = 64;

/// Where a backing file name points, relative names taken from the image's folder.
pub fn resolve(name: &str, image_dir: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    match image_dir {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open a backing file read-only; `format` from the header extension, else probed.
/// `direct`: with O_DIRECT, as the image itself.
pub(crate) fn open(
    path: &Path,
    format: Option<&str>,
    depth: u32,
    direct: bool,
) -> Result<Arc<dyn BlockDevice>> {
    let wrap = |e: Qcow2Error| Qcow2Error::Backing {
        path: path.display().to_string(),
        source: Box::new(e),
    };
    if depth >= MAX_CHAIN {
        return Err(wrap(Qcow2Error::Unsupported(format!(
            "backing chain longer than {MAX_CHAIN} (or a loop)"
        ))));
    }
    let storage = if direct {
        FileStorage::open_direct(path, false).map_err(|e| wrap(e.into()))?
    } else {
        FileStorage::new(std::fs::File::open(path).map_err(|e| wrap(e.into()))?)
    };
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
            &OpenOptions {
                direct,
                ..OpenOptions::read_only(true)
            },
            dir.as_deref(),
            depth + 1,
        )
        .map_err(wrap)?;
        Ok(Arc::new(img))
    } else {
        let raw = crate::raw::RawDisk::new(storage, true).map_err(|e| wrap(e.into()))?;
        Ok(Arc::new(raw))
    }
}
