//! Opening an image: header and feature checks, repair of a dirty image, the L1 table, the
//! refcount structures and the overlap map, backing files, and the dedup state.

use super::dedup::{self, lifecycle};
use super::image::{AckDurability, OpenOptions, ProgressHook, Qcow2, LOCK_SPINS};
use super::meta::{l2_cache_cap, Geometry, Meta, L2_CACHE_BYTES, MAX_L1_BYTES};
use super::overlap::{kind, MetadataMap, OverlapMode};
use super::state::State;
use super::writeback::Writeback;
use super::{backing, refcount};
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::dedup::DedupMode;
use crate::qcow2::format::{self, header::*, Header};
use crate::storage::{FileStorage, Storage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};

/// Most RAM the overlap map may take at open by default.
const OVERLAP_MAP_CAP: usize = 64 << 20;

impl Qcow2 {
    /// Open the image file at `path`.
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2> {
        Self::open_with(path, &OpenOptions::read_only(read_only))
    }

    /// Open the image file at `path` with options.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let storage = if opts.direct {
            FileStorage::open_direct(path, !opts.read_only)?
        } else {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(path)?;
            FileStorage::new(file)
        };
        let dir = path.parent().map(Path::to_path_buf);
        Self::open_storage(Arc::new(storage), opts, dir.as_deref(), 0)
    }

    /// Open an image on any storage. Relative backing names resolve against `dir`.
    pub fn open_storage(
        storage: Arc<dyn Storage>,
        opts: &OpenOptions,
        dir: Option<&Path>,
        depth: u32,
    ) -> Result<Qcow2> {
        let read_only = opts.read_only;
        let s = storage.as_ref();
        let (mut h, mut file_len) = read_header(s)?;
        validate_features(&h, read_only)?;
        if !read_only && h.version >= 3 && h.incompatible_features & INCOMPAT_DIRTY != 0 {
            repair_dirty(s, opts.repair_progress.as_ref())?;
            (h, file_len) = read_header(s)?;
        }
        if !read_only && h.version >= 3 && h.autoclear_features != 0 {
            // We keep no bitmaps or raw external data in sync, and our own dedup bit says "the
            // dedup index matches the image", which stops being true with the first write: clear
            // them before anything is written, as QEMU does for bits it does not know. (`h` keeps
            // the bits as found: the dedup index decides from them whether to load.)
            log::info!(
                "clearing autoclear features {:#x} (not kept up to date while open)",
                h.autoclear_features
            );
            s.write_at(&0u64.to_be_bytes(), 88)?;
            s.flush()?;
        }
        let cb = h.cluster_bits;
        let cs = h.cluster_size();
        let l2_bits = cb - 3;
        let l1 = read_l1(s, &h, file_len)?;
        let mut rc = refcount::Refcounts::load(
            s,
            cb,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
        )?;
        let mut untracked = 0;
        // Only writes are checked: a read-only open (every backing file) builds no map.
        if opts.overlap_check != OverlapMode::None && !read_only {
            let cap = opts.overlap_map_cap.unwrap_or(OVERLAP_MAP_CAP);
            (rc.map, untracked) = metadata_map(s, &h, &l1, &rc, cap)?;
        }
        rc.check_mask = opts.overlap_check.mask() & !untracked;
        let backing = match &h.backing_file {
            Some(name) if !name.is_empty() => {
                let path = backing::resolve(name, dir);
                Some(backing::open(
                    &path,
                    h.backing_format().as_deref(),
                    depth,
                    opts.direct,
                )?)
            }
            _ => None,
        };
        let g = Geometry {
            cluster_bits: cb,
            l2_bits,
            version: h.version,
        };
        let l2_bytes = opts.l2_cache_bytes.unwrap_or(L2_CACHE_BYTES);
        let l2_cap = l2_cache_cap(l2_bytes, cs, h.l1_size as u64);
        let mut meta = Meta::new(g, h.size, l1, h.l1_table_offset, rc, l2_cap, file_len);
        meta.l2_cache_bytes = l2_bytes;
        meta.incompatible = h.incompatible_features;
        meta.lazy = !read_only
            && h.version >= 3
            && opts
                .lazy_refcounts
                .unwrap_or(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0);
        // Persist before ack: table pieces in units the storage writes without a bounce.
        let unit = storage
            .direct_fd()
            .map_or(512, |(_, align)| align.max(512))
            .min(cs);
        meta.wb = Writeback::new(
            !read_only && opts.ack_durability == AckDurability::File,
            unit,
        );
        let mut state = State { meta, dedup: None };
        let (mode, paused, new_setting) = open_dedup(s, &mut state, &h, file_len, opts)?;
        let dedup_on = state.dedup.is_some();
        let flush_wanted = state.meta.flush_wanted.clone();
        let img = Qcow2 {
            storage,
            meta: Mutex::new(state),
            cond: Condvar::new(),
            g,
            size: AtomicU64::new(h.size),
            header: h,
            backing,
            read_only,
            closed: AtomicBool::new(false),
            on_corrupt: Mutex::new(None),
            dedup_paused: AtomicBool::new(dedup_on && paused),
            dedup_on,
            dedup_mode: AtomicU32::new(if dedup_on { mode } else { DedupMode::Off }.bits()),
            work_cond: Condvar::new(),
            worker_stop: AtomicBool::new(false),
            guest_writes: AtomicU64::new(0),
            group: Default::default(),
            lock_spins: lock_spins(),
            wb: Mutex::new(()),
            flush_wanted,
        };
        if dedup_on && new_setting {
            // The mode this session runs in is the image's setting from now on.
            img.persist_dedup_setting()?;
        }
        Ok(img)
    }
}

