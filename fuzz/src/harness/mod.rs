//! The fuzz harnesses' bodies. Each target in `fuzz_targets/` is one call into here, and
//! `tests/fuzz_regressions.rs` includes this same module (by path) to replay minimized findings
//! under plain `cargo test`: one source for both, so a regression test runs exactly the code
//! path the fuzzer ran.
//!
//! Memory stays bounded whatever the input: images live on `MemStorage::with_cap` (an image may
//! point at clusters far past its end: growing there fails with an I/O error instead of
//! allocating), request sizes and counts are capped here.

#![allow(dead_code)]

pub mod check;
pub mod dedup;
pub mod image;
pub mod qmp;
pub mod virtio;

/// Most bytes an in-memory image may grow to.
pub const STORAGE_CAP: u64 = 64 << 20;
/// Most bytes an image is zero-extended to from its declared length: more than any seed needs
/// (all are under 1 MiB), and small enough that walking tables as long as the file stays fast
/// (the checker reads an L1 table of up to file length / 8 entries three times per input).
pub const MAX_DECLARED_LEN: u64 = 2 << 20;

/// Reads little-endian fields off the front of the input; past its end every field is zero.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }
    /// The next `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    fn le(&mut self, n: usize) -> u64 {
        self.take(n)
            .iter()
            .enumerate()
            .fold(0, |v, (i, b)| v | u64::from(*b) << (8 * i))
    }
    pub fn u8(&mut self) -> u8 {
        self.le(1) as u8
    }
    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }
    pub fn u24(&mut self) -> u32 {
        self.le(3) as u32
    }
    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }
    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }
}

/// An image container: a 3-byte declared length in 512-byte sectors, then the image bytes.
/// The image is zero-extended to the declared length (at most [`MAX_DECLARED_LEN`]), so seeds
/// can leave out their trailing zeros (`scripts/fuzz-seeds.sh` does).
pub fn image_bytes(c: &mut Cursor<'_>) -> Vec<u8> {
    let declared = (u64::from(c.u24()) * 512).min(MAX_DECLARED_LEN) as usize;
    let mut v = c.rest().to_vec();
    if v.len() < declared {
        v.resize(declared, 0);
    }
    v
}

/// Backing files an image may name: `base.qcow2` and `base.raw`, made once per process in a
/// folder of their own. Any other name (absolute paths, `..`, anything the fuzzer invents) is
/// removed from the header before the open, so an input can never open a file of the machine.
pub mod backing {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use vhost_user_qcow2::block::BlockDevice;
    use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
    use vhost_user_qcow2::storage::{FileStorage, Storage};

    pub const NAMES: [&str; 2] = ["base.qcow2", "base.raw"];
    /// Virtual size of both backing files.
    pub const SIZE: u64 = 1 << 20;

    fn make(dir: &Path) -> std::io::Result<()> {
        let pattern: Vec<u8> = (0..SIZE as u32).map(|i| (i / 512 * 7 + 1) as u8).collect();
        std::fs::write(dir.join("base.raw"), &pattern)?;
        let p = dir.join("base.qcow2");
        let f = std::fs::File::create(&p)?;
        let s = FileStorage::new(f);
        let o = CreateOptions {
            size: SIZE,
            cluster_bits: 12,
            ..Default::default()
        };
        create(&s, &o).map_err(std::io::Error::other)?;
        s.flush()?;
        drop(s);
        let img =
            Qcow2::open_with(&p, &OpenOptions::read_only(false)).map_err(std::io::Error::other)?;
        // Every other 64 KiB written, the rest left to read as zeros.
        for off in (0..SIZE).step_by(128 << 10) {
            let chunk = &pattern[off as usize..off as usize + (64 << 10)];
            img.write_vectored(off, &[std::io::IoSlice::new(chunk)])
                .map_err(std::io::Error::other)?;
        }
        img.close().map_err(std::io::Error::other)?;
        Ok(())
    }

    /// The folder holding the backing files: one per version of this code, made in a
    /// private folder and renamed into place, so parallel fuzzing processes share it safely.
    pub fn dir() -> &'static Path {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let tmp = std::env::temp_dir();
            let d = tmp.join("vhost-user-qcow2-fuzz-backing-v1");
            if !d.join("done").exists() {
                let t = tmp.join(format!(
                    "vhost-user-qcow2-fuzz-backing.{}",
                    std::process::id()
                ));
                let _ = std::fs::remove_dir_all(&t);
                std::fs::create_dir_all(&t).expect("backing folder");
                make(&t).expect("backing files");
                std::fs::write(t.join("done"), b"").expect("backing folder");
                if std::fs::rename(&t, &d).is_err() {
                    // Another process was first: its files are the same.
                    let _ = std::fs::remove_dir_all(&t);
                }
            }
            d
        })
    }

    /// Clears the backing file fields (header bytes 8..20) of `img` unless they name one of
    /// [`NAMES`].
    pub fn sanitize(img: &mut [u8]) {
        if img.len() < 20 {
            return;
        }
        let off = u64::from_be_bytes(img[8..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(img[16..20].try_into().unwrap_or_default()) as u64;
        if off == 0 && len == 0 {
            return;
        }
        let name = usize::try_from(off)
            .ok()
            .and_then(|o| img.get(o..o.checked_add(len as usize)?));
        let ok = name.is_some_and(|n| NAMES.iter().any(|k| k.as_bytes() == n));
        if !ok {
            img[8..20].fill(0);
        }
    }
}
