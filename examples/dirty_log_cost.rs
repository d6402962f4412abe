//! What dirty logging costs per request: the guest-memory writes a 4 KiB read makes the daemon
//! do (mark the data buffer the kernel filled, write the status byte), on plain guest memory
//! (no bitmap), on the daemon's memory with logging off, and with logging on.
//!
//! `cargo run --release --example dirty_log_cost -- [--iterations N]` (default 10M)

use std::sync::Arc;
use std::time::Instant;

use vhost_user_qcow2::vhost::dirty_log::{DirtyLog, LogBitmap};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

#[path = "util/args.rs"]
mod args;
use args::arg;

const MEM: usize = 1 << 30;

/// ns per request: mark a 4 KiB buffer written, write a status byte, over 256 buffers.
fn run<M: GuestMemoryBackend>(mem: &M, n: u64) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let buf = GuestAddress((i % 256) * 8192);
        if let Ok(s) = mem.get_slice(buf, 4096) {
            s.bitmap().mark_dirty(0, 4096);
        }
        let _ = mem.write_obj(0u8, GuestAddress(0x400_0000 + (i % 256) * 16));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() -> anyhow::Result<()> {
    let n = arg("--iterations", 10_000_000);
    let plain = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)])?;
    let log = DirtyLog::new();
    let file = tempfile::tempfile()?;
    let bytes = (MEM as u64 / 4096).div_ceil(8);
    file.set_len(bytes)?;
    log.set_base(file, 0, bytes)?;
    let region = MmapRegion::<LogBitmap>::new(MEM)?;
    region.bitmap().attach(0, &log);
    let region = Arc::new(
        GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| anyhow::anyhow!("region"))?,
    );
    let logged = GuestMemoryMmap::from_arc_regions(vec![region])?;
    // Interleaved rounds, the best of three each.
    let mut best = [f64::MAX; 3];
    for _ in 0..3 {
        best[0] = best[0].min(run(&plain, n));
        log.set_on(false);
        best[1] = best[1].min(run(&logged, n));
        log.set_on(true);
        best[2] = best[2].min(run(&logged, n));
    }
    println!("per 4 KiB read completion (mark the buffer, write the status byte), best of 3:");
    println!("  guest memory without a bitmap: {:.1} ns", best[0]);
    println!("  the daemon's memory, logging off: {:.1} ns", best[1]);
    println!("  the daemon's memory, logging on:  {:.1} ns", best[2]);
    Ok(())
}
