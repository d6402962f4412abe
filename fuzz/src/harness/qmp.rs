//! Target `qmp`: the QMP framer and command dispatch. The input (after its first byte) is the
//! byte stream a control-socket client sends; it is fed to a fresh session twice, once in one
//! piece and once cut into chunks whose sizes the first byte picks, each time with the real
//! command table over a daemon stand-in and a real engine (an in-memory qcow2 image with
//! deduplication, so the dedup commands act). The two replies must be the same byte for byte:
//! framing may not depend on how the stream is cut.

use super::{backing, Cursor, STORAGE_CAP};
use std::sync::Arc;
use vhost_user_qcow2::control::commands::{Commands, DaemonView, ImageControl, StatusInfo};
use vhost_user_qcow2::control::{Qcow2Control, Session, QMP_VERSION};
use vhost_user_qcow2::qcow2::{create, CreateOptions, OpenOptions, Qcow2};
use vhost_user_qcow2::storage::MemStorage;
use vhost_user_qcow2::virtio::{QueueSnapshot, QueueStats};

/// Longest stream fed (well under `MAX_MESSAGE`, so chunking cannot change where it trips).
pub const MAX_INPUT: usize = 64 << 10;

struct Daemon {
    queues: Vec<QueueStats>,
    quit: bool,
}

impl DaemonView for Daemon {
    fn status(&self) -> StatusInfo {
        StatusInfo {
            status: "running".into(),
            running: true,
            singlestep: false,
            vmm_connected: !self.quit,
            read_only: false,
            active: true,
        }
    }
    fn queue_stats(&self) -> Vec<QueueSnapshot> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.snapshot(i as u16))
            .collect()
    }
    fn quit(&mut self) {
        self.quit = true;
    }
}

/// A fresh 4 MiB image with inline dedup on capped in-memory storage.
fn engine() -> Arc<Qcow2> {
    let s = Arc::new(MemStorage::with_cap(Vec::new(), STORAGE_CAP));
    let o = CreateOptions {
        size: 4 << 20,
        cluster_bits: 12,
        dedup: true,
        ..Default::default()
    };
    create(s.as_ref(), &o).expect("create");
    let opts = OpenOptions {
        dedup_cache_bytes: Some(1 << 20),
        ..Default::default()
    };
    Arc::new(Qcow2::open_storage(s, &opts, None, 0).expect("open"))
}

/// Feeds `stream` in pieces of the sizes `cuts` yields; returns the replies and whether the
/// session asked to be closed.
fn session(stream: &[u8], cuts: &mut dyn FnMut() -> usize) -> (Vec<u8>, bool) {
    let image = Qcow2Control {
        engine: engine(),
        path: backing::dir().join("base.qcow2"),
    };
    let mut daemon = Daemon {
        queues: vec![QueueStats::default(), QueueStats::default()],
        quit: false,
    };
    let mut out = Session::greeting(QMP_VERSION, "fuzz");
    let mut s = Session::new();
    let mut rest = stream;
    let mut closed = false;
    while !rest.is_empty() {
        let (a, b) = rest.split_at(cuts().clamp(1, rest.len()));
        rest = b;
        let mut h = Commands {
            daemon: &mut daemon,
            image: &image as &dyn ImageControl,
            version: QMP_VERSION,
        };
        if s.feed(a, &mut h, &mut out).is_err() {
            closed = true;
            break;
        }
    }
    let _ = image.engine.close();
    (out, closed)
}

pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let seed = c.u8();
    let stream = c.rest();
    let stream = &stream[..stream.len().min(MAX_INPUT)];
    let whole = session(stream, &mut || usize::MAX);
    // Chunk sizes 1..=16 from a small LCG seeded by the first byte.
    let mut x = u32::from(seed) | 1;
    let cut = session(stream, &mut || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        1 + (x >> 16) as usize % 16
    });
    assert_eq!(
        whole, cut,
        "replies differ when the stream is cut (seed {seed})"
    );
}