/// How long a waiter spins before it sleeps: not at all on one CPU. Asked once per process
/// (`available_parallelism` reads cgroup files: a measurable share of opening a small image).
fn lock_spins() -> u32 {
    static SPINS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SPINS.get_or_init(|| match std::thread::available_parallelism() {
        Ok(n) if n.get() > 1 => LOCK_SPINS,
        _ => 0,
    })
}

/// Every metadata cluster of the image, by kind: header, active and inactive (snapshot) L1 and L2
/// tables, refcount table and blocks, snapshot table, bitmap directory.
fn metadata_map(
    s: &dyn Storage,
    h: &Header,
    l1: &[u64],
    rc: &refcount::Refcounts,
    cap: usize,
) -> Result<(MetadataMap, u16)> {
    let cs = h.cluster_size();
    let clusters = |off: u64, len: u64| (off / cs, (off % cs + len).div_ceil(cs).max(1));
    let mut m = MetadataMap::new();
    m.add(0, 1, kind::HEADER);
    let (f, n) = clusters(h.l1_table_offset, h.l1_size as u64 * 8);
    m.add(f, n, kind::ACTIVE_L1);
    // Each `add` rewrites a window's fragment list: add each run of L2 clusters once, not
    // once per L1 entry (a hostile L1 table may point all its entries at a few clusters).
    let l2s = |m: &mut MetadataMap, table: &[u64], k: u16| {
        let mut c: Vec<u64> = table
            .iter()
            .map(|&e| e & format::entries::L1E_OFFSET_MASK)
            .filter(|&off| off != 0)
            .map(|off| off / cs)
            .collect();
        c.sort_unstable();
        c.dedup();
        let mut i = 0;
        while i < c.len() {
            let mut n = 1;
            while i + n < c.len() && c[i + n] == c[i] + n as u64 {
                n += 1;
            }
            m.add(c[i], n as u64, k);
            i += n;
        }
    };
    l2s(&mut m, l1, kind::ACTIVE_L2);
    let (rt, rtc) = rc.table_location();
    m.add(rt / cs, rtc, kind::REFCOUNT_TABLE);
    for off in rc.block_offsets() {
        m.add(off / cs, 1, kind::REFCOUNT_BLOCK);
    }
    if let Some(ext) = h.extension(EXT_BITMAPS).filter(|e| e.len() >= 24) {
        let size = u64::from_be_bytes(ext[8..16].try_into().unwrap_or([0; 8]));
        let off = u64::from_be_bytes(ext[16..24].try_into().unwrap_or([0; 8]));
        if size > 0 && size <= 64 << 20 {
            let (f, n) = clusters(off, size);
            m.add(f, n, kind::BITMAP_DIRECTORY);
        }
    }
    if h.nb_snapshots > 0 {
        let file_len = s.len()?;
        let mut want = 64u64 << 10;
        let (snaps, bytes) = loop {
            let len = want.min(file_len.saturating_sub(h.snapshots_offset));
            let mut buf = vec![0u8; len as usize];
            s.read_at(&mut buf, h.snapshots_offset)?;
            match format::snapshot::decode_table(&buf, h.nb_snapshots) {
                Ok(r) => break r,
                Err(_) if want < 64 << 20 && len == want => want *= 4,
                Err(e) => return Err(e.into()),
            }
        };
        let (f, n) = clusters(h.snapshots_offset, bytes as u64);
        m.add(f, n, kind::SNAPSHOT_TABLE);
        for sn in snaps {
            let len = sn.l1_size as u64 * 8;
            if len > MAX_L1_BYTES || sn.l1_table_offset % cs != 0 {
                return Err(Qcow2Error::corrupt(format!(
                    "snapshot {:?} has an invalid L1 table",
                    sn.name
                )));
            }
            if m.ram_bytes() > cap {
                let k = kind::INACTIVE_L1 | kind::INACTIVE_L2;
                m.strip(k);
                log::warn!(
                    "overlap checks: the metadata map passed {cap} bytes; the {} internal \
                     snapshots' L1 and L2 tables are not checked",
                    h.nb_snapshots
                );
                return Ok((m, k));
            }
            let (f, n) = clusters(sn.l1_table_offset, len);
            m.add(f, n, kind::INACTIVE_L1);
            let mut buf = vec![0u8; len as usize];
            s.read_at(&mut buf, sn.l1_table_offset)?;
            l2s(&mut m, &format::decode_table(&buf), kind::INACTIVE_L2);
        }
        if m.ram_bytes() > cap {
            m.strip(kind::INACTIVE_L1 | kind::INACTIVE_L2);
            log::warn!("overlap checks: the metadata map passed {cap} bytes; internal snapshots' tables are not checked");
            return Ok((m, kind::INACTIVE_L1 | kind::INACTIVE_L2));
        }
    }
    Ok((m, 0))
}

