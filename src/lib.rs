//! vhost-user-qcow2: a vhost-user-blk backend with its own qcow2 engine.
//!
//! Layers import downward only: `vhost` (transport) -> `control` (QMP protocol of the control
//! socket) -> `virtio` (block requests) -> `qcow2` (engine) -> `storage`.

pub mod active;
pub mod aio;
pub mod block;
pub mod control;
pub mod qcow2;
pub mod raw;
pub mod signals;
pub mod storage;
pub mod vhost;
pub mod virtio;
