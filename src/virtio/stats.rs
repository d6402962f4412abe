//! Per-queue request counters: relaxed atomics bumped by the queue's own worker thread (one
//! writer per queue, on its own cache line), read by the control socket at any time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

use super::request::RequestType;

/// Upper bounds of the latency bins in microseconds: 1, 2, 4, ... 2^20 (about 1 s). There is
/// one more bin than bounds: the last holds everything slower.
pub const LATENCY_BOUNDS_US: usize = 21;
const BINS: usize = LATENCY_BOUNDS_US + 1;

/// Live counters of one queue.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct QueueStats {
    read: AtomicU64,
    write: AtomicU64,
    flush: AtomicU64,
    discard: AtomicU64,
    write_zeroes: AtomicU64,
    other: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    bins: [AtomicU64; BINS],
    /// A frontend started this queue at least once.
    started: std::sync::atomic::AtomicBool,
}

fn bin_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    // [2^(i-1), 2^i) us lands in bin i; below 1 us in bin 0.
    let i = (u64::BITS - us.leading_zeros()) as usize;
    i.min(BINS - 1)
}

impl QueueStats {
    /// Note that a frontend started the queue (only such queues are listed).
    pub fn mark_started(&self) {
        self.started.store(true, Relaxed);
    }

    /// True once a frontend started the queue or it counted a request.
    pub fn used(&self) -> bool {
        self.started.load(Relaxed) || self.snapshot(0).requests > 0
    }

    /// Count one finished request of `kind` that moved `bytes` of data.
    pub fn record(&self, kind: Option<RequestType>, bytes: u64, ok: bool, latency: Duration) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Relaxed);
        };
        match kind {
            Some(RequestType::In) => {
                add(&self.read, 1);
                if ok {
                    add(&self.bytes_read, bytes);
                }
            }
            Some(RequestType::Out) => {
                add(&self.write, 1);
                if ok {
                    add(&self.bytes_written, bytes);
                }
            }
            Some(RequestType::Flush) => add(&self.flush, 1),
            Some(RequestType::Discard) => add(&self.discard, 1),
            Some(RequestType::WriteZeroes) => add(&self.write_zeroes, 1),
            Some(RequestType::GetId) | Some(RequestType::Unsupported(_)) | None => {
                add(&self.other, 1)
            }
        }
        if !ok {
            add(&self.errors, 1);
        }
        add(&self.bins[bin_of(latency)], 1);
    }

    /// Set the gauge of requests in flight (taken from the ring, not completed).
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Relaxed);
    }

    /// The counters now (each read on its own: a snapshot taken under load may be off by the
    /// requests finishing meanwhile).
    pub fn snapshot(&self, queue: u16) -> QueueSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let read_requests = g(&self.read);
        let write_requests = g(&self.write);
        let flush_requests = g(&self.flush);
        let discard_requests = g(&self.discard);
        let write_zeroes_requests = g(&self.write_zeroes);
        let other_requests = g(&self.other);
        QueueSnapshot {
            queue,
            requests: read_requests
                + write_requests
                + flush_requests
                + discard_requests
                + write_zeroes_requests
                + other_requests,
            read_requests,
            write_requests,
            flush_requests,
            discard_requests,
            write_zeroes_requests,
            other_requests,
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            errors: g(&self.errors),
            in_flight: g(&self.in_flight),
            latency_histogram: Histogram {
                boundaries_us: (0..LATENCY_BOUNDS_US).map(|i| 1u64 << i).collect(),
                bins: self.bins.iter().map(g).collect(),
            },
        }
    }
}

/// Latency histogram as QEMU's `BlockLatencyHistogramInfo`: `bins` has one entry more than
/// `boundaries-us`; bin i counts latencies below boundary i (and at or above boundary i-1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Histogram {
    pub boundaries_us: Vec<u64>,
    pub bins: Vec<u64>,
}

/// A queue's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueueSnapshot {
    pub queue: u16,
    pub requests: u64,
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    pub discard_requests: u64,
    pub write_zeroes_requests: u64,
    /// GET_ID, unsupported and malformed requests.
    pub other_requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    /// Requests in flight at the moment of the snapshot (a gauge, not a counter).
    pub in_flight: u64,
    pub latency_histogram: Histogram,
}

impl QueueSnapshot {
    /// Add `o`'s counters to these (for totals).
    pub fn add(&mut self, o: &QueueSnapshot) {
        self.requests += o.requests;
        self.read_requests += o.read_requests;
        self.write_requests += o.write_requests;
        self.flush_requests += o.flush_requests;
        self.discard_requests += o.discard_requests;
        self.write_zeroes_requests += o.write_zeroes_requests;
        self.other_requests += o.other_requests;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.errors += o.errors;
        self.in_flight += o.in_flight;
        let h = &mut self.latency_histogram;
        if h.boundaries_us.is_empty() {
            h.boundaries_us = o.latency_histogram.boundaries_us.clone();
            h.bins = vec![0; o.latency_histogram.bins.len()];
        }
        for (a, b) in h.bins.iter_mut().zip(&o.latency_histogram.bins) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_powers_of_two_microseconds() {
        assert_eq!(bin_of(Duration::from_nanos(500)), 0);
        assert_eq!(bin_of(Duration::from_micros(1)), 1);
        assert_eq!(bin_of(Duration::from_micros(3)), 2);
        assert_eq!(bin_of(Duration::from_micros(4)), 3);
        assert_eq!(bin_of(Duration::from_secs(10)), BINS - 1);
    }

    #[test]
    fn record_and_sum() {
        let s = QueueStats::default();
        s.record(Some(RequestType::In), 4096, true, Duration::from_micros(10));
        s.record(Some(RequestType::Out), 512, true, Duration::from_micros(10));
        s.record(
            Some(RequestType::Out),
            512,
            false,
            Duration::from_micros(10),
        );
        s.record(None, 0, false, Duration::ZERO);
        let a = s.snapshot(0);
        assert_eq!(a.requests, 4);
        assert_eq!(a.bytes_read, 4096);
        assert_eq!(a.bytes_written, 512);
        assert_eq!(a.errors, 2);
        assert_eq!(a.latency_histogram.bins.iter().sum::<u64>(), 4);
        assert_eq!(
            a.latency_histogram.bins.len(),
            a.latency_histogram.boundaries_us.len() + 1
        );
        let mut t = QueueSnapshot::default();
        t.add(&a);
        t.add(&a);
        assert_eq!(t.requests, 8);
        assert_eq!(t.latency_histogram.bins[4], 6);
    }
}
