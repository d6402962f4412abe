//! The virtio-blk configuration space (`struct virtio_blk_config`), serialised little-endian.

use super::consts::SECTOR_SIZE;

/// Size of `struct virtio_blk_config` up to and including the zoned characteristics.
pub const CONFIG_SPACE_SIZE: usize = 96;

/// What the device tells the driver about itself. The limits here are also the ones the request
/// parser enforces, so the two can never disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum number of data segments in one request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Minimum I/O size in logical blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in logical blocks.
    pub opt_io_size: u32,
    /// Write cache enabled (writeback) when 1; writethrough when 0.
    pub writeback: u8,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard segment, in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in one discard request.
    pub max_discard_seg: u32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 when write-zeroes with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// A config for a disk of `capacity_bytes` with `num_queues` queues of `queue_size` entries.
    /// `discard_granularity` is the engine's allocation unit (cluster size), in bytes.
    pub fn new(
        capacity_bytes: u64,
        num_queues: u16,
        queue_size: u16,
        discard_granularity: u32,
        writeback: bool,
    ) -> Self {
        BlkConfig {
            capacity: capacity_bytes / SECTOR_SIZE,
            // With INDIRECT_DESC a chain may be longer than the ring, but a VMM may pick a ring
            // smaller than our maximum (128 is the usual default) and a driver may not use
            // indirect tables: leave room for the header and the status in a 128-entry ring.
            seg_max: u32::from(queue_size.clamp(4, 128)) - 2,
            blk_size: 512,
            physical_block_exp: 3,
            min_io_size: 1,
            opt_io_size: (discard_granularity / 512).max(1),
            writeback: u8::from(writeback),
            num_queues,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            discard_sector_alignment: (discard_granularity / 512).max(1),
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: 1,
        }
    }

    /// The whole configuration space, little-endian, as the spec lays it out.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // 8: size_max (SIZE_MAX not offered), 16: geometry (GEOMETRY not offered).
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = self.writeback;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        // 60..96: secure erase and zoned fields, zero (features not offered).
        b
    }

    /// Exactly `size` bytes of the config space from `offset`; bytes past its end read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let all = self.to_bytes();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < CONFIG_SPACE_SIZE {
            let n = (CONFIG_SPACE_SIZE - start).min(out.len());
            out[..n].copy_from_slice(&all[start..start + n]);
        }
        out
    }

    /// Byte offset of the `writeback` field (the only field a driver may write).
    pub const WRITEBACK_OFFSET: u32 = 32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let c = BlkConfig::new(1 << 30, 2, 128, 65536, true);
        let b = c.to_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 128);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn any_offset_and_size() {
        let c = BlkConfig::new(4096, 1, 128, 512, false);
        let all = c.to_bytes();
        for off in 0..110u32 {
            for size in [0u32, 1, 2, 4, 8, 60, 96, 200] {
                let r = c.read(off, size);
                assert_eq!(r.len(), size as usize);
                for (i, byte) in r.iter().enumerate() {
                    let want = all.get(off as usize + i).copied().unwrap_or(0);
                    assert_eq!(*byte, want);
                }
            }
        }
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
    }
}
