//! L1 and L2 table entries.

use crate::qcow2::offsets::HostOffset;

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
pub const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// A decoded L1 entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct L1Entry {
    /// Offset of the L2 table; None when unallocated.
    pub l2_offset: Option<HostOffset>,
    /// Refcount of the L2 table is exactly one.
    pub copied: bool,
    /// Reserved bits were set (corruption).
    pub reserved: bool,
}

impl L1Entry {
    pub fn decode(raw: u64) -> L1Entry {
        let off = raw & L1E_OFFSET_MASK;
        L1Entry {
            l2_offset: (off != 0).then_some(HostOffset(off)),
            copied: raw & OFLAG_COPIED != 0,
            reserved: raw & L1E_RESERVED_MASK != 0,
        }
    }
    pub fn encode(l2: HostOffset, copied: bool) -> u64 {
        (l2.0 & L1E_OFFSET_MASK) | if copied { OFLAG_COPIED } else { 0 }
    }
}

/// A decoded (standard, non-extended) L2 entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros. `host` is kept for a preallocated zero cluster.
    Zero {
        host: Option<HostOffset>,
        copied: bool,
    },
    /// Data at `host`.
    Normal { host: HostOffset, copied: bool },
    /// Compressed data at byte `host` (not aligned), `size` bytes (whole sectors as stored).
    Compressed { host: u64, size: u64 },
    /// An entry the format forbids (reserved bits, COPIED on compressed, ...).
    Invalid(u64),
}

/// Shift and mask of the compressed-size field for a cluster size.
pub fn compressed_fields(cluster_bits: u32) -> (u32, u64) {
    let shift = 62 - (cluster_bits - 8);
    let mask = (1u64 << (cluster_bits - 8)) - 1;
    (shift, mask)
}

impl L2Entry {
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & OFLAG_COMPRESSED != 0 {
            if raw & OFLAG_COPIED != 0 {
                return L2Entry::Invalid(raw);
            }
            let (shift, mask) = compressed_fields(cluster_bits);
            let host = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & mask) + 1;
            let size = sectors * 512 - (host & 511);
            return L2Entry::Compressed { host, size };
        }
        if raw & L2E_RESERVED_MASK != 0 {
            return L2Entry::Invalid(raw);
        }
        let off = raw & L2E_OFFSET_MASK;
        let copied = raw & OFLAG_COPIED != 0;
        if raw & OFLAG_ZERO != 0 {
            return L2Entry::Zero {
                host: (off != 0).then_some(HostOffset(off)),
                copied,
            };
        }
        if off == 0 {
            if copied {
                return L2Entry::Invalid(raw);
            }
            return L2Entry::Unallocated;
        }
        L2Entry::Normal {
            host: HostOffset(off),
            copied,
        }
    }

    pub fn encode(&self, cluster_bits: u32) -> u64 {
        let c = |copied: bool| if copied { OFLAG_COPIED } else { 0 };
        match *self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied } => {
                OFLAG_ZERO | host.map_or(0, |h| h.0 & L2E_OFFSET_MASK) | c(copied && host.is_some())
            }
            L2Entry::Normal { host, copied } => (host.0 & L2E_OFFSET_MASK) | c(copied),
            L2Entry::Compressed { host, size } => {
                let (shift, mask) = compressed_fields(cluster_bits);
                let sectors = ((host & 511) + size).div_ceil(512);
                OFLAG_COMPRESSED
                    | (((sectors - 1) & mask) << shift)
                    | (host & ((1u64 << shift) - 1))
            }
            L2Entry::Invalid(raw) => raw,
        }
    }

    /// The cluster-aligned host offset this entry owns (normal or preallocated zero).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            L2Entry::Normal { host, .. } => Some(host),
            L2Entry::Zero { host, .. } => host,
            _ => None,
        }
    }

    /// COPIED flag (false for entries that have none).
    pub fn copied(&self) -> bool {
        matches!(
            *self,
            L2Entry::Normal { copied: true, .. } | L2Entry::Zero { copied: true, .. }
        )
    }

    /// The same entry with COPIED set or cleared (entries without a host cluster are unchanged).
    pub fn with_copied(self, copied: bool) -> L2Entry {
        match self {
            L2Entry::Normal { host, .. } => L2Entry::Normal { host, copied },
            L2Entry::Zero { host: Some(h), .. } => L2Entry::Zero {
                host: Some(h),
                copied,
            },
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_roundtrip() {
        let raw = L1Entry::encode(HostOffset(0x5_0000), true);
        assert_eq!(raw, 0x8000_0000_0005_0000);
        let e = L1Entry::decode(raw);
        assert_eq!(e.l2_offset, Some(HostOffset(0x5_0000)));
        assert!(e.copied && !e.reserved);
        assert!(L1Entry::decode(raw | 1).reserved);
    }

    #[test]
    fn l2_kinds() {
        let cb = 16;
        assert_eq!(L2Entry::decode(0, cb), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(1, cb),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        let n = L2Entry::Normal {
            host: HostOffset(0x7_0000),
            copied: true,
        };
        assert_eq!(L2Entry::decode(n.encode(cb), cb), n);
        let z = L2Entry::Zero {
            host: Some(HostOffset(0x7_0000)),
            copied: true,
        };
        assert_eq!(z.encode(cb), 0x8000_0000_0007_0001);
        assert_eq!(L2Entry::decode(z.encode(cb), cb), z);
        assert!(matches!(
            L2Entry::decode(0x7_0000 | 2, cb),
            L2Entry::Invalid(_)
        ));
        assert!(matches!(
            L2Entry::decode(OFLAG_COPIED, cb),
            L2Entry::Invalid(_)
        ));
        assert!(matches!(
            L2Entry::decode(OFLAG_COMPRESSED | OFLAG_COPIED, cb),
            L2Entry::Invalid(_)
        ));
    }

    #[test]
    fn compressed_roundtrip() {
        for cb in [9u32, 12, 16, 21] {
            let c = L2Entry::Compressed {
                host: 0x12_3456,
                size: 1024 - 0x56,
            };
            let raw = c.encode(cb);
            assert_eq!(L2Entry::decode(raw, cb), c, "cluster_bits {cb}");
        }
        // QEMU layout for 64 KiB clusters: offset in bits 0..53, sectors-1 in 54..61.
        let raw = OFLAG_COMPRESSED | (3u64 << 54) | 0x10200;
        assert_eq!(
            L2Entry::decode(raw, 16),
            L2Entry::Compressed {
                host: 0x10200,
                size: 4 * 512
            }
        );
    }
}
