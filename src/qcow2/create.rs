//! Creating new images: header, refcount table, refcount blocks and an empty L1 table, laid out
//! as QEMU does (header, refcount table, refcount blocks, L1), every cluster referenced once.

use super::error::{Qcow2Error, Result};
use super::format::{self, header::*, refblock, Header, HeaderExtension};
use crate::storage::Storage;

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub lazy_refcounts: bool,
    /// 2 or 3 (qemu-img's compat=0.10 / 1.1).
    pub version: u32,
    /// Backing file name as stored in the image, and its format.
    pub backing: Option<(String, String)>,
    /// Record inline deduplication as this image's setting (our own header extension).
    pub dedup: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            refcount_order: 4,
            lazy_refcounts: false,
            version: 3,
            backing: None,
            dedup: false,
        }
    }
}

/// The layout: cluster counts of each structure.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    l1_size: u64,
    l1_clusters: u64,
    rt_clusters: u64,
    rb_count: u64,
}

fn layout(o: &CreateOptions) -> Result<Layout> {
    let cs = 1u64 << o.cluster_bits;
    let l2_cover = cs * (cs / 8);
    let l1_size = o.size.div_ceil(l2_cover);
    if l1_size * 8 > 32 << 20 {
        return Err(Qcow2Error::Invalid(
            "size too large for this cluster size (L1 table over 32 MiB)".into(),
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let epb = refblock::entries_per_block(o.cluster_bits, o.refcount_order);
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let nrb = total.div_ceil(epb);
        let nrt = (nrb * 8).div_ceil(cs);
        if nrb == rb && nrt == rt {
            break;
        }
        rb = nrb.max(1);
        rt = nrt.max(1);
    }
    Ok(Layout {
        l1_size,
        l1_clusters,
        rt_clusters: rt,
        rb_count: rb,
    })
}

/// Write a new, empty image onto `s` (which should be empty).
pub fn create(s: &dyn Storage, o: &CreateOptions) -> Result<()> {
    if !(9..=21).contains(&o.cluster_bits) {
        return Err(Qcow2Error::Invalid(
            "cluster size must be a power of two from 512 B to 2 MiB".into(),
        ));
    }
    if o.refcount_order > 6 {
        return Err(Qcow2Error::Invalid(
            "refcount bits must be 1, 2, 4, 8, 16, 32 or 64".into(),
        ));
    }
    if !o.size.is_multiple_of(512) {
        return Err(Qcow2Error::Invalid(
            "the size must be a multiple of 512 bytes".into(),
        ));
    }
    if o.version == 2 && (o.refcount_order != 4 || o.lazy_refcounts) {
        return Err(Qcow2Error::Invalid(
            "compat 0.10 (version 2) images need 16-bit refcounts and no lazy refcounts".into(),
        ));
    }
    if o.version != 2 && o.version != 3 {
        return Err(Qcow2Error::Invalid(format!(
            "qcow2 version {} (use 2 or 3)",
            o.version
        )));
    }
    let cs = 1u64 << o.cluster_bits;
    let l = layout(o)?;
    let rt_off = cs;
    let rb_off = rt_off + l.rt_clusters * cs;
    let l1_off = rb_off + l.rb_count * cs;
    let total = 1 + l.rt_clusters + l.rb_count + l.l1_clusters;

    let mut extensions = Vec::new();
    if let Some((_, fmt)) = &o.backing {
        extensions.push(HeaderExtension {
            kind: EXT_BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        });
    }
    if o.version >= 3 {
        extensions.push(HeaderExtension {
            kind: EXT_FEATURE_TABLE,
            data: Header::feature_name_table(),
        });
    }
    if o.dedup {
        use super::format::dedup::{DedupExtension, DedupMode, EXT_DEDUP};
        if o.version < 3 {
            return Err(Qcow2Error::Invalid(
                "deduplication needs compat 1.1 (qcow2 v3)".into(),
            ));
        }
        let cap = (refblock::max_refcount(o.refcount_order) / 2).min(u32::MAX as u64) as u32;
        let ext = DedupExtension::new(DedupMode::Inline, o.cluster_bits, cap);
        extensions.push(HeaderExtension {
            kind: EXT_DEDUP,
            data: ext.encode(),
        });
    }
    let h = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: o.cluster_bits,
        size: o.size,
        crypt_method: 0,
        l1_size: l.l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: l.rt_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if o.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: o.refcount_order,
        header_length: if o.version >= 3 {
            OUR_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: COMPRESSION_ZLIB,
        extensions,
        backing_file: o.backing.as_ref().map(|(n, _)| n.clone()),
    };
    let mut table = vec![0u64; (l.rt_clusters * cs / 8) as usize];
    for j in 0..l.rb_count {
        table[j as usize] = rb_off + j * cs;
    }
    let epb = refblock::entries_per_block(o.cluster_bits, o.refcount_order);
    let mut blocks = vec![0u8; (l.rb_count * cs) as usize];
    for c in 0..total {
        let (b, i) = (c / epb, c % epb);
        let blk = &mut blocks[(b * cs) as usize..((b + 1) * cs) as usize];
        refblock::set(blk, i as usize, o.refcount_order, 1);
    }
    s.set_len(0)?;
    s.write_at(&h.encode()?, 0)?;
    s.write_at(&format::encode_table(&table), rt_off)?;
    s.write_at(&blocks, rb_off)?;
    s.set_len(total * cs)?;
    s.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_metadata_in_its_own_refcount_blocks() {
        let o = CreateOptions {
            size: 8 << 30,
            ..Default::default()
        };
        assert_eq!(
            layout(&o).unwrap(),
            Layout {
                l1_size: 16,
                l1_clusters: 1,
                rt_clusters: 1,
                rb_count: 1
            }
        );
        // 512-byte clusters, 1-bit refcounts, 8 GiB: big L1, several refcount blocks.
        let o = CreateOptions {
            size: 8 << 30,
            cluster_bits: 9,
            refcount_order: 0,
            ..Default::default()
        };
        let l = layout(&o).unwrap();
        let epb = 512 * 8;
        assert!(l.rb_count * epb >= 1 + l.rt_clusters + l.rb_count + l.l1_clusters);
        assert_eq!(l.l1_size, (8u64 << 30) / (512 * 64));
    }

    #[test]
    fn rejects_bad_options() {
        let s = crate::storage::MemStorage::new();
        for o in [
            CreateOptions {
                size: 1000,
                ..Default::default()
            },
            CreateOptions {
                size: 1 << 20,
                cluster_bits: 22,
                ..Default::default()
            },
            CreateOptions {
                size: 1 << 20,
                refcount_order: 7,
                ..Default::default()
            },
            CreateOptions {
                size: 1 << 20,
                version: 2,
                lazy_refcounts: true,
                ..Default::default()
            },
            CreateOptions {
                size: 1 << 60,
                cluster_bits: 9,
                ..Default::default()
            },
        ] {
            assert!(create(&s, &o).is_err(), "{o:?}");
        }
    }
}
