//! The qcow2 engine: open, validate, and serve reads and writes of a qcow2 image.
//!
//! One mutex guards the engine's state (`state::State`: the metadata core `Meta` and the dedup
//! state beside it). A request takes it only to build a plan (which host ranges to touch); data
//! moves between the caller's buffers and the file outside the lock.
//! Allocating writes reserve their clusters first and link them in the L2 table after the data
//! is written; a guest cluster being allocated is marked in flight so a second writer waits.

mod backing;
mod clustermap;
mod compress;
pub mod dedup;
mod direct;
mod group;
mod guard;
mod image;
mod io;
mod iov;
mod l2cache;
mod loading;
mod meta;
mod open;
pub mod overlap;
mod persist;
mod refcount;
mod resize;
mod sharing;
mod state;
mod writeback;
mod zero;

pub use backing::resolve as resolve_backing;
pub use dedup::background::DedupWorker;
pub use dedup::{DedupStats, IndexOpenReport};
pub use meta::EngineStats;
pub use overlap::OverlapMode;

pub use image::{AckDurability, CorruptionListener, OpenOptions, ProgressHook, Qcow2};
