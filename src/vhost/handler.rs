//! The vhost-user requests of one frontend connection (the `vhost` crate parses them and calls
//! this handler): feature negotiation, the guest memory map, ring configuration, start and
//! stop of the rings, the config space and the inflight region.
//!
//! A ring starts when both its addresses and its kick eventfd are known; it is served while it
//! is also enabled (SET_VRING_ENABLE, or from the start when protocol features were not
//! negotiated); it stops on GET_VRING_BASE, after its requests in flight have finished.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error as VuError, Result as VuResult};
use vhost::vhost_user::{GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestRegionMmap};

use super::backend::{device_features, BlkBackend, GuestMap, DRAIN_TIMEOUT};
use super::backend_channel::BackendChannel;
use super::device_state::DeviceState;
use super::dirty_log::LogBitmap;
use super::inflight_fd::InflightRegion;
use super::vring::eventfd_of;
use super::worker::Worker;
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's own limit for vhost-user).
const MAX_MEM_SLOTS: u64 = 509;

/// Where a region of the frontend's address space sits in guest memory.
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The protocol state of one connection.
pub(crate) struct Handler {
    backend: Arc<BlkBackend>,
    /// The worker threads; queue q is served by `workers[q % workers.len()]`.
    workers: Vec<Worker>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    mappings: Vec<AddrMapping>,
    inflight: Option<Arc<InflightRegion>>,
    /// The backend-initiated channel (BACKEND_REQ) as the crate hands it over: kept open, but
    /// it cannot send config-change messages; `channel` does (see `backend_channel`).
    backend_req: Option<Backend>,
    channel: Arc<BackendChannel>,
    /// A migration's device state transfer (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE).
    state: DeviceState,
}

