//! The vhost-user transport: a `VhostUserBackend` with one worker thread per queue, and the
//! daemon's main loop (signals, connections, a periodic timer).
