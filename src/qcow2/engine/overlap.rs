//! Metadata overlap checks: which host clusters hold metadata, and of which kind.
//!
//! The image is cut into windows of 65536 clusters. Each window that holds metadata keeps a
//! sorted list of non-overlapping fragments, one `u64` each (start in the window, length - 1,
//! kind bits), adjacent fragments of equal kinds merged. A lookup is a binary search in one
//! window's list (at most 16 steps, whatever the image size); an update rewrites one window's
//! list. Metadata is sparse (one L2 table per 512 MiB of data with 64 KiB clusters), so a 1 TiB
//! image needs a few thousand fragments: see the memory test below.

use std::collections::BTreeMap;
use std::str::FromStr;

/// Kinds of metadata (QEMU's overlap-check bits, plus our own).
pub mod kind {
    pub const HEADER: u16 = 1 << 0;
    pub const ACTIVE_L1: u16 = 1 << 1;
    pub const ACTIVE_L2: u16 = 1 << 2;
    pub const REFCOUNT_TABLE: u16 = 1 << 3;
    pub const REFCOUNT_BLOCK: u16 = 1 << 4;
    pub const SNAPSHOT_TABLE: u16 = 1 << 5;
    pub const INACTIVE_L1: u16 = 1 << 6;
    pub const INACTIVE_L2: u16 = 1 << 7;
    pub const BITMAP_DIRECTORY: u16 = 1 << 8;
    pub const DEDUP_INDEX: u16 = 1 << 9;
    pub const ALL: u16 = (1 << 10) - 1;

    /// A readable name for the lowest kind bit set.
    pub fn name(k: u16) -> &'static str {
        const NAMES: [&str; 10] = [
            "qcow2 header",
            "active L1 table",
            "active L2 table",
            "refcount table",
            "refcount block",
            "snapshot table",
            "inactive L1 table",
            "inactive L2 table",
            "bitmap directory",
            "dedup index",
        ];
        NAMES
            .get(k.trailing_zeros() as usize)
            .copied()
            .unwrap_or("metadata")
    }
}

/// Which kinds are checked (QEMU's modes; ours defaults to `All`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverlapMode {
    None,
    /// Header, active L1, refcount table, snapshot table, bitmap directory, dedup index.
    Constant,
    /// Constant plus active L2 tables and refcount blocks.
    Cached,
    /// Everything, inactive L1 and L2 tables included.
    #[default]
    All,
}

impl OverlapMode {
    pub fn mask(self) -> u16 {
        use kind::*;
        let constant =
            HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY | DEDUP_INDEX;
        match self {
            OverlapMode::None => 0,
            OverlapMode::Constant => constant,
            OverlapMode::Cached => constant | ACTIVE_L2 | REFCOUNT_BLOCK,
            OverlapMode::All => ALL,
        }
    }
}

impl FromStr for OverlapMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(OverlapMode::None),
            "constant" => Ok(OverlapMode::Constant),
            "cached" => Ok(OverlapMode::Cached),
            "all" => Ok(OverlapMode::All),
            _ => Err(format!(
                "overlap check mode {s:?}: use none, constant, cached or all"
            )),
        }
    }
}

const WBITS: u32 = 16;
const WSIZE: u64 = 1 << WBITS;

fn frag(start: u64, len: u64, k: u16) -> u64 {
    (start << 48) | ((len - 1) << 32) | k as u64
}
fn f_start(f: u64) -> u64 {
    f >> 48
}
fn f_len(f: u64) -> u64 {
    ((f >> 32) & 0xffff) + 1
}
fn f_kind(f: u64) -> u16 {
    f as u16
}

/// A hit: the kind found and the first overlapping host cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub kind: u16,
    pub cluster: u64,
}

/// See the module documentation.
#[derive(Default, Debug)]
pub struct MetadataMap {
    windows: BTreeMap<u64, Vec<u64>>,
}

