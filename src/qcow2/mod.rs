//! The qcow2 engine. It knows nothing about virtio: it serves byte ranges of a virtual disk.

pub mod check;
pub mod create;
pub mod engine;
pub mod error;
pub mod format;
pub mod hashindex;
pub mod info;
pub mod offsets;

pub use create::{create, CreateOptions};
pub use engine::{AckDurability, EngineStats, OpenOptions, ProgressHook, Qcow2};
pub use error::Qcow2Error;
