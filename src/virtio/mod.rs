//! The virtio-blk request layer: parse a descriptor chain, validate it, run it against a
//! [`BlockDevice`](crate::block::BlockDevice) straight in guest memory, and write the status.
//!
//! This layer knows virtio (descriptors, headers, status codes) and the block-device trait; it
//! knows nothing about vhost-user or qcow2. Engine errors become `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP` here and only here.

mod config;
mod consts;
mod exec;
mod inflight;
mod queue;
mod request;
mod stats;
mod throttle;
mod walk;

pub use config::{BlkConfig, CONFIG_SPACE_SIZE};
pub use consts::*;
pub use exec::{process_chain, DeviceCtx};
pub use inflight::{InflightError, InflightTable, Slot};
pub use queue::QueueExec;
pub use request::{parse_chain, ParseError, Request, RequestType, Segment};
pub use stats::{Histogram, QueueSnapshot, QueueStats, LATENCY_BOUNDS_US};
pub use walk::{chain_at, WalkError};

#[cfg(test)]
mod tests;
