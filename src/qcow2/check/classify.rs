//! How the checker classifies an L2 entry, and where a compressed cluster's data lies: pure
//! functions of the entry, shared by the walk and its passes.

use crate::qcow2::format::entries::{
    compressed_fields, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO,
};

/// How an L2 entry is classified (QEMU's `qcow2_get_cluster_type` for standard L2 entries).
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

pub(crate) fn classify(e: u64) -> Kind {
    if e & OFLAG_COMPRESSED != 0 {
        Kind::Compressed
    } else if e & OFLAG_ZERO != 0 {
        if e & L2E_OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if e & L2E_OFFSET_MASK == 0 {
        Kind::Unallocated
    } else {
        Kind::Normal
    }
}

/// Host byte offset and length of a compressed cluster's data.
pub(crate) fn compressed_extent(e: u64, cb: u32) -> (u64, u64) {
    let (shift, mask) = compressed_fields(cb);
    let off = e & ((1u64 << shift) - 1);
    let sectors = ((e >> shift) & mask) + 1;
    (off, sectors * 512 - (off & 511))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::format::entries::OFLAG_COPIED;

    #[test]
    fn classification_follows_qemu() {
        assert_eq!(classify(0), Kind::Unallocated);
        assert_eq!(classify(OFLAG_COPIED), Kind::Unallocated);
        assert_eq!(classify(1), Kind::ZeroPlain);
        assert_eq!(classify(0x5_0000 | 1), Kind::ZeroAlloc);
        assert_eq!(classify(0x5_0000 | OFLAG_COPIED), Kind::Normal);
        // Reserved bits do not change the class; they are reported separately.
        assert_eq!(classify(0x5_0000 | 2), Kind::Normal);
        assert_eq!(classify(OFLAG_COMPRESSED | 0x5_0200), Kind::Compressed);
    }

    #[test]
    fn compressed_extent_like_qemu() {
        // 64 KiB clusters: offset in bits 0..53, sectors - 1 in bits 54..61.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x1_0200;
        assert_eq!(compressed_extent(e, 16), (0x1_0200, 4 * 512));
        let e = OFLAG_COMPRESSED | 0x1_0300;
        assert_eq!(compressed_extent(e, 16), (0x1_0300, 256));
    }
}
