//! cloud-hypervisor's vhost-user-blk frontend, message for message, on the rust-vmm `vhost`
//! crate's `Frontend` (which cloud-hypervisor itself uses). Written from reading
//! cloud-hypervisor's virtio-devices/src/vhost_user/{blk.rs, vu_common_ctrl.rs, mod.rs} at
//! ae44c2971c83 (2026-08-22); the functions carry the names of the ones they follow.
//!
//! - `Blk::new`: connect, SET_OWNER, GET_FEATURES, then `negotiate_features_vhost_user`
//!   (GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES with the intersection, and from then on
//!   NEED_REPLY on *every* message when REPLY_ACK was acked), GET_QUEUE_NUM (with MQ),
//!   GET_CONFIG (60 bytes, flag WRITABLE).
//! - `setup_vhost_user` (activation, and again after a reconnect or a reboot): SET_FEATURES,
//!   SET_MEM_TABLE (never ADD_MEM_REG here), SET_VRING_NUM for every queue, GET_INFLIGHT_FD
//!   (only when it holds no region yet) and SET_INFLIGHT_FD, then per queue SET_VRING_ADDR,
//!   SET_VRING_BASE (the guest's *available* index read from guest memory), SET_VRING_CALL,
//!   SET_VRING_KICK; then SET_VRING_ENABLE for every queue. The blk device has no backend
//!   request handler, so no SET_BACKEND_REQ_FD.
//! - reconnect (the socket hung up): connect again every 100 ms for up to 60 s, SET_OWNER,
//!   GET_FEATURES, SET_PROTOCOL_FEATURES with the features acked before (no
//!   GET_PROTOCOL_FEATURES), then `setup_vhost_user` with the inflight region it kept.
//! - reset (guest reboot): SET_VRING_ENABLE 0 and GET_VRING_BASE per queue.
//! - pause (before a snapshot or a migration's last pass): SET_VRING_ENABLE 0 per queue.
//! - snapshot (`VhostUserCommon::state`, then `snapshot`): with DEVICE_STATE acked,
//!   `save_backend_state` (GET_VRING_BASE per queue, SET_DEVICE_STATE_FD save/STOPPED, the
//!   state read to EOF, CHECK_DEVICE_STATE); then the last dirty-log read and the connection
//!   closed. Without DEVICE_STATE only the last two.
//! - restore (`Blk::new` with a state): connect, SET_PROTOCOL_FEATURES with the acked ones,
//!   `restore_backend_state` (SET_DEVICE_STATE_FD load/STOPPED, the state written, the channel
//!   closed, CHECK_DEVICE_STATE), and at activation `setup_vhost_user` with the carried bases.
//! - memory hotplug: ADD_MEM_REG with CONFIGURE_MEM_SLOTS.
//! - migration: `start_dirty_log` (a sealed memfd log, SET_LOG_BASE, SET_FEATURES with LOG_ALL,
//!   SET_VRING_ADDR with the LOG flag and the used ring's guest address), `dirty_log` (a new log
//!   through SET_LOG_BASE, the old one read), `stop_dirty_log`. DEVICE_STATE is used only when
//!   acked (`supports_device_state`).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_ORDER_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::vring::{host_addr, region_info, Mem, Ring};

/// Size of cloud-hypervisor's `VirtioBlockConfig` (block/src/lib.rs).
pub const CONFIG_LEN: u32 = 60;

/// The virtio features cloud-hypervisor's blk device offers (`avail_features`), with MQ for
/// more than one queue.
pub fn ch_virtio_features(num_queues: usize) -> u64 {
    let blk = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    // DEFAULT_VIRTIO_FEATURES of virtio-devices/src/vhost_user/mod.rs.
    let common = [
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
        VIRTIO_F_IN_ORDER,
        VIRTIO_F_ORDER_PLATFORM,
        VIRTIO_F_NOTIFICATION_DATA,
    ];
    let mut f = blk.iter().chain(&common).fold(0u64, |a, b| a | (1u64 << b));
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// The protocol features cloud-hypervisor's blk device asks for.
pub fn ch_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
}

