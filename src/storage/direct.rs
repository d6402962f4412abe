//! O_DIRECT support for `FileStorage`: the alignment probe and the bounce buffers for I/O
//! whose buffers, length or offset are not aligned.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Largest alignment accepted from the probe (QEMU's file-posix stops at the same place).
const MAX_ALIGN: u64 = 4096;

/// The alignment O_DIRECT I/O on `file` needs: what the kernel reports (statx with
/// STATX_DIOALIGN), else the smallest of 512..4096 that a test read accepts.
pub(super) fn probe_alignment(file: &File) -> io::Result<u64> {
    if let Some(a) = statx_alignment(file) {
        return Ok(a);
    }
    let mut raw = vec![0u8; 3 * MAX_ALIGN as usize];
    let base = raw.as_ptr().align_offset(MAX_ALIGN as usize);
    let mut a = 512;
    while a <= MAX_ALIGN {
        // An offset and a buffer aligned to `a` and no more (offset a and buffer base+a are
        // multiples of a but not of 2a when a < MAX_ALIGN).
        let start = base + a as usize;
        let buf = &mut raw[start..start + a as usize];
        match file.read_at(buf, a) {
            Ok(_) => return Ok(a),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => a *= 2,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "O_DIRECT reads fail at every alignment up to 4096 bytes",
    ))
}

fn statx_alignment(file: &File) -> Option<u64> {
    // SAFETY: statx only writes into `stx`, a plain struct we own, and reads the empty path
    // (a NUL-terminated literal) with AT_EMPTY_PATH on our own descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let a = u64::from(stx.stx_dio_mem_align.max(stx.stx_dio_offset_align));
    (a.is_power_of_two() && a <= MAX_ALIGN).then_some(a.max(512))
}

/// An aligned scratch buffer of `len` bytes (a multiple of `align`).
struct Bounce {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Bounce {
    fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let start = raw.as_ptr().align_offset(align);
        Bounce { raw, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The aligned range covering `offset..offset+len`.
fn cover(offset: u64, len: u64, a: u64) -> (u64, u64) {
    let lo = offset / a * a;
    let hi = (offset + len).div_ceil(a) * a;
    (lo, hi)
}

/// An O_DIRECT file with its alignment, and the lock its read-modify-write cycles take.
pub(super) struct DirectFile<'a> {
    pub file: &'a File,
    pub align: u64,
    pub rmw: &'a std::sync::Mutex<()>,
}

/// Read the aligned range at `offset` into the aligned `buf`; past the end of the file reads
/// as zeros.
fn read_aligned(s: &DirectFile<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match s.file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                // A short O_DIRECT read ends at the end of the file; the next one would start
                // unaligned.
                if !(done as u64).is_multiple_of(s.align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn total(lens: impl Iterator<Item = usize>) -> u64 {
    lens.map(|l| l as u64).sum()
}

/// `readv_at` through a bounce buffer.
pub(super) fn bounce_read(
    s: &DirectFile<'_>,
    bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> io::Result<()> {
    let a = s.align;
    let len = total(bufs.iter().map(|b| b.len()));
    let (lo, hi) = cover(offset, len, a);
    let mut b = Bounce::new(
        usize::try_from(hi - lo).map_err(io::Error::other)?,
        a as usize,
    );
    read_aligned(s, b.buf(), lo)?;
    let mut pos = (offset - lo) as usize;
    let data = b.buf();
    for dst in bufs.iter_mut() {
        let n = dst.len();
        dst.copy_from_slice(&data[pos..pos + n]);
        pos += n;
    }
    Ok(())
}

/// `writev_at` through a bounce buffer: the partly covered first and last blocks are read
/// first (under the storage's read-modify-write lock).
pub(super) fn bounce_write(
    s: &DirectFile<'_>,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    let a = s.align;
    let len = total(bufs.iter().map(|b| b.len()));
    if len == 0 {
        return Ok(());
    }
    let (lo, hi) = cover(offset, len, a);
    let mut b = Bounce::new(
        usize::try_from(hi - lo).map_err(io::Error::other)?,
        a as usize,
    );
    let au = a as usize;
    let _rmw = s.rmw.lock().unwrap_or_else(|e| e.into_inner());
    let data = b.buf();
    if offset != lo {
        read_aligned(s, &mut data[..au], lo)?;
    }
    let end = offset + len;
    if end != hi && (hi - a >= offset || offset == lo) {
        let n = data.len();
        read_aligned(s, &mut data[n - au..], hi - a)?;
    }
    let mut pos = (offset - lo) as usize;
    for src in bufs {
        data[pos..pos + src.len()].copy_from_slice(src);
        pos += src.len();
    }
    s.file.write_all_at(data, lo)
}
