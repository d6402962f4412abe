//! Sizes on the command line and in human output, through kept crates: `parse-size` reads them,
//! `humansize` prints them.
//!
//! Accepted: a number (bytes), optionally fractional or with digit groups (`1.5G`, `69_420`),
//! optionally followed by a unit K, M, G, T, P or E, each a power of 1024, with or without `i`
//! and `B` (`8G`, `8g`, `8GiB`, `8 GB` are all 8 × 2^30), or just `B`.

/// Parse a size such as `8G`, `64K`, `1.5M`, `512` (bytes; all units powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| match e {
            parse_size::Error::PosOverflow => format!("size {s:?} is too large"),
            parse_size::Error::InvalidDigit => {
                format!("not a size: {s:?} (a number, then K, M, G, T or P)")
            }
            _ => format!("not a size: {s:?} ({e})"),
        })
}

/// Bytes as qemu-img prints them: "64 MiB", "1.26 MiB", "512 B" (powers of 1024).
pub fn format_size(n: u64) -> String {
    humansize::format_size(n, humansize::BINARY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        // What the hand-written parser took.
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("64 M"), Ok(64 << 20));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        let e = parse_size("99999999999T").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        // And more: IEC suffixes, a B after the unit, fractions.
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("8GB"), Ok(8 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
    }

    #[test]
    fn printed() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1323008), "1.26 MiB");
        assert_eq!(format_size(200704), "196 KiB");
        assert_eq!(format_size(8 << 30), "8 GiB");
    }
}
