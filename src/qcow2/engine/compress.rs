//! Decompression of compressed clusters: raw deflate (QEMU's zlib type, window 2^12) or zstd.

use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::header::{COMPRESSION_ZLIB, COMPRESSION_ZSTD};
use std::io::Read;

/// Decompress `input` into exactly `out.len()` bytes (one cluster).
pub(crate) fn decompress(kind: u8, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        COMPRESSION_ZLIB => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| {
                    Qcow2Error::corrupt(format!("compressed cluster does not inflate: {e}"))
                })?;
            let produced = d.total_out() as usize;
            match status {
                flate2::Status::StreamEnd | flate2::Status::BufError | flate2::Status::Ok
                    if produced == out.len() =>
                {
                    Ok(())
                }
                _ => Err(Qcow2Error::corrupt(format!(
                    "compressed cluster inflates to {produced} bytes, expected {}",
                    out.len()
                ))),
            }
        }
        COMPRESSION_ZSTD => {
            let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| Qcow2Error::corrupt(format!("compressed cluster (zstd): {e}")))?;
            dec.read_exact(out)
                .map_err(|e| Qcow2Error::corrupt(format!("compressed cluster (zstd): {e}")))
        }
        k => Err(Qcow2Error::Unsupported(format!("compression type {k}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_roundtrip_and_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0u8; 100]); // sector padding after the stream
        let mut out = vec![0u8; 4096];
        decompress(COMPRESSION_ZLIB, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(COMPRESSION_ZLIB, &[0xff; 64], &mut out).is_err());
        assert!(decompress(COMPRESSION_ZSTD, &[0xff; 64], &mut out).is_err());
        assert!(decompress(9, &c, &mut out).is_err());
    }
}