impl MetadataMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mark clusters `first..first+n` as holding `k` (in addition to what they hold).
    pub fn add(&mut self, first: u64, n: u64, k: u16) {
        self.update(first, n, |m| m | k);
    }

    /// Clear kind `k` from clusters `first..first+n`.
    pub fn remove(&mut self, first: u64, n: u64, k: u16) {
        self.update(first, n, |m| m & !k);
    }

    fn update(&mut self, first: u64, n: u64, f: impl Fn(u16) -> u16) {
        let end = first.saturating_add(n);
        let mut c = first;
        while c < end {
            let w = c >> WBITS;
            let a = c & (WSIZE - 1);
            let b = (end - (w << WBITS)).min(WSIZE);
            let list = self.windows.entry(w).or_default();
            *list = update_window(list, a, b, &f);
            if list.is_empty() {
                self.windows.remove(&w);
            }
            c = (w + 1) << WBITS;
        }
    }

    /// The first cluster of `first..first+n` holding a kind in `mask`.
    pub fn find(&self, first: u64, n: u64, mask: u16) -> Option<Overlap> {
        if mask == 0 || n == 0 {
            return None;
        }
        let end = first.saturating_add(n);
        let mut c = first;
        while c < end {
            let w = c >> WBITS;
            let a = c & (WSIZE - 1);
            let b = (end - (w << WBITS)).min(WSIZE);
            if let Some(list) = self.windows.get(&w) {
                // First fragment that ends after `a`.
                let i = list.partition_point(|&f| f_start(f) + f_len(f) <= a);
                for &f in &list[i..] {
                    if f_start(f) >= b {
                        break;
                    }
                    if f_kind(f) & mask != 0 {
                        let at = f_start(f).max(a);
                        return Some(Overlap {
                            kind: f_kind(f) & mask,
                            cluster: (w << WBITS) + at,
                        });
                    }
                }
            }
            c = (w + 1) << WBITS;
        }
        None
    }

    /// Kinds held by one cluster.
    pub fn kinds(&self, cluster: u64) -> u16 {
        self.find(cluster, 1, kind::ALL).map_or(0, |o| o.kind)
    }

    /// Forget kinds `k` everywhere (the fallback when the map would pass its cap).
    pub fn strip(&mut self, k: u16) {
        for list in self.windows.values_mut() {
            let old = std::mem::take(list);
            let mut out: Vec<u64> = Vec::with_capacity(old.len());
            for f in old {
                let nk = f_kind(f) & !k;
                if nk == 0 {
                    continue;
                }
                let (s, l) = (f_start(f), f_len(f));
                match out.last_mut() {
                    Some(last) if f_kind(*last) == nk && f_start(*last) + f_len(*last) == s => {
                        *last = frag(f_start(*last), f_len(*last) + l, nk);
                    }
                    _ => out.push(frag(s, l, nk)),
                }
            }
            *list = out;
        }
        self.windows.retain(|_, v| !v.is_empty());
    }

    /// Memory used, in bytes (fragment lists and the window index).
    pub fn ram_bytes(&self) -> usize {
        // A B-tree node holds up to 11 entries of (u64, Vec) = 32 bytes; count the entries'
        // share plus each list's heap capacity.
        self.windows
            .values()
            .map(|v| 32 + 8 + v.capacity() * 8)
            .sum::<usize>()
            + std::mem::size_of::<Self>()
    }

    /// Number of fragments.
    pub fn fragments(&self) -> usize {
        self.windows.values().map(Vec::len).sum()
    }
}

