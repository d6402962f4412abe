//! The driver side of virtio-blk on split rings, for tests that act as the VMM and the guest
//! at once (tests/ch_frontend.rs): guest memory in memfds (so its fds can go into a vhost-user
//! memory table), rings laid out in it, requests written and completions read the way a guest
//! driver does.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub type Mem = GuestMemoryMmap<()>;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_S_OK: u8 = 0;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// A memfd of `size` bytes (sparse), as cloud-hypervisor's `--memory shared=on` makes.
pub fn memfd(name: &str, size: u64) -> File {
    memfd_with(name, size, libc::MFD_CLOEXEC)
}

/// A memfd of `size` bytes that can neither grow nor shrink (cloud-hypervisor's dirty log).
pub fn memfd_sealable(name: &str, size: u64) -> File {
    let f = memfd_with(name, size, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert!(rc >= 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    f
}

fn memfd_with(name: &str, size: u64, flags: libc::c_uint) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Guest memory of one memfd-backed region per `(guest address, size)`.
pub fn guest_memory(regions: &[(u64, u64)]) -> Mem {
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(gpa, size)| {
            let f = memfd("guest-ram", size);
            (
                GuestAddress(gpa),
                usize::try_from(size).unwrap(),
                Some(FileOffset::new(f, 0)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

/// One memfd-backed region of `size` bytes at `gpa`, to add to guest memory (hotplug).
pub fn guest_region(gpa: u64, size: u64) -> std::sync::Arc<GuestRegionMmap<()>> {
    let f = memfd("guest-ram-hotplug", size);
    let map = MmapRegion::from_file(FileOffset::new(f, 0), usize::try_from(size).unwrap()).unwrap();
    std::sync::Arc::new(GuestRegionMmap::new(map, GuestAddress(gpa)).unwrap())
}

/// What a vhost-user memory table entry needs of a region: (gpa, size, our address, fd, offset).
pub fn region_info(mem: &Mem) -> Vec<vhost::VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| {
            let fo = r.file_offset().expect("memfd-backed region");
            vhost::VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: mem.get_host_address(r.start_addr()).unwrap() as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            }
        })
        .collect()
}

/// Host (this process's) address of guest address `gpa`.
pub fn host_addr(mem: &Mem, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
}

/// One buffer of a request: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A split virtqueue laid out at `base`: descriptor table, then the available ring at
/// `base + 0x1000`, the used ring at `base + 0x2000` (room for 256 entries).
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// The descriptors of each head in flight.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl Ring {
    pub fn new(mem: &Mem, base: u64, size: u16) -> Ring {
        assert!(size <= 256);
        let r = Ring {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
        };
        r.reset(mem);
        r
    }

    /// Zero the rings, as a driver does when it (re)initializes the queue.
    pub fn reset(&self, mem: &Mem) {
        mem.write_slice(&vec![0u8; 0x3000], GuestAddress(self.desc))
            .unwrap();
    }

    /// The available index the guest published (what cloud-hypervisor sends as SET_VRING_BASE).
    pub fn avail_idx(&self, mem: &Mem) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    pub fn used_idx(&self, mem: &Mem) -> u16 {
        let v: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        fence(Ordering::Acquire);
        v
    }

    /// Requests published and not yet seen in the used ring.
    pub fn pending(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Free descriptors.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// The head the next posted chain gets (to place its header and status by head).
    pub fn next_head(&self) -> u16 {
        *self.free.last().expect("ring full")
    }

    /// Put a chain of `bufs` in the table and publish it; no kick. Returns its head.
    pub fn post(&mut self, mem: &Mem, bufs: &[Buf]) -> u16 {
        assert!(self.free.len() >= bufs.len(), "ring full");
        let idx: Vec<u16> = bufs.iter().map(|_| self.free.pop().unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let next = idx.get(i + 1).copied();
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT;
            }
            let at = self.desc + 16 * u64::from(idx[i]);
            mem.write_obj(b.addr, GuestAddress(at)).unwrap();
            mem.write_obj(b.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next.unwrap_or(0), GuestAddress(at + 14))
                .unwrap();
        }
        let head = idx[0];
        self.chains[usize::from(head)] = idx;
        // EVENT_IDX: interrupt at the next completion.
        self.want_notification(mem);
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        head
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Ask for a notification at the next completion (EVENT_IDX's used_event).
    fn want_notification(&self, mem: &Mem) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.last_used, GuestAddress(at)).unwrap();
        fence(Ordering::SeqCst);
    }

    /// Take the used elements published since the last call: (head, length), their
    /// descriptors freed.
    pub fn take_used(&mut self, mem: &Mem) -> Vec<(u16, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != end {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            let head = u16::try_from(id).expect("used id fits a head");
            assert!(head < self.size, "used id {id} past the ring");
            let chain = std::mem::take(&mut self.chains[usize::from(head)]);
            assert!(!chain.is_empty(), "used id {head} was not in flight");
            self.free.extend(chain);
            out.push((head, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Wait (on the call eventfd) until `n` more requests are used; returns them and whether
    /// the call eventfd fired (waited for up to a second after the last completion).
    pub fn wait_used(&mut self, mem: &Mem, n: usize, timeout: Duration) -> (Vec<(u16, u32)>, bool) {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut called = false;
        loop {
            got.extend(self.take_used(mem));
            if got.len() >= n {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {} of {n} requests completed (avail {}, used {})",
                got.len(),
                self.avail_idx,
                self.used_idx(mem)
            );
            if wait_readable(&self.call, left.min(Duration::from_millis(200))) {
                let _ = self.call.read();
                called = true;
            }
        }
        if !called && wait_readable(&self.call, Duration::from_secs(1)) {
            let _ = self.call.read();
            called = true;
        }
        (got, called)
    }
}

/// Poll `fd` for input for at most `timeout`.
pub fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0
}

/// A virtio-blk request's buffers: header at `hdr`, data `data` (may be empty), status byte
/// at `status`. `kind` decides the data direction.
pub fn blk_request(
    mem: &Mem,
    kind: u32,
    sector: u64,
    hdr: u64,
    data: &[Buf],
    status: u64,
) -> Vec<Buf> {
    mem.write_obj(kind, GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let mut v = vec![Buf {
        addr: hdr,
        len: 16,
        write: false,
    }];
    v.extend_from_slice(data);
    v.push(Buf {
        addr: status,
        len: 1,
        write: true,
    });
    v
}

/// A data buffer of a request of type `kind`.
pub fn data_buf(kind: u32, addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID,
    }
}
