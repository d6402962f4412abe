//! Reading a descriptor chain from its head index, outside the available ring.
//!
//! virtio-queue builds chains only while taking them from the available ring. A daemon that
//! restarts takes over requests its predecessor had taken (their heads are in the inflight
//! region, the available-ring slots they came from may already hold new entries), so it reads
//! those chains itself. The walk follows the same rules as virtio-queue's: `NEXT` links inside
//! the current table, one level of indirect table, and a chain no longer than its table.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Descriptor flag: the chain continues at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is a table of descriptors.
const F_INDIRECT: u16 = 4;
/// Bytes per descriptor.
const DESC_SIZE: u64 = 16;

/// Why a chain cannot be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("descriptor index {index} is outside its table of {size}")]
    OutOfRange { index: u16, size: u16 },
    #[error("the descriptor at {0:#x} is outside guest memory")]
    Unreadable(u64),
    #[error("the chain is longer than its table (a loop)")]
    TooLong,
    #[error("bad indirect table of {0} bytes")]
    BadIndirect(u32),
    #[error("an indirect table inside an indirect table")]
    NestedIndirect,
}

/// The descriptors of the chain starting at `head` in the table at `table` of `size` entries,
/// in order, without the indirect descriptor itself (as virtio-queue yields them).
pub fn chain_at<M: GuestMemoryBackend>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, WalkError> {
    let mut out = Vec::new();
    let (mut table, mut size, mut index) = (table, size, head);
    let mut indirect = false;
    // Descriptors left before the chain is declared a loop (reset for an indirect table).
    let mut ttl = size;
    loop {
        if index >= size {
            return Err(WalkError::OutOfRange { index, size });
        }
        if ttl == 0 {
            return Err(WalkError::TooLong);
        }
        ttl -= 1;
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(WalkError::Unreadable(table.raw_value()))?;
        let d: Descriptor = mem
            .read_obj(addr)
            .map_err(|_| WalkError::Unreadable(addr.raw_value()))?;
        if d.flags() & F_INDIRECT != 0 {
            if indirect {
                return Err(WalkError::NestedIndirect);
            }
            let len = d.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                return Err(WalkError::BadIndirect(len));
            }
            indirect = true;
            table = d.addr();
            size = u16::try_from(entries).map_err(|_| WalkError::BadIndirect(len))?;
            ttl = size;
            index = 0;
            continue;
        }
        let next = (d.flags() & F_NEXT != 0).then(|| d.next());
        out.push(d);
        match next {
            Some(n) => index = n,
            None => return Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(m: &GuestMemoryMmap<()>, table: u64, i: u16, d: Descriptor) {
        m.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    #[test]
    fn follows_next_links_in_order() {
        let m = mem();
        put(&m, 0x1000, 3, Descriptor::new(0xa000, 16, F_NEXT, 1));
        put(
            &m,
            0x1000,
            1,
            Descriptor::new(0xb000, 512, F_NEXT | WRITE, 7),
        );
        put(&m, 0x1000, 7, Descriptor::new(0xc000, 1, WRITE, 0));
        let c = chain_at(&m, GuestAddress(0x1000), 8, 3).unwrap();
        let addrs: Vec<u64> = c.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0xa000, 0xb000, 0xc000]);
        assert!(c[2].is_write_only());
    }

    #[test]
    fn reads_an_indirect_table() {
        let m = mem();
        put(&m, 0x1000, 2, Descriptor::new(0x2000, 48, F_INDIRECT, 0));
        put(&m, 0x2000, 0, Descriptor::new(0xa000, 16, F_NEXT, 2));
        put(&m, 0x2000, 2, Descriptor::new(0xb000, 8, F_NEXT, 1));
        put(&m, 0x2000, 1, Descriptor::new(0xc000, 1, WRITE, 0));
        let c = chain_at(&m, GuestAddress(0x1000), 4, 2).unwrap();
        let addrs: Vec<u64> = c.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0xa000, 0xb000, 0xc000]);
    }

    #[test]
    fn refuses_loops_bad_indices_and_bad_tables() {
        let m = mem();
        put(&m, 0x1000, 0, Descriptor::new(0xa000, 16, F_NEXT, 1));
        put(&m, 0x1000, 1, Descriptor::new(0xa000, 16, F_NEXT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0x1000), 4, 0).err(),
            Some(WalkError::TooLong)
        );
        assert_eq!(
            chain_at(&m, GuestAddress(0x1000), 4, 4).err(),
            Some(WalkError::OutOfRange { index: 4, size: 4 })
        );
        put(&m, 0x1000, 2, Descriptor::new(0xa000, 16, F_NEXT, 9));
        assert!(matches!(
            chain_at(&m, GuestAddress(0x1000), 4, 2),
            Err(WalkError::OutOfRange { index: 9, .. })
        ));
        put(&m, 0x1000, 3, Descriptor::new(0x2000, 20, F_INDIRECT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0x1000), 4, 3).err(),
            Some(WalkError::BadIndirect(20))
        );
        put(&m, 0x1000, 3, Descriptor::new(0x2000, 16, F_INDIRECT, 0));
        put(&m, 0x2000, 0, Descriptor::new(0x3000, 16, F_INDIRECT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0x1000), 4, 3).err(),
            Some(WalkError::NestedIndirect)
        );
        assert_eq!(
            chain_at(&m, GuestAddress(0xff_fff8), 4, 0).err(),
            Some(WalkError::Unreadable(0xff_fff8))
        );
    }
}
