//! The backend's state for a migration (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`): what
//! SET_DEVICE_STATE_FD saves on the source and loads on the destination, and what
//! CHECK_DEVICE_STATE answers.
//!
//! A virtio-blk device keeps nothing beyond its rings: the image is shared storage and the
//! engine's state is in the file. What the frontend must be able to trust is that the rings
//! were quiesced: the only phase defined is STOPPED (every ring stopped by GET_VRING_BASE,
//! which waits for the requests in flight), and a save refuses to run unless every queue this
//! connection started is stopped, has nothing in flight and has put every request it took in
//! the used ring. The ring positions then travel with the frontend (GET_VRING_BASE on the
//! source, SET_VRING_BASE on the destination).
//!
//! The state is a small versioned record, so that a destination that serves another disk, or
//! a daemon that does not know the format, fails loudly at CHECK_DEVICE_STATE instead of
//! resuming a guest on the wrong device. Little-endian:
//!
//! ```text
//!  0  magic "VUQCOW2S"        8 bytes
//!  8  version (1)             u32
//! 12  total length in bytes   u32   (32 + 4 * queues)
//! 16  capacity in sectors     u64
//! 24  flags                   u32   bit 0: read-only; bit 1: write cache on (CONFIG_WCE)
//! 28  queues                  u16   (queues 0..n, up to the highest one started)
//! 30  reserved                u16
//! 32  per queue: size u16, next available index u16 (size 0: never started)
//! ```
//!
//! The write cache flag is the one piece of device state a guest sets (CONFIG_WCE through
//! SET_CONFIG); a loaded state applies it, so a guest that turned the cache off keeps its
//! write-through semantics on the destination.
//!
//! The transfer itself runs on a thread of its own: the frontend reads (save) or writes
//! (load) the channel only after SET_DEVICE_STATE_FD's reply, so the handler must not block
//! on it. CHECK_DEVICE_STATE waits for that thread (bounded) and reports its result.

use std::fs::File;
use std::io::{self, Read, Write};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use virtio_queue::QueueT;

use super::backend::BlkBackend;

/// First bytes of every state this daemon writes.
pub const MAGIC: [u8; 8] = *b"VUQCOW2S";
/// The only format version defined.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const QUEUE_LEN: usize = 4;
/// A state larger than this is not ours (64 queues take 288 bytes).
const MAX_LEN: usize = 64 << 10;
const FLAG_READ_ONLY: u32 = 1;
const FLAG_WRITEBACK: u32 = 2;
/// How long CHECK_DEVICE_STATE waits for the transfer to end (the frontend has closed or
/// read its end before it asks, so this is only reached by a frontend that did not).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device state transfer in phase {0:?}: only STOPPED is supported")]
    Phase(VhostTransferStatePhase),
    #[error("queue {0} is still running: stop every ring (GET_VRING_BASE) before saving")]
    Running(usize),
    #[error("queue {queue}: {count} requests still in flight")]
    InFlight { queue: usize, count: usize },
    #[error("queue {queue}: {count} requests taken and not in the used ring")]
    Unfinished { queue: usize, count: u16 },
    #[error("a device state transfer is still under way (its channel is still open)")]
    Busy,
    #[error("state transfer: {0}")]
    Io(#[from] io::Error),
    #[error("state of more than {MAX_LEN} bytes: not a vhost-user-qcow2 device state")]
    TooLarge,
    #[error("state of {got} bytes, expected {need} (truncated or not ours)")]
    Length { got: usize, need: usize },
    #[error("not a vhost-user-qcow2 device state (starts with {0:02x?})")]
    Magic(Vec<u8>),
    #[error("device state version {0}; this daemon reads version {VERSION}")]
    Version(u32),
    #[error("the source served {src} sectors, this daemon serves {dst}")]
    Capacity { src: u64, dst: u64 },
    #[error("the source was {}, this daemon is {}", rw(*.src), rw(*.dst))]
    ReadOnly { src: bool, dst: bool },
    #[error("the source used {src} queues, this daemon offers {dst}")]
    Queues { src: usize, dst: usize },
    #[error("the source's queue {queue} has {src} descriptors, this daemon allows up to {dst}")]
    QueueSize { queue: usize, src: u16, dst: u16 },
    #[error("no device state transfer to check")]
    NoTransfer,
    #[error("the device state transfer did not end within {0:?}")]
    Timeout(Duration),
    #[error("the device state transfer thread died")]
    ThreadDied,
    #[error("{0}")]
    Earlier(String),
}

