//! Fault-injecting storage for crash-consistency tests.
//!
//! Every write goes to a volatile view (what a running process reads back) and is logged as
//! unflushed. `flush` makes the log durable. Writes and flushes are both crash points: after the
//! configured number of them the storage "crashes": that call and every later one fail with EIO
//! (a crash at a flush means that flush made nothing durable). `crashed_image` then tells what a disk
//! could hold after power loss: the durable state plus none, all, or a random subset of the writes
//! that were never flushed, or a random subset of their 512-byte sectors (torn writes).

use super::mem::MemStorage;
use super::traits::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Which unflushed writes survive the crash.
#[derive(Copy, Clone, Debug)]
pub enum CrashMode {
    /// Only what was flushed.
    FlushedOnly,
    /// Every write that completed, flushed or not.
    AllWrites,
    /// A pseudo-random subset of the unflushed writes (seeded, reproducible).
    RandomSubset(u64),
    /// A pseudo-random subset of the 512-byte sectors of the unflushed writes: a write that
    /// spans several sectors may land in part (a torn write). Only a sector is atomic.
    TornSectors(u64),
    /// What was flushed and only the newest unflushed write: the disk wrote the last write
    /// first (a header or a table entry landing before what it points at was synced).
    NewestOnly,
}

/// The unit a disk writes atomically, as `CrashMode::TornSectors` models it.
pub const ATOMIC_SECTOR: u64 = 512;

/// splitmix64's finalizer: small, neighbouring seeds (the tests use the crash point's number)
/// become unrelated xorshift states. Without it the first coins of such seeds agreed with each
/// other, and some combinations of kept and lost writes were never drawn.
fn mix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64: a reproducible coin for the crash modes.
fn coin(rng: &mut u64) -> bool {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng & 1 == 1
}

struct State {
    durable: Vec<u8>,
    unflushed: Vec<(u64, Vec<u8>)>,
    writes: u64,
    crash_after: Option<u64>,
    crashed: bool,
    fail_next_flush: bool,
}