/// The decoded header (cluster 0) and the file length.
/// The active L1 table, after checking that it covers the disk, is at most 32 MiB, cluster
/// aligned and inside the file.
fn read_l1(s: &dyn Storage, h: &Header, file_len: u64) -> Result<Vec<u64>> {
    let cs = h.cluster_size();
    let l2_bits = h.cluster_bits - 3;
    let needed_l1 = h.size.div_ceil(cs << l2_bits);
    if (h.l1_size as u64) < needed_l1 {
        return Err(Qcow2Error::corrupt(format!(
            "L1 table has {} entries, the disk size needs {needed_l1}",
            h.l1_size
        )));
    }
    let l1_bytes = h.l1_size as u64 * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Qcow2Error::corrupt(format!(
            "L1 table of {} entries is larger than 32 MiB",
            h.l1_size
        )));
    }
    if h.l1_size > 0 && (!h.l1_table_offset.is_multiple_of(cs) || h.l1_table_offset == 0) {
        return Err(Qcow2Error::corrupt(format!(
            "L1 table offset {:#x} is not cluster aligned",
            h.l1_table_offset
        )));
    }
    if h.l1_size > 0
        && h.l1_table_offset
            .checked_add(l1_bytes)
            .is_none_or(|e| e > file_len)
    {
        return Err(Qcow2Error::corrupt(
            "L1 table lies past the end of the file",
        ));
    }
    // Read in 1 MiB pieces: a 32 MiB L1 table is not held twice (as bytes and as entries).
    let mut l1 = Vec::with_capacity((l1_bytes / 8) as usize);
    let mut l1b = vec![0u8; l1_bytes.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < l1_bytes {
        let b = &mut l1b[..(l1_bytes - done).min(1 << 20) as usize];
        s.read_at(b, h.l1_table_offset + done)?;
        l1.extend(format::decode_table(b));
        done += b.len() as u64;
    }
    Ok(l1)
}