fn failed(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Handler {
    pub(crate) fn new(
        backend: Arc<BlkBackend>,
        workers: Vec<Worker>,
        channel: Arc<BackendChannel>,
    ) -> Self {
        Handler {
            backend,
            workers,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            mappings: Vec::new(),
            inflight: None,
            backend_req: None,
            channel,
            state: DeviceState::default(),
        }
    }

    /// The protocol features this backend offers.
    pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    /// Stop every worker thread (after the connection ended and requests drained).
    pub(crate) fn stop_workers(&mut self) {
        for w in &mut self.workers {
            w.stop();
        }
    }

    fn worker(&self, q: usize) -> Option<&Worker> {
        self.workers.get(q.checked_rem(self.workers.len())?)
    }

    fn check_queue(&self, index: u32) -> VuResult<usize> {
        let q = usize::try_from(index).map_err(|_| VuError::InvalidParam)?;
        if q < self.backend.num_queues() {
            Ok(q)
        } else {
            Err(VuError::InvalidParam)
        }
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| m.gpa_base + (va - m.vmm_addr))
            .ok_or(VuError::InvalidParam)
    }

    /// Watch queue `q`'s kick eventfd exactly while the ring is active.
    fn update_registration(&self, q: usize) {
        let Some(v) = self.backend.vring(q) else {
            return;
        };
        let (fd, active) = (v.kick_fd(), v.active());
        drop(v);
        if let (Some(fd), Some(w)) = (fd, self.worker(q)) {
            w.watch_kick(q, fd, active);
        }
    }

    /// Start queue `q` once its addresses and kick eventfd are known.
    fn maybe_start(&mut self, q: usize) -> VuResult<()> {
        let ready = self
            .backend
            .vring(q)
            .is_some_and(|v| !v.started() && v.addressed && v.kick.is_some());
        if !ready {
            return Ok(());
        }
        self.backend
            .start_queue(q)
            .map_err(VuError::ReqHandlerError)?;
        self.state.ring_started(&self.backend, q);
        if let (Some(fd), Some(w)) = (self.backend.completion_fd(q), self.worker(q)) {
            w.watch_completions(q, fd);
        }
        self.update_registration(q);
        self.wake(q);
        Ok(())
    }

    /// Make queue `q`'s worker look at the ring (requests may have been posted, or left in
    /// flight by a predecessor, before we watched the kick eventfd).
    fn wake(&self, q: usize) {
        if let Some(v) = self.backend.vring(q) {
            if v.active() {
                if let Some(k) = &v.kick {
                    let _ = k.write(1);
                }
            }
        }
    }

    fn attach_inflight(&mut self, region: Arc<InflightRegion>) {
        for q in 0..self.backend.num_queues() {
            let part = u16::try_from(q).ok().and_then(|i| region.queue(i));
            if let Some(mut v) = self.backend.vring(q) {
                v.inflight = part;
            }
        }
        self.inflight = Some(region);
    }

    /// Map a region the frontend sent, its writes logged into the connection's dirty log.
    fn region(
        &self,
        r: &VhostUserMemoryRegion,
        file: File,
    ) -> VuResult<GuestRegionMmap<LogBitmap>> {
        if !super::sys::file_covers(&file, r.mmap_offset, r.memory_size) {
            return Err(failed("a memory region's file is shorter than the region"));
        }
        let map = r.mmap_region::<LogBitmap>(file)?;
        map.bitmap().attach(r.guest_phys_addr, &self.backend.log);
        GuestRegionMmap::new(map, GuestAddress(r.guest_phys_addr))
            .ok_or_else(|| failed("a memory region overflows the guest address space"))
    }

    fn replace_memory(&self, mem: GuestMap) {
        self.backend
            .mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for q in 0..self.backend.num_queues() {
            if let Some(mut v) = self.backend.vring(q) {
                v.enabled = false;
            }
            self.update_registration(q);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(device_features(self.backend.ctx.dev.read_only()))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !device_features(self.backend.ctx.dev.read_only()) != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        self.channel.set_features(features);
        debug!("driver acked features {features:#x}");
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log_all != self.backend.log.is_on() {
            log::info!(
                "dirty logging {}",
                if log_all { "on (migration)" } else { "off" }
            );
        }
        self.backend.log.set_on(log_all);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.backend
            .event_idx
            .store(event_idx, std::sync::atomic::Ordering::Release);
        // Without protocol features a ring is enabled as soon as it starts.
        let enable_all = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        for q in 0..self.backend.num_queues() {
            if let Some(mut v) = self.backend.vring(q) {
                v.queue.set_event_idx(event_idx);
                if enable_all {
                    v.enabled = true;
                }
            }
            if enable_all {
                self.update_registration(q);
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            // Logged like an added region: cloud-hypervisor sends its whole map this way.
            let region = self.region(r, file)?;
            mappings.push(AddrMapping {
                vmm_addr: r.user_addr,
                size: r.memory_size,
                gpa_base: r.guest_phys_addr,
            });
            regions.push(region);
        }
        let mem = GuestMap::from_regions(regions).map_err(failed)?;
        self.replace_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let q = self.check_queue(index)?;
        let size = u16::try_from(num).map_err(|_| VuError::InvalidParam)?;
        if size == 0 || size > self.backend.queue_size {
            warn!(
                "queue {q}: size {num} outside 1..={}",
                self.backend.queue_size
            );
            return Err(VuError::InvalidParam);
        }
        if let Some(mut v) = self.backend.vring(q) {
            v.queue.set_size(size);
        }
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let q = self.check_queue(index)?;
        let (d, a, u) = (
            self.vmm_va_to_gpa(descriptor)?,
            self.vmm_va_to_gpa(available)?,
            self.vmm_va_to_gpa(used)?,
        );
        if let Some(mut v) = self.backend.vring(q) {
            v.queue
                .try_set_desc_table_address(GuestAddress(d))
                .map_err(failed)?;
            v.queue
                .try_set_avail_ring_address(GuestAddress(a))
                .map_err(failed)?;
            v.queue
                .try_set_used_ring_address(GuestAddress(u))
                .map_err(failed)?;
            v.addressed = true;
        }
        self.maybe_start(q)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let q = self.check_queue(index)?;
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        if let Some(mut v) = self.backend.vring(q) {
            v.queue.set_next_avail(base);
        }
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = self.check_queue(index)?;
        // Stop taking requests, then let the ones in flight finish (the worker completes them)
        // before the frontend takes the ring back.
        if let Some(mut v) = self.backend.vring(q) {
            v.queue.set_ready(false);
        }
        self.update_registration(q);
        self.backend.drain(Some(q), DRAIN_TIMEOUT);
        let mut v = self.backend.vring(q).ok_or(VuError::InvalidParam)?;
        let next_avail = v.queue.next_avail();
        if let Some(k) = v.kick.take() {
            if let Some(w) = self.worker(q) {
                w.watch_kick(q, k.as_raw_fd(), false);
            }
        }
        v.call = None;
        v.addressed = false;
        v.resubmit.clear();
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.check_queue(u32::from(index))?;
        if let Some(f) = &fd {
            // Our reads must never block on a kick that is not there.
            set_nonblocking(f).map_err(VuError::ReqHandlerError)?;
        }
        let old = self
            .backend
            .vring(q)
            .and_then(|mut v| std::mem::replace(&mut v.kick, fd.map(eventfd_of)));
        if let (Some(old), Some(w)) = (old, self.worker(q)) {
            w.watch_kick(q, old.as_raw_fd(), false);
        }
        self.update_registration(q);
        self.maybe_start(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.check_queue(u32::from(index))?;
        if let Some(mut v) = self.backend.vring(q) {
            v.call = fd.map(eventfd_of);
            // A new call eventfd on a running ring: signal once, in case an interrupt went to
            // the old one unseen.
            if v.started() {
                let _ = v.signal();
            }
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.check_queue(u32::from(index))?;
        if let Some(mut v) = self.backend.vring(q) {
            v.err = fd.map(eventfd_of);
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        self.channel.set_protocol(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.backend.num_queues() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        let q = self.check_queue(index)?;
        let now_active = match self.backend.vring(q) {
            Some(mut v) => {
                let was = v.active();
                v.enabled = enable;
                !was && v.active()
            }
            None => false,
        };
        self.update_registration(q);
        if now_active {
            if let Some(v) = self.backend.vring(q) {
                let _ = v.signal();
            }
            self.wake(q);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _f: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _f: VhostUserConfigFlags) -> VuResult<()> {
        self.backend
            .set_config(offset, buf)
            .map_err(VuError::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.backend_req = Some(backend);
        self.channel.accept();
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let queues = u16::try_from(self.backend.num_queues()).unwrap_or(u16::MAX);
        let (num_queues, queue_size) = (msg.num_queues.max(queues), msg.queue_size);
        let (region, file) = InflightRegion::create(num_queues, queue_size).map_err(failed)?;
        let size = super::inflight_fd::region_size(num_queues, queue_size) as u64;
        debug!("inflight region: {num_queues} queues of {queue_size}, {size} bytes");
        self.attach_inflight(Arc::new(region));
        Ok((
            VhostUserInflight::new(size, 0, num_queues, queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::map(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(failed)?;
        let region = Arc::new(region);
        if let Some(part) = region.queue(0) {
            let (version, desc_num) = part.header();
            if version != super::inflight_fd::VERSION || desc_num != msg.queue_size {
                warn!(
                    "inflight region says version {version}, {desc_num} descriptors \
                     (expected {}, {}): used as laid out for the latter",
                    super::inflight_fd::VERSION,
                    msg.queue_size
                );
            }
        }
        debug!(
            "inflight region handed over: {} queues of {}",
            msg.num_queues, msg.queue_size
        );
        self.attach_inflight(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let region = self.region(r, file)?;
        let mem = self
            .backend
            .mem
            .memory()
            .insert_region(Arc::new(region))
            .map_err(failed)?;
        self.replace_memory(mem);
        self.mappings.push(AddrMapping {
            vmm_addr: r.user_addr,
            size: r.memory_size,
            gpa_base: r.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .backend
            .mem
            .memory()
            .remove_region(GuestAddress(r.guest_phys_addr), r.memory_size)
            .map_err(failed)?;
        self.replace_memory(mem);
        self.mappings.retain(|m| m.gpa_base != r.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        dir: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VuResult<Option<File>> {
        self.state
            .set_fd(&self.backend, dir, phase, fd)
            .map_err(failed)?;
        Ok(None)
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        self.state.check(&self.backend).map_err(failed)
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        debug!("dirty log: {} bytes", log.mmap_size);
        self.backend
            .log
            .set_base(file, log.mmap_offset, log.mmap_size)
            .map_err(failed)
    }
}

/// Make reads of `f` return at once when there is nothing to read.
fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
