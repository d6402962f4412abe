//! The vhost-user transport: the request handler of a frontend connection ([`handler`], on
//! the `vhost` crate), the queues' state and their worker threads ([`backend`], [`vring`],
//! [`worker`]), the inflight region that lets a restarted daemon take over requests in flight
//! ([`inflight_fd`]), the device state a migration carries ([`device_state`]), and the daemon's main loop ([`serve`]): signals, one connection at a
//! time on one socket, reconnects, a periodic timer, the QMP control socket ([`control`]),
//! clean shutdown.

mod backend;
mod backend_channel;
mod config;
mod control;
mod daemon;
mod device_state;
pub mod dirty_log;
mod handler;
pub mod inflight_fd;
mod sys;
mod vring;
mod worker;

pub use crate::aio::AioMode;
pub use backend::{device_features, BlkBackend};
pub use config::{
    Handover, ServeConfig, StopHandle, Tick, VhostError, DEFAULT_NUM_QUEUES, DEFAULT_POOL_THREADS,
    DEFAULT_TICK, MAX_NUM_QUEUES,
};
pub use control::MAX_CLIENTS;
pub use daemon::serve;