/// The dedup mode the options and the image's recorded setting ask for, whether it is paused,
/// and whether that differs from the recorded setting (to be written once open); with dedup on
/// (read-write only), its state is set up in `meta` (index loaded or rebuilt).
fn open_dedup(
    s: &dyn Storage,
    state: &mut State,
    h: &Header,
    file_len: u64,
    opts: &OpenOptions,
) -> Result<(DedupMode, bool, bool)> {
    let read_only = opts.read_only;
    let recorded = h
        .extension(crate::qcow2::format::dedup::EXT_DEDUP)
        .and_then(|d| crate::qcow2::format::dedup::DedupExtension::decode(d).ok());
    let recorded_mode = recorded.as_ref().map_or(DedupMode::Off, |e| e.mode);
    let mode = opts.dedup_mode.unwrap_or(match opts.dedup {
        Some(true) => DedupMode::Inline,
        Some(false) => DedupMode::Off,
        None => recorded_mode,
    });
    let paused = recorded.as_ref().is_some_and(|e| e.paused);
    let had_setting = recorded.is_some();
    let want_dedup = mode != DedupMode::Off;
    if want_dedup && !read_only {
        if h.version < 3 {
            return Err(Qcow2Error::Unsupported(
                "deduplication needs a qcow2 v3 image (compat 1.1)".into(),
            ));
        }
        let mut d = dedup::store::Dedup::new(state.rc.max_refcount());
        d.recorded = recorded;
        state.dedup = Some(d);
        lifecycle::open(
            s,
            state,
            h,
            file_len,
            opts.dedup_index_at_open.unwrap_or(true),
            opts.dedup_cache_bytes
                .unwrap_or(dedup::DEFAULT_RECORD_CACHE_BYTES),
            opts.dedup_rebuild_in_background,
        )?;
    }
    Ok((mode, paused, mode != recorded_mode || !had_setting))
}

fn read_header(s: &dyn Storage) -> Result<(Header, u64)> {
    let file_len = s.len()?;
    if file_len < 72 {
        return Err(format::FormatError::Truncated(file_len as usize).into());
    }
    let mut probe = [0u8; Header::PROBE_LEN];
    s.read_at(&mut probe, 0)?;
    let cb = Header::probe_cluster_bits(&probe)?;
    let mut c0 = vec![0u8; (1usize << cb).min(file_len as usize)];
    s.read_at(&mut c0, 0)?;
    Ok((Header::decode(&c0)?, file_len))
}

/// A dirty image (lazy refcounts, not closed cleanly) is repaired before a read-write open:
/// refcounts rebuilt from the tables, COPIED flags fixed, DIRTY cleared. The caller has already
/// refused what we cannot serve (and the corrupt bit). `progress` is told how it goes.
fn repair_dirty(s: &dyn Storage, progress: Option<&ProgressHook>) -> Result<()> {
    log::warn!("the image is dirty (lazy refcounts, not closed cleanly): repairing it");
    let t0 = std::time::Instant::now();
    let report = |done: u64, total: u64| {
        if let Some(p) = progress {
            p.report(done, total);
        }
    };
    let opts = crate::qcow2::check::CheckOptions {
        repair: Some(crate::qcow2::check::RepairMode::All),
        mark_clean: true,
        progress: progress.is_some().then_some(&report as &dyn Fn(u64, u64)),
    };
    let r = crate::qcow2::check::check(s, &opts)
        .map_err(|e| Qcow2Error::corrupt(format!("repairing the dirty image failed: {e}")))?;
    for m in r.messages.iter().take(20) {
        log::info!("repair: {m}");
    }
    log::warn!(
        "repair done in {:.2?}: {} corruptions and {} leaks fixed, {} corruptions left",
        t0.elapsed(),
        r.corruptions_fixed,
        r.leaks_fixed,
        r.corruptions
    );
    if r.corruptions > 0 {
        return Err(Qcow2Error::corrupt(format!(
            "{} corruptions remain after repair; run `vhost-user-qcow2 check` for details",
            r.corruptions
        )));
    }
    Ok(())
}

/// Refuse what this engine cannot serve, naming the feature.
fn validate_features(h: &Header, read_only: bool) -> Result<()> {
    if h.crypt_method != 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "encryption (crypt_method {})",
            h.crypt_method
        )));
    }
    let inc = h.incompatible_features;
    if inc & INCOMPAT_DATA_FILE != 0 || h.extension(EXT_DATA_FILE).is_some() {
        return Err(Qcow2Error::Unsupported("external data file".into()));
    }
    if inc & INCOMPAT_EXTL2 != 0 {
        return Err(Qcow2Error::Unsupported(
            "extended L2 entries (subclusters)".into(),
        ));
    }
    if inc & !INCOMPAT_KNOWN != 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "unknown incompatible feature bits {:#x}",
            inc & !INCOMPAT_KNOWN
        )));
    }
    if h.compression_type != COMPRESSION_ZLIB && h.compression_type != COMPRESSION_ZSTD {
        return Err(Qcow2Error::Unsupported(format!(
            "compression type {}",
            h.compression_type
        )));
    }
    if h.extension(EXT_CRYPTO).is_some() {
        return Err(Qcow2Error::Unsupported("encryption (LUKS header)".into()));
    }
    if !read_only && inc & INCOMPAT_CORRUPT != 0 {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    Ok(())
}