/// Apply `f` to the kinds of `a..b` in one window's fragment list; returns the new list.
fn update_window(list: &[u64], a: u64, b: u64, f: &impl Fn(u16) -> u16) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::with_capacity(list.len() + 2);
    let mut push = |start: u64, end: u64, k: u16| {
        if k == 0 || start >= end {
            return;
        }
        if let Some(last) = out.last_mut() {
            if f_kind(*last) == k && f_start(*last) + f_len(*last) == start {
                *last = frag(f_start(*last), end - f_start(*last), k);
                return;
            }
        }
        out.push(frag(start, end - start, k));
    };
    let mut pos = a; // next uncovered point of a..b
    for &fr in list {
        let (s, e, k) = (f_start(fr), f_start(fr) + f_len(fr), f_kind(fr));
        if e <= a || s >= b {
            if s >= b && pos < b {
                push(pos, b, f(0));
                pos = b;
            }
            push(s, e, k);
            continue;
        }
        if s < a {
            push(s, a, k);
        }
        if pos < s.max(a) {
            push(pos, s.max(a), f(0));
        }
        push(s.max(a), e.min(b), f(k));
        pos = e.min(b);
        if e > b {
            push(b, e, k);
        }
    }
    if pos < b {
        push(pos, b, f(0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_find() {
        let mut m = MetadataMap::new();
        m.add(0, 1, kind::HEADER);
        m.add(3, 2, kind::ACTIVE_L2);
        m.add(4, 1, kind::REFCOUNT_BLOCK); // overlaps: both kinds on cluster 4
        assert_eq!(m.kinds(0), kind::HEADER);
        assert_eq!(m.kinds(2), 0);
        assert_eq!(m.kinds(4), kind::ACTIVE_L2 | kind::REFCOUNT_BLOCK);
        assert_eq!(
            m.find(1, 10, kind::REFCOUNT_BLOCK),
            Some(Overlap {
                kind: kind::REFCOUNT_BLOCK,
                cluster: 4
            })
        );
        assert_eq!(m.find(1, 2, kind::ALL), None);
        m.remove(3, 2, kind::ACTIVE_L2);
        assert_eq!(m.kinds(3), 0);
        assert_eq!(m.kinds(4), kind::REFCOUNT_BLOCK);
        // Across a window boundary.
        m.add(WSIZE - 1, 3, kind::SNAPSHOT_TABLE);
        assert_eq!(m.find(WSIZE, 1, kind::ALL).map(|o| o.cluster), Some(WSIZE));
        assert_eq!(m.fragments(), 4);
    }

    #[test]
    fn random_updates_match_a_brute_force_model() {
        let n = 3 * WSIZE / 2;
        let mut model = vec![0u16; n as usize];
        let mut m = MetadataMap::new();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut rnd = |r: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % r
        };
        for step in 0..4000 {
            let first = if rnd(4) == 0 {
                WSIZE - rnd(8)
            } else {
                rnd(n - 64)
            };
            let span = if rnd(10) == 0 { 300 } else { 4 };
            let len = 1 + rnd(span);
            let len = len.min(n - first);
            let k = 1u16 << rnd(10);
            let remove = rnd(3) == 0;
            if remove {
                m.remove(first, len, k);
                model[first as usize..(first + len) as usize]
                    .iter_mut()
                    .for_each(|v| *v &= !k);
            } else {
                m.add(first, len, k);
                model[first as usize..(first + len) as usize]
                    .iter_mut()
                    .for_each(|v| *v |= k);
            }
            if step % 97 == 0 {
                for c in (0..n).step_by(7) {
                    assert_eq!(
                        m.kinds(c),
                        model[c as usize],
                        "cluster {c} after step {step}"
                    );
                }
                // Range queries agree with a scan of the model.
                let q = rnd(n - 50);
                let ql = 1 + rnd(50);
                let qm = 1u16 << rnd(10);
                let want = (q..q + ql).find(|&c| model[c as usize] & qm != 0);
                assert_eq!(m.find(q, ql, qm).map(|o| o.cluster), want);
            }
        }
    }

    #[test]
    fn strip_forgets_one_kind_and_keeps_the_rest() {
        let mut m = MetadataMap::new();
        m.add(10, 5, kind::INACTIVE_L2);
        m.add(12, 5, kind::ACTIVE_L2);
        m.add(WSIZE + 3, 1, kind::INACTIVE_L1);
        m.strip(kind::INACTIVE_L1 | kind::INACTIVE_L2);
        assert_eq!(m.kinds(10), 0);
        assert_eq!(m.kinds(12), kind::ACTIVE_L2);
        assert_eq!(m.kinds(16), kind::ACTIVE_L2);
        assert_eq!(m.kinds(WSIZE + 3), 0);
        assert_eq!(m.fragments(), 1);
    }

    /// A 1 TiB image with 64 KiB clusters, fully allocated: 2048 L2 tables spread among the data,
    /// 512 refcount blocks, the L1 table, the refcount table and the header.
    #[test]
    fn memory_for_one_tebibyte() {
        let clusters = (1u64 << 40) >> 16;
        let mut m = MetadataMap::new();
        m.add(0, 1, kind::HEADER);
        m.add(1, 1, kind::REFCOUNT_TABLE);
        m.add(2, 1, kind::REFCOUNT_BLOCK);
        m.add(3, 1, kind::ACTIVE_L1);
        for i in 0..2048u64 {
            // An L2 table every 8193 clusters, the way allocating writes interleave them.
            m.add(4 + i * 8193, 1, kind::ACTIVE_L2);
        }
        for b in 1..512u64 {
            m.add(b * 32768, 1, kind::REFCOUNT_BLOCK);
        }
        assert!(m.find(0, clusters, kind::ALL).is_some());
        let bytes = m.ram_bytes();
        println!(
            "overlap map for 1 TiB / 64 KiB clusters: {} fragments, {bytes} bytes",
            m.fragments()
        );
        assert!(bytes < 100_000, "{bytes} bytes");
    }
}
