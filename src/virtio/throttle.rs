//! Rate-limited warnings: a guest that keeps sending failing or malformed requests (a full host
//! disk, a broken driver) must not flood the log, yet the first failure and a running count of
//! the rest stay visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets one message through per `interval`; counts the ones it holds back.
pub struct Throttle {
    base: Instant,
    interval: Duration,
    /// Nanoseconds after `base` before which no message passes (0: the next one passes).
    next_ns: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            base: Instant::now(),
            interval,
            next_ns: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a message may be logged at `now`, `n` being how many were held back
    /// since the last one that passed; `None` when this one is held back (and counted).
    pub fn permit(&self, now: Instant) -> Option<u64> {
        let at =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let next = self.next_ns.load(Ordering::Relaxed);
        let until = at.saturating_add(u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX));
        if at >= next
            && self
                .next_ns
                .compare_exchange(next, until.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The text to add to a message after `held` were held back.
pub fn held_note(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like it not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message_per_interval_with_the_count_of_the_rest() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = t.base;
        assert_eq!(t.permit(t0), Some(0));
        assert_eq!(t.permit(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.permit(t0 + Duration::from_millis(999)), None);
        assert_eq!(t.permit(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(t.permit(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.permit(t0 + Duration::from_secs(5)), Some(1));
        assert_eq!(held_note(0), "");
        assert_eq!(held_note(3), " (3 more like it not logged)");
    }
}
