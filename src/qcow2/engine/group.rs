//! Group commit for guest flushes.
//!
//! A guest flush must make durable every change that completed before it arrived. Changes are
//! counted (`Meta::changes`: links, table changes, completed writes). A sync that sampled the
//! count `c` before writing metadata and syncing covers every flush that arrived when the count
//! was at most `c`. So a flush that arrives while a sync runs waits for it, and then either is
//! covered (nothing to do) or starts the next sync, which covers every flush waiting with it:
//! concurrent flushes share one sync, and a flush with no change since the last sync costs none.

use crate::qcow2::error::Result;
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    /// A sync is running.
    running: bool,
    /// The change count covered by the last sync that finished without error.
    durable: u64,
    /// Syncs run and flushes that needed none, for tests and statistics.
    syncs: u64,
    skipped: u64,
}

/// See the module documentation.
#[derive(Default)]
pub(crate) struct GroupCommit {
    st: Mutex<State>,
    cond: Condvar,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; a poisoned lock still guards valid state.
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the changes counted up to `want` durable. `sync` writes metadata and syncs; it
    /// returns the change count it sampled before writing anything. It is called at most once
    /// at a time, and never with this gate's lock held.
    pub(crate) fn flush(&self, want: u64, sync: impl FnOnce() -> Result<u64>) -> Result<()> {
        let mut st = self.lock();
        loop {
            if st.durable >= want {
                st.skipped += 1;
                return Ok(());
            }
            if !st.running {
                break;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.running = true;
        st.syncs += 1;
        drop(st);
        let r = sync();
        let mut st = self.lock();
        st.running = false;
        if let Ok(c) = r {
            st.durable = st.durable.max(c);
        }
        drop(st);
        self.cond.notify_all();
        r.map(|_| ())
    }

    /// (syncs run, flushes that needed no sync of their own).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.syncs, st.skipped)
    }
}
