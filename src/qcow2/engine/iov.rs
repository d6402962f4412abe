//! Helpers over scatter-gather lists: sub-ranges, fills and copies, without copying the data.

use std::io::{IoSlice, IoSliceMut};
use vm_memory::VolatileSlice;

/// One cluster's share of a byte range: guest cluster, offset in it, length, offset in the
/// request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub gc: u64,
    pub in_off: u64,
    pub n: u64,
    pub buf_off: usize,
}

/// Split `offset..offset+len` at cluster boundaries.
pub(crate) fn chunks(offset: u64, len: u64, cluster_bits: u32) -> impl Iterator<Item = Chunk> {
    let cs = 1u64 << cluster_bits;
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let in_off = pos & (cs - 1);
        let n = (cs - in_off).min(end - pos);
        let c = Chunk {
            gc: pos >> cluster_bits,
            in_off,
            n,
            buf_off: (pos - offset) as usize,
        };
        pos += n;
        Some(c)
    })
}

pub(crate) fn len_mut(bufs: &[IoSliceMut<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

pub(crate) fn len(bufs: &[IoSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// For buffers of lengths `lens`, the part of each that falls in `start..start+len`:
/// (buffer index, from, to) within that buffer, in order.
fn pieces(
    lens: impl Iterator<Item = usize>,
    start: usize,
    len: usize,
) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let end = start + len;
    let mut pos = 0usize;
    for (i, n) in lens.enumerate() {
        let (lo, hi) = (pos, pos + n);
        pos = hi;
        if hi <= start || len == 0 {
            continue;
        }
        if lo >= end {
            break;
        }
        out.push((i, start.max(lo) - lo, end.min(hi) - lo));
    }
    out
}

/// The bytes `start..start+len` of a list, as a new list borrowing the same memory.
pub(crate) fn slice_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    start: usize,
    len: usize,
) -> Vec<IoSliceMut<'a>> {
    let mut ps = pieces(bufs.iter().map(|b| b.len()), start, len)
        .into_iter()
        .peekable();
    let mut out = Vec::new();
    for (i, b) in bufs.iter_mut().enumerate() {
        match ps.peek() {
            Some(&(j, s, e)) if j == i => {
                out.push(IoSliceMut::new(&mut b[s..e]));
                ps.next();
            }
            Some(_) => {}
            None => break,
        }
    }
    out
}

/// Like `slice_mut`, for read-only lists.
pub(crate) fn slice<'a>(bufs: &'a [IoSlice<'_>], start: usize, len: usize) -> Vec<IoSlice<'a>> {
    pieces(bufs.iter().map(|b| b.len()), start, len)
        .into_iter()
        .map(|(i, s, e)| IoSlice::new(&bufs[i][s..e]))
        .collect()
}

/// A caller's buffer as a volatile slice. The buffers the engine is handed are often guest
/// memory, which the guest (or an overlapping request on another queue) may change at any
/// moment: every copy the engine itself makes into or out of them is volatile, so the compiler
/// assumes nothing about the bytes. (Handing them to `preadv`/`pwritev` is the kernel's copy.)
fn volatile(ptr: *mut u8, len: usize) -> VolatileSlice<'static> {
    // SAFETY: `ptr..ptr + len` is one of the caller's buffers, valid for reads and writes (the
    // mutable ones) for the duration of the engine call that uses the returned slice, which
    // never outlives that call (every use below is a single copy).
    unsafe { VolatileSlice::new(ptr, len) }
}

pub(crate) fn fill_zero(bufs: &mut [IoSliceMut<'_>]) {
    const ZEROS: [u8; 4096] = [0; 4096];
    for b in bufs.iter_mut() {
        let v = volatile(b.as_mut_ptr(), b.len());
        let mut at = 0;
        while at < b.len() {
            let n = (b.len() - at).min(ZEROS.len());
            if let Ok(piece) = v.subslice(at, n) {
                piece.copy_from(&ZEROS[..n]);
            }
            at += n;
        }
    }
}

/// Copy `src` into the list (up to the shorter of both).
pub(crate) fn copy_into(bufs: &mut [IoSliceMut<'_>], src: &[u8]) {
    let mut p = 0usize;
    for b in bufs.iter_mut() {
        let n = b.len().min(src.len() - p);
        volatile(b.as_mut_ptr(), n).copy_from(&src[p..p + n]);
        p += n;
        if p == src.len() {
            break;
        }
    }
}

/// Copy the list into `dst` from byte `at` of `dst` on (up to the shorter of both).
pub(crate) fn copy_out(bufs: &[IoSlice<'_>], dst: &mut [u8], at: usize) {
    let mut p = at;
    for b in bufs {
        let n = b.len().min(dst.len().saturating_sub(p));
        // Only read through the slice (the pointer is cast for the constructor's sake).
        volatile(b.as_ptr().cast_mut(), n).copy_to(&mut dst[p..p + n]);
        p += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cross_segments() {
        let mut a = [1u8; 4];
        let mut b = [2u8; 4];
        let mut c = [3u8; 4];
        let mut v = [
            IoSliceMut::new(&mut a),
            IoSliceMut::new(&mut b),
            IoSliceMut::new(&mut c),
        ];
        let s = slice_mut(&mut v, 2, 7);
        let lens: Vec<usize> = s.iter().map(|x| x.len()).collect();
        assert_eq!(lens, vec![2, 4, 1]);
        let mut s = slice_mut(&mut v, 3, 3);
        copy_into(&mut s, &[9, 9, 9]);
        drop(s);
        assert_eq!(a, [1, 1, 1, 9]);
        assert_eq!(b, [9, 9, 2, 2]);
        let r = [IoSlice::new(&c)];
        assert_eq!(slice(&r, 4, 0).len(), 0);
        assert_eq!(slice(&r, 1, 2)[0].len(), 2);
    }

    #[test]
    fn both_kinds_cut_the_same_pieces() {
        let (a, e, b) = ([1u8; 4], [0u8; 0], [2u8; 4]);
        let r = [IoSlice::new(&a), IoSlice::new(&e), IoSlice::new(&b)];
        let (mut ma, mut me, mut mb) = (a, e, b);
        let mut w = [
            IoSliceMut::new(&mut ma),
            IoSliceMut::new(&mut me),
            IoSliceMut::new(&mut mb),
        ];
        for (start, len) in [(0, 8), (3, 2), (4, 0), (4, 4), (2, 6), (7, 1)] {
            let ro: Vec<Vec<u8>> = slice(&r, start, len).iter().map(|x| x.to_vec()).collect();
            let rw: Vec<Vec<u8>> = slice_mut(&mut w, start, len)
                .iter()
                .map(|x| x.to_vec())
                .collect();
            assert_eq!(ro, rw, "{start}+{len}");
            assert_eq!(ro.iter().map(Vec::len).sum::<usize>(), len, "{start}+{len}");
        }
    }

    #[test]
    fn volatile_fills_and_copies_cross_segments() {
        let mut a = vec![7u8; 5000];
        let mut b = vec![7u8; 3];
        let mut v = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        fill_zero(&mut v);
        assert!(
            v.iter().all(|x| x.iter().all(|&y| y == 0)),
            "zeros past 4 KiB too"
        );
        let src: Vec<u8> = (0..5003u32).map(|i| i as u8).collect();
        copy_into(&mut v, &src);
        let r = [IoSlice::new(&v[0]), IoSlice::new(&v[1])];
        let mut dst = vec![0u8; 5010];
        copy_out(&r, &mut dst, 7);
        assert_eq!(&dst[7..], &src[..]);
        let mut short = vec![0u8; 10];
        copy_out(&r, &mut short, 4);
        assert_eq!(
            &short[4..],
            &src[..6],
            "stops at the end of the destination"
        );
    }
}
