//! The refcounts as stored in the image (refcount table -> refcount blocks), read and updated
//! in place through a one-block cache, the way `qcow2_get_refcount` sees them.

use super::image::{Image, REFT_OFFSET_MASK};
use crate::qcow2::format::refblock;
use crate::storage::Storage;

/// Reads (and for repair, rewrites) on-disk refcounts.
pub(crate) struct OnDisk<'a> {
    st: &'a dyn Storage,
    img: &'a Image,
    /// Offset, contents and dirtiness of the cached refcount block.
    cache: Option<(u64, Vec<u8>, bool)>,
}

impl<'a> OnDisk<'a> {
    pub fn new(st: &'a dyn Storage, img: &'a Image) -> Self {
        OnDisk {
            st,
            img,
            cache: None,
        }
    }

    /// Where cluster `i`'s refcount lives: (block offset, index in block), or None when the
    /// refcount table has no block for it (refcount 0).
    fn locate(&self, i: u64) -> Result<Option<(u64, usize)>, String> {
        let bits = self.img.refblock_bits();
        let ti = i >> bits;
        if ti >= self.img.reftable_entries {
            return Ok(None);
        }
        let off = self.img.reftable.get(ti as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.img.cs - 1) != 0 {
            return Err(format!(
                "Refblock offset {off:#x} unaligned (reftable index: {ti:#x})"
            ));
        }
        Ok(Some((off, (i & ((1u64 << bits) - 1)) as usize)))
    }

    fn load(&mut self, off: u64) -> Result<&mut (u64, Vec<u8>, bool), String> {
        if self.cache.as_ref().map(|c| c.0) != Some(off) {
            self.write_back()?;
            let mut b = vec![0u8; self.img.cs as usize];
            self.st.read_at(&mut b, off).map_err(|e| e.to_string())?;
            self.cache = Some((off, b, false));
        }
        self.cache
            .as_mut()
            .ok_or_else(|| "refcount block cache is empty".to_string())
    }

    /// The stored refcount of cluster `i`.
    pub fn get(&mut self, i: u64) -> Result<u64, String> {
        let Some((off, idx)) = self.locate(i)? else {
            return Ok(0);
        };
        let order = self.img.header.refcount_order;
        let c = self.load(off)?;
        Ok(refblock::get(&c.1, idx, order))
    }

    /// Store refcount `v` for cluster `i`. Only updates an existing refcount block inside the
    /// file; never allocates. The block is written when another block is needed or on
    /// `write_back`.
    pub fn set(&mut self, i: u64, v: u64) -> Result<(), String> {
        let Some((off, idx)) = self.locate(i)? else {
            return Err(format!("cluster {i} has no refcount block"));
        };
        if off >= self.img.file_len {
            return Err(format!("refcount block at {off:#x} is outside the image"));
        }
        let order = self.img.header.refcount_order;
        if v > refblock::max_refcount(order) {
            return Err(format!(
                "refcount {v} does not fit in {} bits",
                1u32 << order
            ));
        }
        let c = self.load(off)?;
        refblock::set(&mut c.1, idx, order, v);
        c.2 = true;
        Ok(())
    }

    /// `[at, at + len)` of the file was written by someone else: drop the cached block if
    /// it overlaps (it is clean: the changes made through `set` are written first).
    pub fn forget(&mut self, at: u64, len: u64) {
        let cs = self.img.cs;
        let hit = self
            .cache
            .as_ref()
            .is_some_and(|c| !c.2 && at < c.0.saturating_add(cs) && c.0 < at.saturating_add(len));
        if hit {
            self.cache = None;
        }
    }

    /// Write the cached block if it was changed.
    pub fn write_back(&mut self) -> Result<(), String> {
        if let Some((off, b, dirty)) = self.cache.as_mut() {
            if *dirty {
                self.st.write_at(b, *off).map_err(|e| e.to_string())?;
                *dirty = false;
            }
        }
        Ok(())
    }
}
