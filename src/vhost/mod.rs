//! The vhost-user transport: a `VhostUserBackend` with one worker thread per queue
//! ([`backend`]), and the daemon's main loop ([`serve`]): signals, one connection at a time on
//! one socket, reconnects, a periodic timer, the QMP control socket ([`control`]), clean
//! shutdown.

mod backend;
mod config;
mod control;
mod daemon;
mod sys;

pub use crate::aio::AioMode;
pub use backend::{device_features, BlkBackend};
pub use config::{ServeConfig, StopHandle, Tick, VhostError, DEFAULT_POOL_THREADS, DEFAULT_TICK};
pub use control::MAX_CLIENTS;
pub use daemon::serve;
