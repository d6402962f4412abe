//! Unique data for the examples that fill an image: every 8 bytes of guest cluster c hold
//! c + 1, so no two clusters are alike (nothing deduplicates) and none is zero.

use std::io::IoSlice;
use vhost_user_qcow2::block::{BlockDevice, BlockError};

/// Write guest clusters `0..n` of `cs` bytes with unique data, 1 MiB per request; `after(gc)`
/// runs after each request with the clusters written so far.
pub fn write_unique(
    q: &dyn BlockDevice,
    n: u64,
    cs: u64,
    mut after: impl FnMut(u64) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let per = ((1 << 20) / cs).max(1);
    let mut buf = vec![0u8; (per * cs) as usize];
    let mut gc = 0;
    while gc < n {
        let k = per.min(n - gc);
        let part = &mut buf[..(k * cs) as usize];
        for (i, cl) in part.chunks_exact_mut(cs as usize).enumerate() {
            let c = gc + i as u64 + 1;
            for w in cl.chunks_exact_mut(8) {
                w.copy_from_slice(&c.to_le_bytes());
            }
        }
        q.write_vectored(gc * cs, &[IoSlice::new(part)])?;
        gc += k;
        after(gc)?;
    }
    Ok(())
}
