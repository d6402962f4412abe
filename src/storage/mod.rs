//! The one narrow storage trait under the qcow2 engine, with a real-file implementation, an
//! in-memory one and a fault-injecting one (crash simulation).

mod direct;
mod fault;
mod file;
pub mod lock;
mod mem;
mod traits;

pub use fault::{CrashMode, FaultStorage};
pub use file::FileStorage;
pub use mem::MemStorage;
pub use traits::Storage;
