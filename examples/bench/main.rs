//! vhost-user-blk load generator: drives any vhost-user-blk backend (ours or
//! qemu-storage-daemon) through libblkio's "virtio-blk-vhost-user" driver, one client thread per
//! virtqueue, and prints one JSON line: IOPS, MB/s, p50/p99 latency in µs.
//!
//! ```text
//! cargo run --release --example bench -- --socket /tmp/vhost.sock --workload randread \
//!     --bs 4k --iodepth 32 --num-queues 2 --runtime 5
//! cargo run --release --example bench -- --report results.jsonl   # table from scripts/bench.sh
//! ```
//!
//! Semantics:
//! - `--iodepth` is per queue; each queue's thread works on its own slice of `[offset, offset+size)`
//!   (the range split evenly), so queues never touch the same blocks.
//! - Offsets are multiples of `--stride` (default `--bs`) inside the slice. `--no-repeat` visits
//!   each stride slot at most once (random permutation, or one sequential pass) and stops when the
//!   slice is exhausted: with `--stride 64k` every 4 KiB write lands in a cluster not written
//!   before (an allocating write on a fresh 64 KiB-cluster image).
//! - The run stops at `--runtime` seconds, after `--ios` requests (over all queues), or when
//!   `--no-repeat` exhausts the range, whichever comes first; in-flight requests are then drained
//!   and counted.
//! - `--dedup-ratio PCT`: exactly PCT % of write requests (an even, deterministic schedule) fill
//!   the whole buffer with one of `--dedup-patterns` non-zero byte patterns; the others stamp every
//!   512-byte sector with (run nonce, queue, request number, sector), so each sector, and so every
//!   cluster-aligned piece, is unique. Use a `--bs` that is a multiple of the cluster size to get
//!   that ratio per cluster.
//! - `--flush-every N`: after every N-th completed write of a queue slot, that slot issues a FLUSH,
//!   and the request's latency covers write + flush (N = 1: a flush after every write).

mod report;
mod stats;

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::{Parser, ValueEnum};
use serde_json::json;
use stats::{is_duplicate, percentile_sorted, queue_size_for, SplitMix64};
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Randread,
    Randwrite,
    Seqread,
    Seqwrite,
}

impl Workload {
    fn is_write(self) -> bool {
        matches!(self, Workload::Randwrite | Workload::Seqwrite)
    }
    fn is_seq(self) -> bool {
        matches!(self, Workload::Seqread | Workload::Seqwrite)
    }
}

#[derive(Parser, Debug, Clone)]
#[command(about = "vhost-user-blk load generator (libblkio client); prints one JSON line")]
struct Cli {
    /// vhost-user-blk UNIX socket of the daemon under test.
    #[arg(long, required_unless_present = "report")]
    socket: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "randread")]
    workload: Workload,
    /// Request size (bytes, or with k/M/G suffix).
    #[arg(long, default_value = "4k", value_parser = stats::parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Virtqueues to use; one client thread each.
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    /// Virtqueue size (default: smallest power of two >= 3 x iodepth, as libblkio needs).
    #[arg(long)]
    queue_size: Option<usize>,
    /// Stop after this many seconds (0: no time limit).
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Stop after this many requests over all queues.
    #[arg(long)]
    ios: Option<u64>,
    /// Start of the exercised range.
    #[arg(long, default_value = "0", value_parser = stats::parse_size)]
    offset: u64,
    /// Length of the exercised range (default: capacity - offset).
    #[arg(long, alias = "range", value_parser = stats::parse_size)]
    size: Option<u64>,
    /// Distance between candidate offsets (default: bs).
    #[arg(long, value_parser = stats::parse_size)]
    stride: Option<u64>,
    /// Visit each stride slot at most once, then stop.
    #[arg(long)]
    no_repeat: bool,
    /// Percentage of write requests whose content repeats a small set of patterns.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    dedup_ratio: u32,
    /// Number of distinct duplicate patterns.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=255))]
    dedup_patterns: u32,
    /// Issue a FLUSH after every N-th write of each slot (0: never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// PRNG seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Use the last queue to disturb the others instead of measuring it: it writes its slice
    /// in 1 MiB requests and discards it again in 8 MiB ranges, over and over (only the other
    /// queues' requests are counted).
    #[arg(long)]
    interfere: bool,
    /// Busy-poll for completions instead of sleeping until the daemon signals one (as a guest
    /// driver in polling mode does): takes the client's own wake-up out of the latency.
    #[arg(long)]
    poll: bool,
    /// Instead of running a load: print the Markdown table for a results file of scripts/bench.sh.
    #[arg(long, conflicts_with = "socket")]
    report: Option<PathBuf>,
}

