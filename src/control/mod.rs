//! The control socket's protocol and commands: QMP as qemu-storage-daemon speaks it, kept
//! apart from sockets so it can be tested on its own. The daemon (`vhost`) accepts the
//! connections, moves the bytes and calls [`qmp::Session::feed`] with a [`commands::Commands`]
//! table; engine-side code emits events through an [`events::EventSender`].
//!
//! Layering: `vhost` -> `control` -> `virtio` (queue counters) and `qcow2` (engine, info).

pub mod commands;
pub mod events;
pub mod image;
pub mod qmp;

pub use commands::{
    Commands, DaemonView, DedupInfo, DedupMode, EngineStatsInfo, ImageControl, StatusInfo,
    DEDUP_NOT_ENABLED,
};
pub use events::{channel, Event, EventReceiver, EventSender};
pub use image::{PlainControl, Qcow2Control, SwitchControl, IMAGE_INACTIVE};
pub use qmp::{QmpError, Session, Version, MAX_MESSAGE};

/// The QEMU version the greeting announces: the QMP dialect this daemon follows.
pub const QMP_VERSION: Version = Version {
    major: 10,
    minor: 0,
    micro: 0,
};