/// See the module documentation.
pub struct FaultStorage {
    view: MemStorage,
    st: Mutex<State>,
    /// With `with_jitter`: the state of the coin that delays calls (0: no delays).
    jitter: AtomicU64,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultStorage {
    /// Start from `initial` (taken as durable); crash at write-or-flush number `crash_after + 1`.
    pub fn new(initial: Vec<u8>, crash_after: Option<u64>) -> Self {
        FaultStorage {
            view: MemStorage::from_vec(initial.clone()),
            st: Mutex::new(State {
                durable: initial,
                unflushed: Vec::new(),
                writes: 0,
                crash_after,
                crashed: false,
                fail_next_flush: false,
            }),
            jitter: AtomicU64::new(0),
        }
    }

    /// Delay each write and sync by a pseudo-random 0-100 µs (seeded) before it takes effect,
    /// so that requests running on several threads complete in a different order from run to
    /// run (crash tests with many requests in flight).
    pub fn with_jitter(self, seed: u64) -> Self {
        self.jitter.store(mix(seed) | 1, Ordering::Relaxed);
        self
    }

    fn delay(&self) {
        let mut x = self.jitter.load(Ordering::Relaxed);
        if x == 0 {
            return;
        }
        // A racy update is fine: any nonzero state is a valid coin.
        let _ = coin(&mut x);
        self.jitter.store(x | 1, Ordering::Relaxed);
        if x & 2 != 0 {
            std::thread::sleep(Duration::from_micros((x >> 8) % 100));
        }
    }
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Number of writes and flushes seen so far (the crash points).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }
    /// True once the crash point was passed.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }
    /// Crash now: every later call fails (a process killed at this point; what it wrote is in
    /// `crashed_image(CrashMode::AllWrites)`).
    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }
    /// Make the next flush fail with EIO (without crashing).
    pub fn fail_next_flush(&self) {
        self.lock().fail_next_flush = true;
    }
    /// The bytes a disk could hold after the crash.
    pub fn crashed_image(&self, mode: CrashMode) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        let mut rng = match mode {
            CrashMode::RandomSubset(seed) | CrashMode::TornSectors(seed) => mix(seed) | 1,
            _ => 0,
        };
        // Later writes to a sector are applied after earlier ones, so a sector ends up holding
        // its durable content or one of the writes to it: never a regression past a kept write
        // that a disk cache would have overwritten.
        let apply = |img: &mut Vec<u8>, off: u64, data: &[u8]| {
            let (o, e) = (off as usize, off as usize + data.len());
            if img.len() < e {
                img.resize(e, 0);
            }
            img[o..e].copy_from_slice(data);
        };
        let newest = st.unflushed.len().checked_sub(1);
        for (i, (off, data)) in st.unflushed.iter().enumerate() {
            match mode {
                CrashMode::NewestOnly => {
                    if Some(i) == newest {
                        apply(&mut img, *off, data);
                    }
                }
                CrashMode::FlushedOnly => {}
                CrashMode::AllWrites => apply(&mut img, *off, data),
                CrashMode::RandomSubset(_) => {
                    if coin(&mut rng) {
                        apply(&mut img, *off, data);
                    }
                }
                CrashMode::TornSectors(_) => {
                    let end = *off + data.len() as u64;
                    let mut at = *off;
                    while at < end {
                        let next = ((at / ATOMIC_SECTOR + 1) * ATOMIC_SECTOR).min(end);
                        if coin(&mut rng) {
                            let piece = &data[(at - off) as usize..(next - off) as usize];
                            apply(&mut img, at, piece);
                        }
                        at = next;
                    }
                }
            }
        }
        img
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.lock().crashed {
            return Err(eio());
        }
        self.view.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.delay();
        let mut st = self.lock();
        if st.crashed {
            return Err(eio());
        }
        st.writes += 1;
        if let Some(n) = st.crash_after {
            if st.writes > n {
                st.crashed = true;
                return Err(eio());
            }
        }
        st.unflushed.push((offset, buf.to_vec()));
        self.view.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.delay();
        let mut st = self.lock();
        if st.crashed {
            return Err(eio());
        }
        st.writes += 1;
        if let Some(n) = st.crash_after {
            if st.writes > n {
                st.crashed = true;
                return Err(eio());
            }
        }
        if st.fail_next_flush {
            st.fail_next_flush = false;
            return Err(eio());
        }
        st.unflushed.clear();
        st.durable = self.view.snapshot();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.view.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(eio());
        }
        // Length changes are treated as durable at once (as a metadata journal would make them),
        // so unflushed writes past a new, shorter end are gone with it.
        self.view.set_len(len)?;
        st.durable.resize(len as usize, 0);
        st.unflushed.retain_mut(|(off, data)| {
            let keep = len.saturating_sub(*off).min(data.len() as u64) as usize;
            data.truncate(keep);
            keep > 0
        });
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.view.len()?);
        if end <= offset {
            return Ok(());
        }
        self.write_at(&vec![0u8; (end - offset) as usize], offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_only_flushed() {
        let s = FaultStorage::new(vec![0; 16], Some(3));
        s.write_at(&[1; 4], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 4], 4).unwrap();
        assert!(s.write_at(&[3; 4], 8).is_err());
        assert!(s.crashed());
        let img = s.crashed_image(CrashMode::FlushedOnly);
        assert_eq!(&img[..12], &[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let img = s.crashed_image(CrashMode::AllWrites);
        assert_eq!(&img[..12], &[1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0]);
    }

    /// A shrink drops what was written past the new end: no crash image grows the file back.
    #[test]
    fn shrinking_drops_unflushed_writes_past_the_end() {
        let s = FaultStorage::new(vec![0; 1024], None);
        s.write_at(&[5; 512], 256).unwrap();
        s.write_at(&[6; 100], 900).unwrap();
        s.set_len(512).unwrap();
        let img = s.crashed_image(CrashMode::AllWrites);
        assert_eq!(img.len(), 512);
        assert!(img[256..].iter().all(|&b| b == 5));
    }

    /// A multi-sector write may land in part, sector by sector, and never splits a sector.
    #[test]
    fn torn_sectors_keep_whole_sectors_of_a_write() {
        let n = 64usize;
        let s = FaultStorage::new(vec![0; n * 512], None);
        // Starts mid-sector: the first piece is the tail of sector 0.
        s.write_at(&vec![7u8; n * 512 - 256], 256).unwrap();
        let mut seen_partial = false;
        for seed in 0..8 {
            let img = s.crashed_image(CrashMode::TornSectors(seed));
            let first = &img[256..512];
            assert!(first.iter().all(|&b| b == 7) || first.iter().all(|&b| b == 0));
            assert!(img[..256].iter().all(|&b| b == 0));
            let kept: Vec<bool> = img.chunks(512).skip(1).map(|c| c[0] == 7).collect();
            for (c, &k) in img.chunks(512).skip(1).zip(&kept) {
                assert!(
                    c.iter().all(|&b| b == u8::from(k) * 7),
                    "a sector was split"
                );
            }
            seen_partial |= kept.iter().any(|&k| k) && kept.iter().any(|&k| !k);
        }
        assert!(seen_partial, "no seed tore the write");
    }
}