/// What one queue thread measured.
#[derive(Default)]
struct QueueResult {
    ios: u64,
    bytes: u64,
    errors: u64,
    flushes: u64,
    dup_writes: u64,
    first_error: Option<String>,
    lat_ns: Vec<u64>,
    elapsed: Duration,
}

/// Offsets of one queue's slice, in stride units.
struct OffsetGen {
    base: u64,
    stride: u64,
    slots: u64,
    pos: u64,
    seq: bool,
    no_repeat: bool,
    perm: Vec<u32>,
    rng: SplitMix64,
}

impl OffsetGen {
    fn new(
        base: u64,
        stride: u64,
        slots: u64,
        seq: bool,
        no_repeat: bool,
        seed: u64,
    ) -> Result<Self> {
        let perm = if no_repeat && !seq {
            if slots > u64::from(u32::MAX) {
                bail!("--no-repeat supports at most 2^32 slots per queue, not {slots}");
            }
            (0..slots as u32).collect()
        } else {
            Vec::new()
        };
        Ok(OffsetGen {
            base,
            stride,
            slots,
            pos: 0,
            seq,
            no_repeat,
            perm,
            rng: SplitMix64::new(seed),
        })
    }

    fn next_offset(&mut self) -> Option<u64> {
        let slot = if self.seq {
            if self.pos == self.slots {
                if self.no_repeat {
                    return None;
                }
                self.pos = 0;
            }
            self.pos += 1;
            self.pos - 1
        } else if self.no_repeat {
            // Incremental Fisher-Yates: a uniform random permutation, drawn one element at a time.
            if self.pos == self.slots {
                return None;
            }
            let i = self.pos as usize;
            let j = i + self.rng.below(self.slots - self.pos) as usize;
            self.perm.swap(i, j);
            self.pos += 1;
            u64::from(self.perm[i])
        } else {
            self.rng.below(self.slots)
        };
        Some(self.base + slot * self.stride)
    }
}

/// Everything a queue thread needs that is the same for all threads.
#[derive(Clone)]
struct Plan {
    cli: Cli,
    stride: u64,
    slice_len: u64,
    buf_stride: usize,
    nonce: u64,
    seed: u64,
    deadline: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    Io,
    Flush,
}

fn fill_write_buffer(
    buf: &mut [u8],
    req_no: u64,
    queue: usize,
    plan: &Plan,
    rng: &mut SplitMix64,
) -> bool {
    let cli = &plan.cli;
    if cli.dedup_ratio > 0 && is_duplicate(req_no, cli.dedup_ratio) {
        let pattern = 1 + rng.below(u64::from(cli.dedup_patterns)) as u8;
        buf.fill(pattern);
        return true;
    }
    for (sector, chunk) in buf.chunks_mut(512).enumerate() {
        let stamp = [plan.nonce, queue as u64, req_no, sector as u64];
        for (dst, word) in chunk.chunks_mut(8).zip(stamp) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
    }
    false
}