/// The inflight region the frontend keeps across reconnects (`vhost_user::Inflight`).
#[derive(Default)]
pub struct Inflight {
    pub info: VhostUserInflight,
    pub fd: Option<File>,
}

impl Inflight {
    /// Descriptor heads flagged in flight in queue `q`'s part (layout of vhost-user.rst).
    pub fn flagged(&self, q: usize) -> Vec<u16> {
        let Some(f) = &self.fd else {
            return Vec::new();
        };
        let qs = usize::from(self.info.queue_size);
        let part = (16 + 16 * qs).next_multiple_of(64);
        let mut buf = vec![0u8; part];
        f.read_exact_at(&mut buf, (self.info.mmap_offset as usize + q * part) as u64)
            .unwrap();
        (0..qs)
            .filter(|i| buf[16 + 16 * i] != 0)
            .map(|i| i as u16)
            .collect()
    }
}

/// One connection, as `VhostUserHandle`.
pub struct Ch {
    pub vu: Frontend,
    pub backend_features: u64,
    pub acked_features: u64,
    pub acked_protocol: VhostUserProtocolFeatures,
    /// The used rings' guest addresses and configs sent (`vrings_info`).
    vrings: Vec<VringConfigData>,
    used_gpa: Vec<u64>,
    shm_log: Option<File>,
}

impl Ch {
    /// `connect_vhost_user` (client mode): retry every 100 ms for up to 60 s, SET_OWNER,
    /// GET_FEATURES.
    pub fn connect(sock: &Path, num_queues: usize) -> Ch {
        let start = Instant::now();
        loop {
            let attempt = Frontend::connect(sock, num_queues as u64).and_then(|vu| {
                vu.set_owner()?;
                let f = vu.get_features()?;
                Ok((vu, f))
            });
            match attempt {
                Ok((vu, backend_features)) => {
                    return Ch {
                        vu,
                        backend_features,
                        acked_features: 0,
                        acked_protocol: VhostUserProtocolFeatures::empty(),
                        vrings: Vec::new(),
                        used_gpa: Vec::new(),
                        shm_log: None,
                    }
                }
                Err(e) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "Timed out waiting for vhost-user connection: {e:?}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// `negotiate_features_vhost_user`: (acked virtio features, acked protocol features).
    pub fn negotiate(&mut self, avail: u64, avail_proto: VhostUserProtocolFeatures) -> u64 {
        let acked = avail & self.backend_features;
        let proto = if acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let backend = self.vu.get_protocol_features().unwrap();
            let p = avail_proto & backend;
            self.vu.set_protocol_features(p).unwrap();
            p
        } else {
            VhostUserProtocolFeatures::empty()
        };
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        self.acked_protocol = proto;
        acked
    }

    /// `set_protocol_features_vhost_user` (reconnect, restore): the features acked before.
    pub fn set_protocol_features_again(&mut self, proto: VhostUserProtocolFeatures) {
        self.vu.set_protocol_features(proto).unwrap();
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        self.acked_protocol = proto;
    }

    /// GET_QUEUE_NUM (asked when MQ was acked).
    pub fn get_queue_num(&mut self) -> u64 {
        self.vu.get_queue_num().unwrap()
    }

    /// GET_CONFIG as `Blk::new` asks it: offset 0, 60 bytes, WRITABLE.
    pub fn get_config(&mut self) -> Vec<u8> {
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, cfg) = self
            .vu
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &buf)
            .unwrap();
        cfg
    }

    /// `setup_vhost_user` with `vring_bases` None: the bases are the guest's available indexes.
    pub fn setup(
        &mut self,
        mem: &Mem,
        rings: &[Ring],
        acked: u64,
        inflight: Option<&mut Inflight>,
    ) {
        self.setup_with_bases(mem, rings, acked, inflight, None)
    }

