//! Offset newtypes. A guest offset (a byte address on the virtual disk) and a host offset (a byte
//! address in the image file) must never be mixed up: in a storage engine that is corruption. All
//! arithmetic on them is checked.

use std::fmt;

/// A byte offset on the virtual disk the guest sees.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestOffset(pub u64);

/// A byte offset inside the image file.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

macro_rules! offset_impl {
    ($t:ident) => {
        impl $t {
            /// `self + n`, or None on overflow.
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map($t)
            }
            /// Index of the cluster that holds this offset.
            pub fn cluster(self, cluster_bits: u32) -> u64 {
                self.0 >> cluster_bits
            }
            /// Offset inside its cluster.
            pub fn in_cluster(self, cluster_bits: u32) -> u64 {
                self.0 & ((1u64 << cluster_bits) - 1)
            }
            /// True when the offset starts a cluster.
            pub fn is_cluster_aligned(self, cluster_bits: u32) -> bool {
                self.in_cluster(cluster_bits) == 0
            }
            /// The offset of cluster `index`, or None on overflow.
            pub fn from_cluster(index: u64, cluster_bits: u32) -> Option<Self> {
                index.checked_mul(1u64 << cluster_bits).map($t)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
offset_impl!(GuestOffset);
offset_impl!(HostOffset);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_math() {
        let h = HostOffset(0x3_0200);
        assert_eq!(h.cluster(16), 3);
        assert_eq!(h.in_cluster(16), 0x200);
        assert!(!h.is_cluster_aligned(16));
        assert_eq!(HostOffset::from_cluster(3, 16), Some(HostOffset(0x3_0000)));
        assert_eq!(HostOffset::from_cluster(u64::MAX, 16), None);
        assert_eq!(GuestOffset(u64::MAX).checked_add(1), None);
    }
}
