//! The progress of an index rebuild (see `rebuild`): the guest cluster ranges still to hash and
//! the counters `query-dedup` shows. Kept apart from the rebuild's steps so that the dedup state
//! can hold it without importing them.

use std::collections::VecDeque;
use std::time::Instant;

/// The rebuild still to do: guest cluster ranges, in order.
pub(crate) struct Rebuild {
    pub(super) todo: VecDeque<(u64, u64)>,
    /// Guest clusters in the ranges at the start, and passed since.
    pub(super) total: u64,
    pub(super) done: u64,
    /// Data clusters read and hashed; results put in; clusters that became pending; clusters
    /// whose record changed while they were read (left to their writer); failed reads.
    pub(super) hashed: u64,
    pub(super) hints: u64,
    pub(super) pending: u64,
    pub(super) changed: u64,
    pub(super) read_errors: u64,
    /// A batch is between its first and last lock section (one batch at a time).
    pub(super) busy: bool,
    /// Stopped by an error: not run again this session (the close keeps the resume point).
    pub(super) failed: bool,
    pub(super) started: Instant,
}

impl Rebuild {
    /// A rebuild of guest clusters `ranges` (any order, may overlap); None when they are empty.
    pub(super) fn new(mut ranges: Vec<(u64, u64)>) -> Option<Rebuild> {
        ranges.retain(|(a, b)| a < b);
        ranges.sort_unstable();
        let mut todo: VecDeque<(u64, u64)> = VecDeque::new();
        for (a, b) in ranges {
            match todo.back_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => todo.push_back((a, b)),
            }
        }
        let total = todo.iter().map(|(a, b)| b - a).sum();
        (total > 0).then(|| Rebuild {
            todo,
            total,
            done: 0,
            hashed: 0,
            hints: 0,
            pending: 0,
            changed: 0,
            read_errors: 0,
            busy: false,
            failed: false,
            started: Instant::now(),
        })
    }

    /// The first guest cluster not done: a later open goes on from there.
    pub(super) fn resume_point(&self) -> Option<u64> {
        self.todo.front().map(|r| r.0)
    }

    /// Work left that may be done this session.
    pub(super) fn runnable(&self) -> bool {
        !self.failed && !self.todo.is_empty()
    }

    /// Everything below guest cluster `to` is done.
    pub(super) fn advance(&mut self, to: u64) {
        while let Some(r) = self.todo.front_mut() {
            let next = to.clamp(r.0, r.1);
            self.done += next - r.0;
            r.0 = next;
            if r.0 < r.1 {
                break;
            }
            self.todo.pop_front();
        }
    }
}