    /// `setup_vhost_user`; with `bases` (a migration's or a snapshot's, carried from
    /// `save_backend_state`) SET_VRING_BASE sends them instead of the available indexes.
    pub fn setup_with_bases(
        &mut self,
        mem: &Mem,
        rings: &[Ring],
        acked: u64,
        inflight: Option<&mut Inflight>,
        bases: Option<&[u64]>,
    ) {
        if let Some(b) = bases {
            assert_eq!(b.len(), rings.len(), "VringBasesCountMismatch");
        }
        let acked = acked & self.backend_features;
        self.vu.set_features(acked).unwrap();
        self.acked_features = acked;
        self.vu.set_mem_table(&region_info(mem)).unwrap();
        for (q, r) in rings.iter().enumerate() {
            self.vu.set_vring_num(q, r.size).unwrap();
        }
        // `VhostUserCommon::activate`: a region only when INFLIGHT_SHMFD was acked.
        let tracked = self
            .acked_protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        if let Some(inflight) = inflight.filter(|_| tracked) {
            if inflight.fd.is_none() {
                let req = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: rings.len() as u16,
                    queue_size: rings[0].size,
                };
                let (info, fd) = self.vu.get_inflight_fd(&req).unwrap();
                inflight.info = info;
                inflight.fd = Some(fd);
            }
            let fd = inflight.fd.as_ref().map(|f| f.as_raw_fd()).unwrap();
            self.vu.set_inflight_fd(&inflight.info, fd).unwrap();
        }
        self.vrings.clear();
        self.used_gpa.clear();
        for (q, r) in rings.iter().enumerate() {
            let config = VringConfigData {
                queue_max_size: r.size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: host_addr(mem, r.desc),
                used_ring_addr: host_addr(mem, r.used),
                avail_ring_addr: host_addr(mem, r.avail),
                log_addr: None,
            };
            self.vu.set_vring_addr(q, &config).unwrap();
            let base = match bases {
                Some(b) => b[q] as u16,
                None => r.avail_idx(mem),
            };
            self.vu.set_vring_base(q, base).unwrap();
            self.vu.set_vring_call(q, &r.call).unwrap();
            self.vu.set_vring_kick(q, &r.kick).unwrap();
            self.vrings.push(config);
            self.used_gpa.push(r.used);
        }
        for q in 0..rings.len() {
            self.vu.set_vring_enable(q, true).unwrap();
        }
    }

    /// `reset_vhost_user`: per queue SET_VRING_ENABLE 0, then GET_VRING_BASE.
    pub fn reset(&mut self, num_queues: usize) -> Vec<u32> {
        (0..num_queues)
            .map(|q| {
                self.vu.set_vring_enable(q, false).unwrap();
                self.vu.get_vring_base(q).unwrap()
            })
            .collect()
    }

    /// `pause_vhost_user`: SET_VRING_ENABLE 0 per queue, nothing waited for.
    pub fn pause(&mut self, num_queues: usize) {
        for q in 0..num_queues {
            self.vu.set_vring_enable(q, false).unwrap();
        }
    }

    /// `save_backend_state` (when DEVICE_STATE was acked, from the migration's `state()`):
    /// GET_VRING_BASE for every queue, SET_DEVICE_STATE_FD (save, STOPPED) with one end of a
    /// socket pair, the state read to EOF from the channel the backend chose, then
    /// CHECK_DEVICE_STATE. Returns (state, bases), or the first error as text.
    pub fn save_backend_state(&mut self, num_queues: usize) -> Result<(Vec<u8>, Vec<u64>), String> {
        let bases = (0..num_queues)
            .map(|q| self.vu.get_vring_base(q).map(u64::from))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| format!("VhostUserGetVringBase: {e}"))?;
        let (local, remote) = UnixStream::pair().unwrap();
        let mut read_file: File = match self
            .vu
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                remote.into(),
            )
            .map_err(|e| format!("VhostUserSetDeviceStateFd: {e}"))?
        {
            Some(f) => f,
            None => OwnedFd::from(local).into(),
        };
        let mut state = Vec::new();
        read_file
            .read_to_end(&mut state)
            .map_err(|e| format!("SaveRestoreBackendState: {e}"))?;
        self.vu
            .check_device_state()
            .map_err(|e| format!("VhostUserCheckDeviceState: {e}"))?;
        Ok((state, bases))
    }

    /// `restore_backend_state` (from `Blk::new` with a state, right after
    /// SET_PROTOCOL_FEATURES): SET_DEVICE_STATE_FD (load, STOPPED), the state written and the
    /// channel closed, then CHECK_DEVICE_STATE.
    pub fn restore_backend_state(&mut self, state: &[u8]) -> Result<(), String> {
        let (local, remote) = UnixStream::pair().unwrap();
        {
            let mut write_file: File = match self
                .vu
                .set_device_state_fd(
                    VhostTransferStateDirection::LOAD,
                    VhostTransferStatePhase::STOPPED,
                    remote.into(),
                )
                .map_err(|e| format!("VhostUserSetDeviceStateFd: {e}"))?
            {
                Some(f) => f,
                None => OwnedFd::from(local).into(),
            };
            write_file
                .write_all(state)
                .map_err(|e| format!("SaveRestoreBackendState: {e}"))?;
        }
        self.vu
            .check_device_state()
            .map_err(|e| format!("VhostUserCheckDeviceState: {e}"))
    }

    /// `add_memory_region` with CONFIGURE_MEM_SLOTS: ADD_MEM_REG of `mem`'s region at `gpa`.
    pub fn add_memory_region(&mut self, mem: &Mem, gpa: u64) {
        let r = region_info(mem)
            .into_iter()
            .find(|r| r.guest_phys_addr == gpa)
            .expect("the region to add is in the memory map");
        self.vu.add_mem_region(&r).unwrap();
    }

    /// `update_log_base`: a new sealed memfd log covering guest addresses up to
    /// `last_ram_addr`, handed over with SET_LOG_BASE; the previous log is returned.
    fn update_log_base(&mut self, last_ram_addr: u64) -> Option<File> {
        let size = last_ram_addr / (4096 * 8) + 1;
        let f = super::vring::memfd_sealable("vhost_user_dirty_log", size);
        let region = VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: 0,
            mmap_handle: f.as_raw_fd(),
        };
        self.vu.set_log_base(0, Some(region)).unwrap();
        self.shm_log.replace(f)
    }

    fn set_vring_logging(&mut self, enable: bool) {
        for (q, c) in self.vrings.clone().iter().enumerate() {
            let mut c = *c;
            c.flags = if enable {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            };
            c.log_addr = enable.then_some(self.used_gpa[q]);
            self.vu.set_vring_addr(q, &c).unwrap();
        }
    }

    /// `start_dirty_log`; panics (as cloud-hypervisor's `MigrationNotSupported`) unless
    /// LOG_ALL and LOG_SHMFD were both acked.
    pub fn start_dirty_log(&mut self, last_ram_addr: u64) {
        assert!(
            self.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
                && self
                    .acked_protocol
                    .contains(VhostUserProtocolFeatures::LOG_SHMFD),
            "Migration is not supported by this vhost-user device"
        );
        self.update_log_base(last_ram_addr);
        let f = self.acked_features | VhostUserVirtioFeatures::LOG_ALL.bits();
        self.vu.set_features(f).unwrap();
        self.set_vring_logging(true);
    }

    /// `dirty_log`: swap in a new log and return the old one's bytes (bit p%8 of byte p/8 for
    /// guest page p).
    pub fn dirty_log(&mut self, last_ram_addr: u64) -> Vec<u8> {
        let old = self.update_log_base(last_ram_addr).expect("a log was set");
        let mut v = vec![0u8; old.metadata().unwrap().len() as usize];
        old.read_exact_at(&mut v, 0).unwrap();
        v
    }

    pub fn stop_dirty_log(&mut self) {
        self.set_vring_logging(false);
        self.vu.set_features(self.acked_features).unwrap();
        self.shm_log = None;
    }
}

/// Whether guest page `gpa / 4096` is marked in a log.
pub fn page_dirty(log: &[u8], gpa: u64) -> bool {
    let p = gpa / 4096;
    log.get((p / 8) as usize)
        .is_some_and(|b| b & (1 << (p % 8)) != 0)
}