fn error_text(c: &Completion) -> String {
    let msg = if c.error_msg.is_null() {
        String::new()
    } else {
        // SAFETY: libblkio sets error_msg to null or to a NUL-terminated static string.
        unsafe { CStr::from_ptr(c.error_msg) }
            .to_string_lossy()
            .into_owned()
    };
    format!("errno {}: {msg}", -c.ret)
}

/// Drives one virtqueue until the plan says stop; `bufs` is this queue's part of the mapped memory
/// region: `iodepth` buffers of `buf_stride` bytes.
fn run_queue(
    mut q: Blkioq,
    bufs: &mut [u8],
    queue: usize,
    plan: &Plan,
    ios_limit: u64,
    start: &Barrier,
) -> Result<QueueResult> {
    let cli = &plan.cli;
    if cli.interfere && queue + 1 == cli.num_queues {
        return interfere(q, bufs, queue, plan, start);
    }
    let qd = cli.iodepth;
    let bs = cli.bs as usize;
    let write = cli.workload.is_write();
    let seed = plan.seed ^ (queue as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = SplitMix64::new(seed ^ 0x5555);
    let base = cli.offset + queue as u64 * plan.slice_len;
    let mut gen = OffsetGen::new(
        base,
        plan.stride,
        plan.slice_len / plan.stride,
        cli.workload.is_seq(),
        cli.no_repeat,
        seed,
    )?;
    let mut phase = vec![Phase::Idle; qd];
    let mut submitted_at = vec![Instant::now(); qd];
    let mut writes_done = vec![0u64; qd];
    let mut idle: Vec<usize> = (0..qd).rev().collect();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut res = QueueResult::default();
    let expected = if plan.deadline.is_some() {
        1 << 20
    } else {
        ios_limit.min(1 << 24) as usize
    };
    res.lat_ns.reserve(expected);
    let (mut issued, mut inflight, mut stop) = (0u64, 0usize, false);

    start.wait();
    let t0 = Instant::now();
    loop {
        while !stop {
            let Some(&slot) = idle.last() else { break };
            let now = Instant::now();
            if issued >= ios_limit || plan.deadline.is_some_and(|d| now - t0 >= d) {
                stop = true;
                break;
            }
            let Some(off) = gen.next_offset() else {
                stop = true;
                break;
            };
            idle.pop();
            let buf = &mut bufs[slot * plan.buf_stride..slot * plan.buf_stride + bs];
            if write {
                if fill_write_buffer(buf, issued, queue, plan, &mut rng) {
                    res.dup_writes += 1;
                }
                q.write(off, buf.as_ptr(), bs, slot, ReqFlags::empty());
            } else {
                q.read(off, buf.as_mut_ptr(), bs, slot, ReqFlags::empty());
            }
            phase[slot] = Phase::Io;
            submitted_at[slot] = Instant::now();
            issued += 1;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        let min = usize::from(!cli.poll);
        let n = loop {
            let n = q
                .do_io(&mut comps, min, None, None)
                .map_err(|e| anyhow::anyhow!("queue {queue}: do_io: {e}"))?;
            if n > 0 {
                break n;
            }
            std::hint::spin_loop();
        };
        let done_at = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            let slot = c.user_data;
            if slot >= qd || phase[slot] == Phase::Idle {
                bail!("queue {queue}: completion for unknown slot {slot}");
            }
            if c.ret < 0 {
                res.errors += 1;
                res.first_error.get_or_insert_with(|| error_text(&c));
            } else if phase[slot] == Phase::Io && write && cli.flush_every > 0 {
                writes_done[slot] += 1;
            }
            let flush_now = c.ret >= 0
                && phase[slot] == Phase::Io
                && write
                && cli.flush_every > 0
                && writes_done[slot].is_multiple_of(cli.flush_every);
            if flush_now {
                q.flush(slot, ReqFlags::empty());
                phase[slot] = Phase::Flush;
                continue;
            }
            if c.ret >= 0 {
                if phase[slot] == Phase::Flush {
                    res.flushes += 1;
                }
                res.ios += 1;
                res.bytes += cli.bs;
                res.lat_ns
                    .push((done_at - submitted_at[slot]).as_nanos() as u64);
            }
            phase[slot] = Phase::Idle;
            idle.push(slot);
            inflight -= 1;
        }
    }
    res.elapsed = t0.elapsed();
    Ok(res)
}

/// The `--interfere` queue: write 8 MiB of its slice (1 MiB requests), discard it, next 8 MiB,
/// until the deadline. Its requests are not counted.
fn interfere(
    mut q: Blkioq,
    bufs: &mut [u8],
    queue: usize,
    plan: &Plan,
    start: &Barrier,
) -> Result<QueueResult> {
    const CHUNK: u64 = 8 << 20;
    const WRITE: usize = 1 << 20;
    let base = plan.cli.offset + queue as u64 * plan.slice_len;
    let chunks = plan.slice_len / CHUNK;
    if chunks == 0 || bufs.len() < WRITE {
        bail!("--interfere needs a slice of 8 MiB and --bs 1M or buffers as large");
    }
    let buf = &mut bufs[..WRITE];
    buf.fill(0x5a);
    let mut comps: Vec<MaybeUninit<Completion>> = vec![MaybeUninit::uninit()];
    let mut one = |q: &mut Blkioq| -> Result<()> {
        let n = q
            .do_io(&mut comps, 1, None, None)
            .map_err(|e| anyhow::anyhow!("interfere: do_io: {e}"))?;
        if n == 1 {
            // SAFETY: do_io initialised the first completion.
            let c = unsafe { comps[0].assume_init_read() };
            if c.ret < 0 {
                bail!("interfere: {}", error_text(&c));
            }
        }
        Ok(())
    };
    start.wait();
    let t0 = Instant::now();
    let mut k = 0u64;
    while plan.deadline.is_none_or(|d| t0.elapsed() < d) {
        let at = base + (k % chunks) * CHUNK;
        for w in 0..CHUNK / WRITE as u64 {
            q.write(
                at + w * WRITE as u64,
                buf.as_ptr(),
                WRITE,
                0,
                ReqFlags::empty(),
            );
            one(&mut q)?;
        }
        q.discard(at, CHUNK, 0, ReqFlags::empty());
        one(&mut q)?;
        k += 1;
    }
    Ok(QueueResult {
        elapsed: t0.elapsed(),
        ..Default::default()
    })
}

fn blk<T>(what: &str, r: blkio::Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: {e} (errno {})", e.errno()))
}

fn run_load(cli: Cli) -> Result<serde_json::Value> {
    let socket = cli.socket.clone().context("--socket is required")?;
    let bs = cli.bs;
    if bs == 0 || !bs.is_multiple_of(512) {
        bail!("--bs must be a non-zero multiple of 512");
    }
    let stride = cli.stride.unwrap_or(bs);
    if stride < bs || !stride.is_multiple_of(512) {
        bail!("--stride must be a multiple of 512 and >= --bs");
    }
    if cli.iodepth == 0 || cli.num_queues == 0 {
        bail!("--iodepth and --num-queues must be >= 1");
    }
    if cli.runtime <= 0.0 && cli.ios.is_none() && !cli.no_repeat {
        bail!("give --runtime, --ios or --no-repeat, or the run never ends");
    }
    let nq = cli.num_queues;
    let queue_size = cli
        .queue_size
        .unwrap_or_else(|| queue_size_for(cli.iodepth));

    let mut b = blk("new", Blkio::new("virtio-blk-vhost-user"))?;
    let path = socket.to_str().context("socket path is not UTF-8")?;
    blk("set path", b.set_str("path", path))?;
    blk("connect", b.connect()).with_context(|| format!("connecting to {}", socket.display()))?;
    blk("set num-queues", b.set_i32("num-queues", nq as i32))?;
    blk("set queue-size", b.set_i32("queue-size", queue_size as i32))?;
    let capacity = blk("capacity", b.get_u64("capacity"))?;
    let max_queues = blk("max-queues", b.get_i32("max-queues"))?;
    if nq as i64 > i64::from(max_queues) {
        bail!("device offers {max_queues} queues, asked for {nq}");
    }
    let outcome = blk("start", b.start())?;

    let size = cli.size.unwrap_or(capacity.saturating_sub(cli.offset));
    if cli
        .offset
        .checked_add(size)
        .is_none_or(|end| end > capacity)
    {
        bail!(
            "range {}+{} is past the capacity {capacity}",
            cli.offset,
            size
        );
    }
    let slice_len = size / nq as u64 / stride * stride;
    if slice_len < stride {
        bail!("range of {size} bytes is too small for {nq} queues of stride {stride}");
    }

    let align = blk("mem-region-alignment", b.get_u64("mem-region-alignment"))?.max(4096) as usize;
    // The --interfere queue writes 1 MiB at a time.
    let buf_bytes = if cli.interfere { bs.max(1 << 20) } else { bs };
    let buf_stride = (buf_bytes as usize).div_ceil(align) * align;
    let region_len = buf_stride * cli.iodepth * nq;
    let region = blk("alloc_mem_region", b.alloc_mem_region(region_len))?;
    blk("map_mem_region", b.map_mem_region(&region))?;
    // SAFETY: libblkio mmap()ed region.len bytes at region.addr, readable and writable; the region
    // stays mapped until `b` is dropped at the end of this function, after all threads joined.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let plan = Plan {
        seed: cli.seed.unwrap_or(nonce),
        deadline: (cli.runtime > 0.0).then(|| Duration::from_secs_f64(cli.runtime)),
        cli: cli.clone(),
        stride,
        slice_len,
        buf_stride,
        nonce,
    };
    let total_ios = cli.ios.unwrap_or(u64::MAX);
    let barrier = Arc::new(Barrier::new(nq));
    let results: Vec<Result<QueueResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = outcome
            .queues
            .into_iter()
            .zip(mem.chunks_mut(buf_stride * cli.iodepth))
            .enumerate()
            .map(|(i, (q, bufs))| {
                let limit = total_ios / nq as u64 + u64::from((i as u64) < total_ios % nq as u64);
                let (plan, barrier) = (&plan, Arc::clone(&barrier));
                s.spawn(move || run_queue(q, bufs, i, plan, limit, &barrier))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("queue thread panicked")))
            })
            .collect()
    });

    let mut all = QueueResult::default();
    for r in results {
        let r = r?;
        all.ios += r.ios;
        all.bytes += r.bytes;
        all.errors += r.errors;
        all.flushes += r.flushes;
        all.dup_writes += r.dup_writes;
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
        all.lat_ns.extend(r.lat_ns);
        all.elapsed = all.elapsed.max(r.elapsed);
    }
    all.lat_ns.sort_unstable();
    let secs = all.elapsed.as_secs_f64().max(1e-9);
    let us = |p: f64| percentile_sorted(&all.lat_ns, p).map(|ns| ns as f64 / 1000.0);
    let mean_us = if all.lat_ns.is_empty() {
        None
    } else {
        Some(all.lat_ns.iter().map(|&x| x as f64).sum::<f64>() / all.lat_ns.len() as f64 / 1000.0)
    };
    Ok(json!({
        "workload": format!("{:?}", cli.workload).to_lowercase(),
        "bs": bs,
        "iodepth": cli.iodepth,
        "num_queues": nq,
        "queue_size": queue_size,
        "offset": cli.offset,
        "size": size,
        "stride": stride,
        "no_repeat": cli.no_repeat,
        "dedup_ratio": cli.dedup_ratio,
        "flush_every": cli.flush_every,
        "capacity": capacity,
        "ios": all.ios,
        "bytes": all.bytes,
        "dup_writes": all.dup_writes,
        "flushes": all.flushes,
        "errors": all.errors,
        "first_error": all.first_error,
        "elapsed_s": secs,
        "iops": all.ios as f64 / secs,
        "mbps": all.bytes as f64 / secs / 1e6,
        "lat_mean_us": mean_us,
        "lat_p50_us": us(50.0),
        "lat_p99_us": us(99.0),
        "lat_max_us": all.lat_ns.last().map(|&ns| ns as f64 / 1000.0),
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.report {
        return match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| report::parse_runs(&t))
        {
            Ok(runs) => {
                print!("{}", report::render(&runs));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench: {}: {e}", path.display());
                ExitCode::from(1)
            }
        };
    }
    match run_load(cli) {
        Ok(v) => {
            println!("{v}");
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                eprintln!("bench: requests failed: {}", v["first_error"]);
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_repeat_random_visits_every_slot_once() {
        let mut g = OffsetGen::new(1 << 20, 65536, 100, false, true, 7).unwrap();
        let mut seen: Vec<u64> = std::iter::from_fn(|| g.next_offset()).collect();
        assert_eq!(seen.len(), 100);
        assert_ne!(
            seen.windows(2).filter(|w| w[1] == w[0] + 65536).count(),
            99,
            "not shuffled"
        );
        seen.sort_unstable();
        let want: Vec<u64> = (0..100).map(|i| (1 << 20) + i * 65536).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn sequential_wraps_or_stops() {
        let mut g = OffsetGen::new(0, 4096, 3, true, false, 1).unwrap();
        let v: Vec<u64> = (0..5).filter_map(|_| g.next_offset()).collect();
        assert_eq!(v, [0, 4096, 8192, 0, 4096]);
        let mut g = OffsetGen::new(8192, 4096, 2, true, true, 1).unwrap();
        let v: Vec<u64> = std::iter::from_fn(|| g.next_offset()).collect();
        assert_eq!(v, [8192, 12288]);
    }

    #[test]
    fn random_offsets_stay_in_the_slice() {
        let mut g = OffsetGen::new(4096, 512, 10, false, false, 3).unwrap();
        for _ in 0..1000 {
            let o = g.next_offset().unwrap();
            assert!((4096..4096 + 10 * 512).contains(&o) && o.is_multiple_of(512));
        }
    }

    fn plan(dedup_ratio: u32) -> Plan {
        let mut cli = Cli::parse_from(["bench", "--socket", "x"]);
        cli.dedup_ratio = dedup_ratio;
        cli.dedup_patterns = 4;
        Plan {
            cli,
            stride: 4096,
            slice_len: 1 << 20,
            buf_stride: 4096,
            nonce: 42,
            seed: 1,
            deadline: None,
        }
    }

    #[test]
    fn write_content_is_unique_or_a_pattern() {
        let mut rng = SplitMix64::new(9);
        let p = plan(50);
        let mut bufs = vec![vec![0u8; 4096]; 8];
        let dups: Vec<bool> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| fill_write_buffer(b, i as u64, 0, &p, &mut rng))
            .collect();
        assert_eq!(dups, [false, true, false, true, false, true, false, true]);
        for (b, dup) in bufs.iter().zip(&dups) {
            if *dup {
                assert!(b.iter().all(|&x| x == b[0]) && (1..=4).contains(&b[0]));
            }
        }
        // Every 512-byte sector of every unique buffer differs from every other sector.
        let mut sectors: Vec<&[u8]> = bufs
            .iter()
            .zip(&dups)
            .filter(|(_, d)| !**d)
            .flat_map(|(b, _)| b.chunks(512))
            .collect();
        let n = sectors.len();
        sectors.sort_unstable();
        sectors.dedup();
        assert_eq!(sectors.len(), n);
        // Another queue writing request 0 produces different content.
        let mut other = vec![0u8; 4096];
        fill_write_buffer(&mut other, 0, 1, &p, &mut rng);
        assert_ne!(other, bufs[0]);
    }
}
