//! Target `virtio`: virtio-blk requests from arbitrary descriptor tables. The input fills a
//! 16-entry split queue's descriptor table (any address, length, flags and next index: loops,
//! indirect tables, unmapped or overlapping buffers), the available ring and guest memory;
//! every available chain is popped by virtio-queue, parsed and run by `process_chain` against a
//! 1 MiB RAM disk, and returned to the used ring.
//!
//! Input: flags (1 byte: bit 0 read-only disk, bit 1 writethrough), 16 descriptors of 12 bytes
//! (address u32, length u16, flags u16, next u16, extra u16), number of available heads (1 byte,
//! at most 4) and 4 head indices (u16), then the bytes of guest memory from [`DATA`] on.
//! Guest memory: two regions with a hole between them. A descriptor's address is taken modulo
//! [`ADDR_SPAN`] unless its `extra` has bit 15 set (then `address << 16`: far, unmapped); its
//! length is `u32::MAX - length` when `extra` has bit 14 set.

use super::Cursor;
use std::sync::Arc;
use vhost_user_qcow2::block::MemDisk;
use vhost_user_qcow2::virtio::{process_chain, BlkConfig, DeviceCtx};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const QUEUE_SIZE: u16 = 16;
/// Where the input's guest memory bytes go (the rings are below).
pub const DATA: u64 = 0x1000;
/// First region: 0..0x10000; second: 0x20000..0x30000; addresses are taken modulo this.
pub const ADDR_SPAN: u64 = 0x3_0000;
/// Most chains run per input.
const MAX_CHAINS: usize = 8;

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let flags = c.u8();
    let descs: Vec<RawDescriptor> = (0..QUEUE_SIZE)
        .map(|_| {
            let addr = u64::from(c.u32());
            let len = u32::from(c.u16());
            let dflags = c.u16();
            let next = c.u16();
            let extra = c.u16();
            let addr = if extra & 0x8000 != 0 {
                addr << 16
            } else {
                addr % ADDR_SPAN
            };
            let len = if extra & 0x4000 != 0 {
                u32::MAX - len
            } else {
                len
            };
            RawDescriptor::from(SplitDescriptor::new(addr, len, dflags, next))
        })
        .collect();
    let nheads = usize::from(c.u8() % 5);
    let heads: Vec<u16> = (0..4).map(|_| c.u16()).collect();
    let memory = c.rest();

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1_0000),
    ])
    .expect("guest memory");
    let n = memory.len().min(0x1_0000 - DATA as usize);
    mem.write_slice(&memory[..n], GuestAddress(DATA))
        .expect("guest memory write");

    let mq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    for (i, d) in descs.into_iter().enumerate() {
        mq.desc_table()
            .store(i as u16, d)
            .expect("descriptor store");
    }
    for (i, h) in heads.iter().take(nheads).enumerate() {
        mq.avail().ring().ref_at(i).expect("avail ring").store(*h);
    }
    mq.avail().idx().store(nheads as u16);
    let mut q: Queue = mq.create_queue().expect("queue");

    let disk = Arc::new(MemDisk::new(1 << 20, flags & 1 != 0));
    let cfg = BlkConfig::new(1 << 20, 1, QUEUE_SIZE, 4096, flags & 2 == 0);
    let ctx = DeviceCtx::new(disk, cfg, "fuzz-serial");
    for _ in 0..MAX_CHAINS {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let used = process_chain(&ctx, 0, &mem, chain);
        let _ = q.add_used(&mem, head, used);
    }
}
