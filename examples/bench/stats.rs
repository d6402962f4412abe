//! Pure helpers of the benchmark client: size parsing, percentiles, medians, the deterministic
//! duplicate-content schedule and a tiny PRNG. No I/O here, so all of it is unit-tested.

/// Parses a byte count: plain bytes or a binary suffix (`k`, `K`, `KiB`, `m`, `M`, `MiB`, `g`,
/// `G`, `GiB`, `t`, `T`, `TiB`; `KB`-style spellings are accepted as binary too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "'{s}' is not a size (expected e.g. 4096, 4k, 1M, 8G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|e| format!("'{s}' is not a size: {e}"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}': unknown size suffix '{suffix}'")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' does not fit in 64 bits"))
}

/// Nearest-rank percentile of an ascending-sorted slice (`p` in 0..=100). None if empty.
pub fn percentile_sorted(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.saturating_sub(1).min(sorted.len() - 1);
    Some(sorted[idx])
}

/// Median, minimum and maximum of a set of measurements (NaNs ignored). None if nothing is left.
/// An even count gives the mean of the two middle values.
pub fn median_min_max(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

/// Whether request number `i` (0-based) carries duplicate content when `pct` percent of all
/// requests must: exactly floor(n * pct / 100) of the first n requests are duplicates, spread
/// evenly (no randomness, so every run and every daemon sees the same schedule).
pub fn is_duplicate(i: u64, pct: u32) -> bool {
    let pct = u128::from(pct.min(100));
    let i = u128::from(i);
    (i + 1) * pct / 100 > i * pct / 100
}

/// Smallest power of two >= 3 * iodepth (libblkio needs three descriptors per request), at least 4.
pub fn queue_size_for(iodepth: usize) -> usize {
    iodepth.saturating_mul(3).max(4).next_power_of_two()
}

/// SplitMix64: small, fast, good enough for choosing offsets and patterns.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift (bias below 2^-32 for the n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_sorted(&v, 50.0), Some(50));
        assert_eq!(percentile_sorted(&v, 99.0), Some(99));
        assert_eq!(percentile_sorted(&v, 100.0), Some(100));
        assert_eq!(percentile_sorted(&v, 0.0), Some(1));
        assert_eq!(percentile_sorted(&[7], 99.0), Some(7));
        assert_eq!(percentile_sorted(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile_sorted(&[], 50.0), None);
        // 1000 samples with one outlier per 100: p99 must not be the outlier, p99.9 may.
        let mut w = vec![10u64; 990];
        w.extend(std::iter::repeat_n(1000, 10));
        assert_eq!(percentile_sorted(&w, 99.0), Some(10));
        assert_eq!(percentile_sorted(&w, 99.9), Some(1000));
    }

    #[test]
    fn median_and_spread() {
        assert_eq!(median_min_max(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(median_min_max(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(median_min_max(&[5.0]), Some((5.0, 5.0, 5.0)));
        assert_eq!(median_min_max(&[f64::NAN, 5.0]), Some((5.0, 5.0, 5.0)));
        assert_eq!(median_min_max(&[]), None);
    }

    #[test]
    fn duplicate_schedule_is_exact() {
        for pct in [0u32, 1, 33, 50, 99, 100] {
            let n = 1000u64;
            let dups = (0..n).filter(|&i| is_duplicate(i, pct)).count() as u64;
            assert_eq!(dups, n * u64::from(pct) / 100, "pct {pct}");
        }
        // 50%: every other request.
        let first: Vec<bool> = (0..4).map(|i| is_duplicate(i, 50)).collect();
        assert_eq!(first, [false, true, false, true]);
        assert!(!is_duplicate(12345, 0));
        assert!(is_duplicate(12345, 100));
        assert!(is_duplicate(12345, 250)); // clamped to 100
    }

    #[test]
    fn queue_sizes() {
        assert_eq!(queue_size_for(1), 4);
        assert_eq!(queue_size_for(8), 32);
        assert_eq!(queue_size_for(32), 128);
        assert_eq!(queue_size_for(64), 256);
    }

    #[test]
    fn prng_below_stays_in_range_and_spreads() {
        let mut r = SplitMix64::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let x = r.below(10);
            assert!(x < 10);
            seen[x as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