fn rw(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

/// One queue in a state: its size and where the available ring continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub size: u16,
    pub next_avail: u16,
}

/// What a state says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub capacity: u64,
    pub read_only: bool,
    pub writeback: bool,
    pub queues: Vec<QueueState>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        let len = HEADER_LEN + QUEUE_LEN * self.queues.len();
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        b.extend_from_slice(&self.capacity.to_le_bytes());
        let flags = if self.read_only { FLAG_READ_ONLY } else { 0 }
            | if self.writeback { FLAG_WRITEBACK } else { 0 };
        b.extend_from_slice(&flags.to_le_bytes());
        let n = u16::try_from(self.queues.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        for q in &self.queues {
            b.extend_from_slice(&q.size.to_le_bytes());
            b.extend_from_slice(&q.next_avail.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Snapshot, StateError> {
        let short = || StateError::Length {
            got: b.len(),
            need: HEADER_LEN,
        };
        let magic = b.get(..8).ok_or_else(short)?;
        if magic != MAGIC {
            return Err(StateError::Magic(magic.to_vec()));
        }
        let version = u32::from_le_bytes(array(b, 8).ok_or_else(short)?);
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let capacity = u64::from_le_bytes(array(b, 16).ok_or_else(short)?);
        let flags = u32::from_le_bytes(array(b, 24).ok_or_else(short)?);
        let n = usize::from(u16::from_le_bytes(array(b, 28).ok_or_else(short)?));
        let need = HEADER_LEN + QUEUE_LEN * n;
        let said = u32::from_le_bytes(array(b, 12).ok_or_else(short)?);
        if b.len() != need || usize::try_from(said).ok() != Some(need) {
            return Err(StateError::Length { got: b.len(), need });
        }
        let queues = b[HEADER_LEN..]
            .chunks_exact(QUEUE_LEN)
            .map(|c| QueueState {
                size: u16::from_le_bytes([c[0], c[1]]),
                next_avail: u16::from_le_bytes([c[2], c[3]]),
            })
            .collect();
        Ok(Snapshot {
            capacity,
            read_only: flags & FLAG_READ_ONLY != 0,
            writeback: flags & FLAG_WRITEBACK != 0,
            queues,
        })
    }

    /// The state of `backend`, whose rings must all be stopped and quiesced.
    fn of(backend: &BlkBackend) -> Result<Snapshot, StateError> {
        let mut queues = Vec::new();
        for q in 0..backend.num_queues() {
            // Queues this connection never started have no executor and nothing to say.
            let Some(count) = backend.in_flight(q) else {
                continue;
            };
            let v = backend.vring(q).ok_or(StateError::Running(q))?;
            if v.started() {
                return Err(StateError::Running(q));
            }
            if count > 0 {
                return Err(StateError::InFlight { queue: q, count });
            }
            let (next_avail, next_used) = (v.queue.next_avail(), v.queue.next_used());
            if next_avail != next_used {
                let count = next_avail.wrapping_sub(next_used);
                return Err(StateError::Unfinished { queue: q, count });
            }
            queues.resize(
                q,
                QueueState {
                    size: 0,
                    next_avail: 0,
                },
            );
            queues.push(QueueState {
                size: v.queue.size(),
                next_avail,
            });
        }
        Ok(Snapshot {
            capacity: sectors(backend),
            read_only: backend.ctx.dev.read_only(),
            writeback: backend
                .ctx
                .writeback
                .load(std::sync::atomic::Ordering::Relaxed),
            queues,
        })
    }

    /// Whether `backend` can take over a guest this state was saved from.
    fn fits(&self, backend: &BlkBackend) -> Result<(), StateError> {
        let dst = sectors(backend);
        if self.capacity != dst {
            return Err(StateError::Capacity {
                src: self.capacity,
                dst,
            });
        }
        let dst = backend.ctx.dev.read_only();
        if self.read_only != dst {
            return Err(StateError::ReadOnly {
                src: self.read_only,
                dst,
            });
        }
        if self.queues.len() > backend.num_queues() {
            return Err(StateError::Queues {
                src: self.queues.len(),
                dst: backend.num_queues(),
            });
        }
        for (queue, q) in self.queues.iter().enumerate() {
            if q.size > backend.queue_size {
                return Err(StateError::QueueSize {
                    queue,
                    src: q.size,
                    dst: backend.queue_size,
                });
            }
        }
        Ok(())
    }
}

/// The capacity the guest is told now (GET_CONFIG's; `block_resize` changes it).
fn sectors(backend: &BlkBackend) -> u64 {
    backend.ctx.dev.capacity() / crate::virtio::SECTOR_SIZE
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

enum Pending {
    Save(JoinHandle<Result<(), StateError>>),
    Load(JoinHandle<Result<Snapshot, StateError>>),
    Failed(String),
}

/// The device state transfer of one connection: at most one under way.
#[derive(Default)]
pub(crate) struct DeviceState {
    pending: Option<Pending>,
    /// Where the source stopped each queue, from the state loaded: compared once with where
    /// each ring starts here.
    loaded: Vec<Option<QueueState>>,
}

impl DeviceState {
    /// SET_DEVICE_STATE_FD: start saving into, or loading from, the frontend's channel `fd`
    /// (we never offer a channel of our own). An error here is also what the next
    /// CHECK_DEVICE_STATE answers.
    pub(crate) fn set_fd(
        &mut self,
        backend: &BlkBackend,
        dir: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> Result<(), StateError> {
        // One transfer thread at a time: one blocked on a channel the frontend keeps open
        // must not be joined by another per message.
        if let Some(Pending::Save(h)) = &self.pending {
            if !h.is_finished() {
                return Err(StateError::Busy);
            }
        }
        if let Some(Pending::Load(h)) = &self.pending {
            if !h.is_finished() {
                return Err(StateError::Busy);
            }
        }
        let started = start(backend, dir, phase, fd);
        self.pending = Some(match started {
            Ok(p) => p,
            Err(e) => {
                warn!("device state {dir:?}: {e}");
                Pending::Failed(e.to_string())
            }
        });
        match &self.pending {
            Some(Pending::Failed(msg)) => Err(StateError::Earlier(msg.clone())),
            _ => Ok(()),
        }
    }

    /// CHECK_DEVICE_STATE: wait for the transfer to end; a loaded state must fit this
    /// daemon, and its write cache flag is applied.
    pub(crate) fn check(&mut self, backend: &BlkBackend) -> Result<(), StateError> {
        let r = match self.pending.take().ok_or(StateError::NoTransfer)? {
            Pending::Failed(msg) => Err(StateError::Earlier(msg)),
            Pending::Save(h) => join(h).map(|()| info!("device state saved")),
            Pending::Load(h) => join(h).and_then(|s| {
                s.fits(backend)?;
                backend
                    .ctx
                    .writeback
                    .store(s.writeback, std::sync::atomic::Ordering::Relaxed);
                info!(
                    "device state loaded: write cache {}, queue positions {:?}",
                    if s.writeback { "on" } else { "off" },
                    s.queues.iter().map(|q| q.next_avail).collect::<Vec<_>>()
                );
                self.loaded = s
                    .queues
                    .iter()
                    .map(|q| Some(*q).filter(|q| q.size > 0))
                    .collect();
                Ok(())
            }),
        };
        if let Err(e) = &r {
            warn!("device state check failed: {e}");
        }
        r
    }
}

impl DeviceState {
    /// Queue `queue` has started: after a loaded state, it should continue where the source
    /// stopped. A ring that starts elsewhere means guest memory older or newer than the state
    /// (requests would run twice or never complete): said loudly, once.
    pub(crate) fn ring_started(&mut self, backend: &BlkBackend, queue: usize) {
        let Some(src) = self.loaded.get_mut(queue).and_then(Option::take) else {
            return;
        };
        let Some(v) = backend.vring(queue) else {
            return;
        };
        let here = v.queue.next_avail();
        if here != src.next_avail {
            warn!(
                "queue {queue} starts at available index {here}, the source stopped at {}: \
                 guest memory and the device state disagree",
                src.next_avail
            );
        }
    }
}

fn start(
    backend: &BlkBackend,
    dir: VhostTransferStateDirection,
    phase: VhostTransferStatePhase,
    mut fd: File,
) -> Result<Pending, StateError> {
    if phase != VhostTransferStatePhase::STOPPED {
        return Err(StateError::Phase(phase));
    }
    let spawn = |name: &str| std::thread::Builder::new().name(name.to_string());
    Ok(match dir {
        VhostTransferStateDirection::SAVE => {
            let snap = Snapshot::of(backend)?;
            info!(
                "saving the device state: queue positions {:?}",
                snap.queues.iter().map(|q| q.next_avail).collect::<Vec<_>>()
            );
            let bytes = snap.encode();
            // The descriptor is closed when the thread ends: that is the end of the state.
            Pending::Save(spawn("state-save").spawn(move || Ok(fd.write_all(&bytes)?))?)
        }
        VhostTransferStateDirection::LOAD => {
            Pending::Load(spawn("state-load").spawn(move || {
                let mut b = Vec::new();
                (&mut fd).take(MAX_LEN as u64 + 1).read_to_end(&mut b)?;
                if b.len() > MAX_LEN {
                    return Err(StateError::TooLarge);
                }
                Snapshot::decode(&b)
            })?)
        }
    })
}

/// The transfer thread's result, waiting at most `TRANSFER_TIMEOUT` for it.
fn join<T>(h: JoinHandle<Result<T, StateError>>) -> Result<T, StateError> {
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    while !h.is_finished() {
        if Instant::now() >= deadline {
            // The thread stays blocked on a channel the frontend never closed.
            return Err(StateError::Timeout(TRANSFER_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    h.join().map_err(|_| StateError::ThreadDied)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            capacity: 131072,
            read_only: false,
            writeback: true,
            queues: vec![
                QueueState {
                    size: 128,
                    next_avail: 65535,
                },
                QueueState {
                    size: 0,
                    next_avail: 0,
                },
                QueueState {
                    size: 256,
                    next_avail: 7,
                },
            ],
        }
    }

    #[test]
    fn a_state_reads_back_as_written() {
        let s = sample();
        let b = s.encode();
        assert_eq!(b.len(), 32 + 3 * 4);
        assert_eq!(&b[..8], b"VUQCOW2S");
        assert_eq!(Snapshot::decode(&b).unwrap(), s);
        let empty = Snapshot {
            queues: Vec::new(),
            ..s
        };
        assert_eq!(Snapshot::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn a_foreign_or_damaged_state_is_refused() {
        let b = sample().encode();
        assert!(matches!(
            Snapshot::decode(&[]),
            Err(StateError::Length { got: 0, .. })
        ));
        assert!(matches!(
            Snapshot::decode(&b[..b.len() - 1]),
            Err(StateError::Length { .. })
        ));
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Snapshot::decode(&long),
            Err(StateError::Length { .. })
        ));
        let mut m = b.clone();
        m[0] = b'X';
        assert!(matches!(Snapshot::decode(&m), Err(StateError::Magic(_))));
        let mut v = b.clone();
        v[8] = 2;
        assert!(matches!(Snapshot::decode(&v), Err(StateError::Version(2))));
        let mut n = b;
        n[28] = 4;
        assert!(matches!(
            Snapshot::decode(&n),
            Err(StateError::Length { need: 48, .. })
        ));
    }
}
