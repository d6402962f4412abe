//! Asynchronous execution under the request layer: an io_uring per queue thread for plain
//! reads and writes on a file, and a shared thread pool for everything that must block (the
//! engine's own paths: allocating writes, flushes, discards, cache misses). Both report to the
//! submitter through one eventfd per queue, which its event loop polls.
//!
//! This layer knows file descriptors, buffers and closures; nothing about virtio or qcow2.

mod pool;
mod uring;

pub use pool::Pool;
pub use uring::{Ring, RingOp};

/// How a daemon runs its data I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring for plain reads and writes, the pool for the rest; the pool alone when a ring
    /// cannot be set up (logged).
    IoUring,
    /// The pool for everything.
    Threads,
}
