//! The queue worker threads: each waits on its queues' kick eventfds (registered while a ring
//! is started and enabled) and completion eventfds, takes new requests on a kick and puts
//! finished ones in the used ring as they arrive.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::config::VhostError;
use super::sys::Epoll;

/// The epoll token of the exit event; queue tokens are `2 * queue` (kick) and `2 * queue + 1`
/// (completions).
const TOKEN_EXIT: u64 = u64::MAX;

fn kick_token(queue: usize) -> u64 {
    2 * queue as u64
}

/// A running worker thread.
pub(crate) struct Worker {
    epoll: Arc<Epoll>,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Start a worker of `backend`; queues are given to it with `watch_kick` and
    /// `watch_completions`.
    /// `poll`: how long the thread keeps looking for events without sleeping after its last
    /// one.
    pub(crate) fn spawn(
        backend: Arc<BlkBackend>,
        name: String,
        poll: Duration,
    ) -> Result<Self, VhostError> {
        let io = |what| move |source| VhostError::Io { what, source };
        let epoll = Arc::new(Epoll::new()?);
        let exit = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
        epoll.add(exit.as_raw_fd(), TOKEN_EXIT)?;
        let ep = epoll.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&backend, &ep, poll))
            .map_err(io("spawning a queue worker"))?;
        Ok(Worker {
            epoll,
            exit,
            thread: Some(thread),
        })
    }

    /// Watch queue `queue`'s completion eventfd `fd` (again: no effect).
    pub(crate) fn watch_completions(&self, queue: usize, fd: RawFd) {
        self.watch(queue, fd, kick_token(queue) + 1, true);
    }

    /// Start (`on`) or stop watching queue `queue`'s kick eventfd `fd`.
    pub(crate) fn watch_kick(&self, queue: usize, fd: RawFd, on: bool) {
        self.watch(queue, fd, kick_token(queue), on);
    }

    fn watch(&self, queue: usize, fd: RawFd, token: u64, on: bool) {
        let r = if on {
            match self.epoll.add(fd, token) {
                // Already watched: enabling an enabled ring again.
                Err(VhostError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    Ok(())
                }
                r => r,
            }
        } else {
            self.epoll.del(fd).or(Ok(()))
        };
        if let Err(e) = r {
            warn!("queue {queue}: {e}");
        }
    }

    /// Stop the thread and wait for it.
    pub(crate) fn stop(&mut self) {
        let _ = self.exit.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("a queue worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(backend: &BlkBackend, epoll: &Epoll, poll: Duration) {
    let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 16];
    // Busy polling (opt-in): until `poll_until`, look for events without sleeping. A kick or
    // a completion is then taken without the wake-up of a sleeping thread; the ring's
    // completions are posted on the syscall's way back, so polling epoll sees them too.
    let mut poll_until: Option<Instant> = None;
    loop {
        let timeout = match poll_until {
            Some(t) if Instant::now() < t => 0,
            _ => -1,
        };
        let n = match epoll::wait(epoll.fd(), timeout, &mut events) {
            Ok(0) => continue,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("a queue worker cannot wait for events: {e}");
                return;
            }
        };
        if !poll.is_zero() {
            poll_until = Instant::now().checked_add(poll);
        }
        for ev in events.iter().take(n) {
            let token = ev.data; // a copy: Event is packed
            if token == TOKEN_EXIT {
                return;
            }
            let queue = usize::try_from(token / 2).unwrap_or(usize::MAX);
            // Each call drains its own eventfd under the lock it takes anyway: the kick in
            // `process_queue`, the completion event in the executor's `reap`.
            let r = if token % 2 == 0 {
                // An error here is a broken ring (bad addresses from the driver); the thread
                // stays for the next kick.
                backend.process_queue(queue)
            } else {
                backend.complete_queue(queue)
            };
            if let Err(e) = r {
                warn!("{e}");
            }
        }
    }
}
