//! Refcount block entries of 2^order bits (order 0..=6), as QEMU packs them: sub-byte widths are
//! filled from the least significant bit of each byte; 16/32/64-bit entries are big-endian.

/// Entries per refcount block for a cluster size and order.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    1u64 << (cluster_bits + 3 - order)
}

/// Largest refcount an entry of this order holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Read entry `i` of a block.
pub fn get(block: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            ((byte >> ((i % per_byte) * bits)) as u64) & ((1u64 << bits) - 1)
        }
        3 => block[i] as u64,
        4 => u16::from_be_bytes([block[2 * i], block[2 * i + 1]]) as u64,
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[4 * i..4 * i + 4]);
            u32::from_be_bytes(a) as u64
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[8 * i..8 * i + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Index of the first entry at or after `from` whose refcount is 0 (None: every one is in
/// use).
pub fn first_zero(block: &[u8], from: usize, order: u32) -> Option<usize> {
    first_where(block, from, usize::MAX, order, true)
}

/// Index of the first entry in `from..to` whose refcount is not 0 (None: every one there is
/// free).
pub fn first_nonzero(block: &[u8], from: usize, to: usize, order: u32) -> Option<usize> {
    first_where(block, from, to, order, false)
}

fn first_where(block: &[u8], from: usize, to: usize, order: u32, zero: bool) -> Option<usize> {
    let to = to.min((block.len() * 8) >> order);
    if from >= to {
        return None;
    }
    if order >= 3 {
        let w = 1usize << (order - 3);
        block[from * w..to * w]
            .chunks_exact(w)
            .position(|e| e.iter().all(|&b| b == 0) == zero)
            .map(|p| from + p)
    } else {
        (from..to).find(|&i| (get(block, i, order) == 0) == zero)
    }
}

/// Write entry `i` of a block. `value` must be <= `max_refcount(order)`.
pub fn set(block: &mut [u8], i: usize, order: u32, value: u64) {
    debug_assert!(value <= max_refcount(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_roundtrips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..n {
                set(&mut b, i, order, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&b, i, order),
                    (i as u64 * 7 + 1) & max,
                    "order {order} i {i}"
                );
            }
            set(&mut b, 3, order, max);
            assert_eq!(get(&b, 3, order), max);
            assert_eq!(get(&b, 2, order), 15 & max);
            assert_eq!(get(&b, 4, order), 29 & max);
        }
    }

    #[test]
    fn first_zero_and_nonzero_find_the_first_such_entry_at_or_after_from() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let n = (64 * 8) >> order;
            for i in 0..n {
                set(&mut b, i, order, 1);
            }
            assert_eq!(first_zero(&b, 0, order), None, "order {order} full");
            set(&mut b, 5, order, 0);
            set(&mut b, n - 1, order, 0);
            assert_eq!(first_zero(&b, 0, order), Some(5), "order {order}");
            assert_eq!(first_zero(&b, 5, order), Some(5), "order {order}");
            assert_eq!(first_zero(&b, 6, order), Some(n - 1), "order {order}");
            assert_eq!(first_zero(&b, n, order), None, "order {order} past the end");
            assert_eq!(
                first_zero(&b, usize::MAX, order),
                None,
                "order {order} far past"
            );
            assert_eq!(first_nonzero(&b, 5, n, order), Some(6), "order {order}");
            assert_eq!(
                first_nonzero(&b, 5, 6, order),
                None,
                "order {order} up to 6"
            );
            assert_eq!(first_nonzero(&b, n - 1, n, order), None, "order {order}");
            assert_eq!(
                first_nonzero(&b, 0, usize::MAX, order),
                Some(0),
                "order {order}"
            );
            assert_eq!(
                first_nonzero(&b, n, usize::MAX, order),
                None,
                "order {order}"
            );
        }
    }

    #[test]
    fn qemu_bit_layout() {
        let mut b = vec![0u8; 2];
        set(&mut b, 1, 0, 1);
        assert_eq!(b[0], 0b10);
        let mut b = vec![0u8; 2];
        set(&mut b, 1, 2, 0xf);
        assert_eq!(b[0], 0xf0);
        let mut b = vec![0u8; 4];
        set(&mut b, 1, 4, 0x1234);
        assert_eq!(b, [0, 0, 0x12, 0x34]);
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(max_refcount(4), 65535);
        assert_eq!(max_refcount(0), 1);
    }
}
