//! The dedup index across sessions: load or rebuild it at open, write it back at a clean close.
//! The protocol (docs/dedup.md): the `DDUP` extension names the index area, its generation and a
//! seal over the header fields QEMU changes; the autoclear bit 63 says "the index matches the
//! image". Every read-write open clears that bit before anything is written; a clean close writes
//! the index, then the extension, then sets the bit again.

use super::pending::Pending;
use super::rebuild;
use super::rebuild_state::Rebuild;
use super::records::{Area, Records};
use super::store::{Dedup, IndexOpenReport};
use crate::qcow2::engine::overlap::kind;
use crate::qcow2::engine::state::State;
use crate::qcow2::error::{Qcow2Error, Result};
use crate::qcow2::format::dedup as codec;
use crate::qcow2::format::dedup::{
    DedupExtension, DedupMode, IndexCluster, SealInput, Trust, AUTOCLEAR_DEDUP, EXT_DEDUP, PENDING,
};
use crate::qcow2::format::{Header, L1Entry, L2Entry};
use crate::qcow2::hashindex::is_zero;
use crate::storage::Storage;
use std::collections::BTreeSet;

/// Bytes read at once when loading the index area.
const LOAD_CHUNK: u64 = 4 << 20;

fn seal_input(h: &Header, file_len: u64, generation: u64) -> SealInput {
    SealInput::of(h, file_len, generation)
}

/// Whether `area` can hold the index: inside the file, every cluster free (refcount 0), and no
/// known metadata. (The allocator skips it while reserved, and places no refcount block or table
/// on it.)
fn area_usable(s: &dyn Storage, m: &mut State, a: &Area, file_len: u64) -> Result<bool> {
    let cs = m.g.cluster_size();
    let Some(end) = a
        .clusters
        .checked_mul(cs)
        .and_then(|l| l.checked_add(a.offset))
    else {
        return Ok(false);
    };
    if a.offset == 0 || end > file_len || m.rc.guard(a.offset, end - a.offset, 0).is_err() {
        return Ok(false);
    }
    for c in a.offset / cs..end / cs {
        if m.rc.get(s, c)? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A new index area of `n` clusters, all free (refcount 0), reserved from the allocator; the
/// file grows to cover it. It takes the first free run of `n` clusters, not the end of the
/// file: most often that is the area of a session that ended before it could record it (a
/// crash), which would otherwise make the file grow by a whole area (8 TiB for 512 PiB at 2 MiB
/// clusters) at every unclean restart.
fn new_area(s: &dyn Storage, m: &mut State, n: u64, file_len: u64) -> Result<Area> {
    let a = free_area(s, m, n, file_len, None)?;
    let cs = m.g.cluster_size();
    m.rc.reserve(a.offset / cs, n, kind::DEDUP_INDEX);
    Ok(a)
}

/// A run of `n` free clusters for an index area (not reserved yet), away from `avoid` (the
/// area in use: the allocator's search does not see it, since its refcounts are 0); the file
/// grows to cover it.
fn free_area(
    s: &dyn Storage,
    m: &mut State,
    n: u64,
    file_len: u64,
    avoid: Option<Area>,
) -> Result<Area> {
    let cs = m.g.cluster_size();
    let mut first = m.rc.free_run(s, 1, n)?;
    if let Some(a) = avoid {
        let end = a.offset / cs + a.clusters;
        if first < end && a.offset / cs < first.saturating_add(n) {
            first = m.rc.free_run(s, end, n)?;
        }
    }
    if m.rc
        .guard(first.saturating_mul(cs), n.saturating_mul(cs), 0)
        .is_err()
    {
        // Known metadata with a refcount of 0 there (a damaged image): past everything instead.
        let past = file_len.div_ceil(cs).max(m.rc.allocations).max(first);
        first = m.rc.free_run(s, past, n)?;
    }
    let end = first
        .checked_add(n)
        .and_then(|e| e.checked_mul(cs))
        .ok_or_else(|| Qcow2Error::Unsupported("the dedup index area overflows".into()))?;
    if let Err(e) = m.extend_file(s, end) {
        // The area takes 32 bytes per guest cluster (a hole until written, but the file must
        // reach that far): 16 TiB for 512 PiB at 1 MiB clusters, past ext4's largest file.
        return Err(Qcow2Error::Unsupported(format!(
            "the dedup index area ({} GiB of file, 32 bytes per guest cluster) cannot be made: \
             the file would end at {} GiB ({e}); serve it with --dedup off, or use larger \
             clusters",
            (n * cs) >> 30,
            end >> 30
        )));
    }
    Ok(Area {
        offset: end - n * cs,
        clusters: n,
    })
}

/// The disk grew to `new_size` bytes: the records of the new guest clusters need room. A
/// larger area is taken, the index clusters this generation has in the file are copied there,
/// and it replaces the old one (whose clusters, refcount 0, go back to the allocator). The
/// index is not trusted while the image is open (autoclear bit clear), and a clean close
/// writes it and seals it over the new header, so a crash anywhere here costs only a rebuild.
pub(crate) fn grow(s: &dyn Storage, m: &mut State, new_size: u64) -> Result<()> {
    let cs = m.g.cluster_size();
    let cb = m.g.cluster_bits;
    let guest_clusters = new_size / cs;
    let Some(mut d) = m.dedup.take() else {
        return Ok(());
    };
    d.pending.grow(guest_clusters);
    let r = grow_records(s, m, &mut d, guest_clusters, cb);
    m.dedup = Some(d);
    r
}

fn grow_records(
    s: &dyn Storage,
    m: &mut State,
    d: &mut Dedup,
    guest_clusters: u64,
    cb: u32,
) -> Result<()> {
    let need = codec::index_clusters_for(cb, guest_clusters);
    let old = d.records.as_ref().map(|r| r.area);
    if need <= old.map_or(0, |a| a.clusters) {
        return Ok(());
    }
    let area = free_area(s, m, need, s.len()?, old)?;
    let cs = m.g.cluster_size();
    // Before anything is written there (a move that fails part way leaves bytes behind).
    m.rc.not_holes(area.offset / cs, need);
    match d.records.as_mut() {
        Some(r) => r.move_to(s, area)?,
        None => {
            let generation = d.recorded.as_ref().map_or(0, |e| e.generation) + 1;
            let cache = super::store::DEFAULT_RECORD_CACHE_BYTES;
            d.records = Some(Records::new(cb, area, generation, false, cache));
        }
    }
    // Replaces the old area's reservation.
    m.rc.reserve(area.offset / cs, need, kind::DEDUP_INDEX);
    log::info!(
        "dedup index area moved to {:#x} ({need} clusters) for {guest_clusters} guest clusters",
        area.offset
    );
    Ok(())
}

/// At a read-write open with dedup: find the clusters shared by more than one active entry (when
/// such a refcount falls back to 1 the survivor must get COPIED back), and load the index, or
/// set up its rebuild from the data (`hash_data`; offline dedup passes false and builds it as it
/// goes). With `background` the data is hashed after the open, while the image is served
/// (`rebuild.rs`; the dedup worker runs it), else here. The caller has cleared the autoclear bit
/// already.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open(
    s: &dyn Storage,
    m: &mut State,
    h: &Header,
    file_len: u64,
    hash_data: bool,
    cache_bytes: u64,
    background: bool,
) -> Result<IndexOpenReport> {
    let t0 = std::time::Instant::now();
    let guest_clusters = m.size / m.g.cluster_size();
    let rpc = codec::records_per_cluster(m.g.cluster_bits);
    let mut d = m.dedup.take().ok_or(Qcow2Error::DedupOff)?;
    d.pending = Pending::new(guest_clusters);
    let mut rep = IndexOpenReport::default();
    let (mut recs, load) = place_records(s, m, &d, h, file_len, hash_data, cache_bytes, &mut rep)?;
    // Guest clusters to hash: all of them on a rebuild; after a load, the ranges of the index
    // clusters that did not load, and what a rebuild stopped by a clean close left.
    let todo: Vec<(u64, u64)> = match (load, recs.as_mut()) {
        (true, Some(r)) => {
            let bad = load_records(s, r, &mut d, (m.g.cluster_bits, guest_clusters), &mut rep)?;
            let from = d.recorded.as_ref().and_then(|e| e.rebuild_from);
            bad.iter()
                .map(|k| (k * rpc, ((k + 1) * rpc).min(guest_clusters)))
                .chain(from.map(|g| (g, guest_clusters)))
                .collect()
        }
        (false, Some(_)) if hash_data => vec![(0, guest_clusters)],
        _ => Vec::new(),
    };
    scan_shared(s, m)?;
    rep.how = if load {
        "loaded"
    } else if hash_data {
        "rebuilt"
    } else {
        "empty"
    }
    .to_string();
    d.records = recs;
    d.rebuild = Rebuild::new(todo);
    let to_hash = d.rebuild.as_ref().map_or(0, |r| r.total);
    rep.background = background && to_hash > 0;
    d.open_report = rep;
    m.dedup = Some(d);
    if !background {
        rebuild::run_now(m, s)?;
    }
    let Some(d) = m.dedup.as_mut() else {
        return Err(Qcow2Error::DedupOff);
    };
    d.open_report.millis = t0.elapsed().as_millis() as u64;
    let rep = d.open_report.clone();
    let how = if rep.background && !load {
        "set up for a rebuild"
    } else {
        rep.how.as_str()
    };
    log::info!(
        "dedup index {how} in {:.2?}: {} hints, {} data clusters hashed, {} bad index clusters, \
         {} clusters pending background dedup{}{}",
        t0.elapsed(),
        rep.hints,
        rep.clusters_hashed,
        rep.bad_index_clusters,
        d.pending.len(),
        rep.reason
            .as_ref()
            .map(|r| format!(" (rebuilt because: {r})"))
            .unwrap_or_default(),
        if rep.background {
            format!("; the data of {to_hash} guest clusters is hashed in the background")
        } else {
            String::new()
        }
    );
    Ok(rep)
}

/// Decide where the records live: the recorded area when it is still usable (and whether its
/// records may be loaded: sealed, same generation, `hash_data`), else a new area. Reserves the
/// area and sets up the record cache (None for a disk smaller than one cluster). Returns it
/// with whether to load; `rep.reason` says why not.
#[allow(clippy::too_many_arguments)]
fn place_records(
    s: &dyn Storage,
    m: &mut State,
    d: &Dedup,
    h: &Header,
    file_len: u64,
    hash_data: bool,
    cache_bytes: u64,
    rep: &mut IndexOpenReport,
) -> Result<(Option<Records>, bool)> {
    let cb = m.g.cluster_bits;
    let cs = m.g.cluster_size();
    let need = codec::index_clusters_for(cb, m.size / cs);
    let ext = d.recorded.as_ref();
    let old_area = match ext {
        Some(e) if e.index_clusters == need && e.cluster_bits == cb && need > 0 => {
            let a = Area {
                offset: e.index_offset,
                clusters: need,
            };
            area_usable(s, m, &a, file_len)?.then_some(a)
        }
        _ => None,
    };
    let trust = match ext {
        Some(e) => codec::trust(
            h.autoclear_features,
            e,
            &seal_input(h, file_len, e.generation),
        ),
        None => Trust::Rebuild("no index"),
    };
    let generation = ext.map_or(0, |e| e.generation);
    let load = hash_data && old_area.is_some() && trust == Trust::Load;
    if let Trust::Rebuild(why) = trust {
        rep.reason = Some(why.to_string());
    } else if old_area.is_none() {
        rep.reason = Some("the index area was taken or resized".to_string());
    }
    if need == 0 {
        return Ok((None, load));
    }
    let area = match old_area {
        Some(a) => {
            m.rc.reserve(a.offset / cs, a.clusters, kind::DEDUP_INDEX);
            a
        }
        None => new_area(s, m, need, file_len)?,
    };
    let generation = if load { generation } else { generation + 1 };
    let area_bytes = need.saturating_mul(cs);
    if area_bytes > cache_bytes {
        log::info!(
            "dedup records take {} MiB and the record cache holds {} MiB: writes spread \
             over more of the disk than that read and write back an index cluster each",
            area_bytes >> 20,
            cache_bytes >> 20
        );
    }
    Ok((
        Some(Records::new(cb, area, generation, load, cache_bytes)),
        load,
    ))
}

/// Load the records of a trusted area into `d` (hints and pending clusters; records past the
/// disk's `guest_clusters` are ignored). Returns the index clusters that did not decode: their
/// ranges are hashed again.
fn load_records(
    s: &dyn Storage,
    r: &mut Records,
    d: &mut Dedup,
    (cb, guest_clusters): (u32, u64),
    rep: &mut IndexOpenReport,
) -> Result<BTreeSet<u64>> {
    let cs = 1u64 << cb;
    let need = r.area.clusters;
    let mut bad = BTreeSet::new();
    let per = (LOAD_CHUNK / cs).max(1);
    let mut buf = vec![0u8; (per * cs) as usize];
    let mut k0 = 0;
    while k0 < need {
        // Holes hold no records (`Records::write_all` leaves the empty ranges as holes): skip
        // them, or a huge disk's area (8 TiB for 512 PiB) would be read as zeros.
        match s.next_data(r.area.offset + k0 * cs)? {
            None => break,
            Some(at) => {
                let k = (at - r.area.offset) / cs;
                if k >= need {
                    break;
                }
                k0 = k0.max(k);
            }
        }
        let n = per.min(need - k0);
        let b = &mut buf[..(n * cs) as usize];
        s.read_at(b, r.area.offset + k0 * cs)?;
        for (j, c) in b.chunks_exact(cs as usize).enumerate() {
            let k = k0 + j as u64;
            if is_zero(c) {
                // No records for this range (written as a hole).
                continue;
            }
            match IndexCluster::decode(c, cb, r.generation, k) {
                Ok(ic) => {
                    for (i, rec) in ic.records.iter().enumerate() {
                        let gc = ic.first + i as u64;
                        if *rec == PENDING {
                            d.pending.insert(gc);
                        } else if *rec != [0u8; 32] && gc < guest_clusters {
                            d.index.insert_limited(rec, gc);
                            rep.hints += 1;
                        }
                    }
                }
                Err(e) => {
                    log::warn!("dedup index cluster {k} ignored ({e}): hashing its range");
                    r.mark_lost(k);
                    bad.insert(k);
                    rep.bad_index_clusters += 1;
                }
            }
        }
        k0 += n;
    }
    Ok(bad)
}

/// One pass over the active L2 tables: note the clusters shared by more than one entry.
fn scan_shared(s: &dyn Storage, m: &mut State) -> Result<()> {
    let cs = m.g.cluster_size();
    let guest_clusters = m.size / cs;
    let per_table = 1u64 << m.g.l2_bits;
    for i in 0..m.l1.len() as u64 {
        if L1Entry::decode(m.l1[i as usize]).l2_offset.is_none() {
            continue;
        }
        for gc in i * per_table..((i + 1) * per_table).min(guest_clusters) {
            let L2Entry::Normal {
                host,
                copied: false,
            } = m.entry(s, gc)?
            else {
                continue;
            };
            let hc = host.0 / cs;
            if m.rc.get(s, hc)? >= 2 {
                m.sharing.add(hc, gc);
            }
        }
    }
    Ok(())
}

/// At a clean close (after the refcounts are written): write the index, then our header
/// extension with the setting, the counters of every session so far, and the seal, then set the
/// autoclear bit that says the index matches the image. QEMU keeps the extension but does not
/// read it; no feature bit QEMU would refuse. An extension of the same size is rewritten in place;
/// a new one rewrites cluster 0 as QEMU does.
pub(crate) fn close(
    s: &dyn Storage,
    d: &mut Dedup,
    cluster_bits: u32,
    mode: DedupMode,
    paused: bool,
) -> Result<()> {
    let mut ext = current_extension(d, cluster_bits, mode, paused);
    let st = d.snapshot_stats();
    let c = &mut ext.counters;
    c.deduplicated += st.clusters_deduplicated;
    c.written_unique += st.clusters_unique;
    c.zero_detected += st.zero_clusters;
    c.bytes_saved += st.bytes_saved;
    c.partial_reads += st.partial_cluster_reads;
    c.cap_hits += st.refcount_cap_hits;
    c.stale_rejected += st.stale_hints_rejected;
    let resume = d.rebuild.as_ref().and_then(Rebuild::resume_point);
    let sealed = match d.records.as_mut() {
        Some(r) => {
            r.write_all(s)?;
            s.flush()?;
            ext.index_offset = r.area.offset;
            ext.index_clusters = r.clusters();
            ext.generation = r.generation;
            ext.rebuild_from = resume;
            true
        }
        None => {
            ext.index_offset = 0;
            ext.index_clusters = 0;
            ext.rebuild_from = None;
            false
        }
    };
    if let Some(g) = resume.filter(|_| sealed) {
        log::info!(
            "dedup index rebuild stopped by the close at guest cluster {g}: the next open goes \
             on from there"
        );
    }
    let header = write_extension(s, &mut ext, cluster_bits, true)?;
    if sealed {
        let bits = header.autoclear_features | AUTOCLEAR_DEDUP;
        s.write_at(&bits.to_be_bytes(), 88)?;
        s.flush()?;
    }
    d.recorded = Some(ext);
    Ok(())
}

/// Write `ext` into the header (in place when an extension of the same size is there, else by
/// rewriting cluster 0 as QEMU does) and sync; with `seal`, seal it over the header and file as
/// they are on disk now. Returns the header.
fn write_extension(
    s: &dyn Storage,
    ext: &mut DedupExtension,
    cluster_bits: u32,
    seal: bool,
) -> Result<Header> {
    let mut c0 = vec![0u8; 1usize << cluster_bits];
    s.read_at(&mut c0, 0)?;
    let header = Header::decode(&c0)?;
    if seal {
        ext.seal = codec::seal(&seal_input(&header, s.len()?, ext.generation));
    }
    let data = ext.encode();
    match Header::extension_offset(&c0, EXT_DEDUP) {
        Some(off) if header.extension(EXT_DEDUP).map(<[u8]>::len) == Some(data.len()) => {
            s.write_at(&data, off as u64)?;
        }
        _ => {
            let mut h = header.clone();
            h.set_extension(EXT_DEDUP, Some(data));
            s.write_at(&h.encode()?, 0)?;
        }
    }
    s.flush()?;
    Ok(header)
}

/// While open: record a new mode or pause state in the image at once (the counters and the index
/// fields stay as they were at open; the autoclear bit is clear while we run, so nothing trusts
/// them before the next clean close rewrites them).
pub(crate) fn write_setting(
    s: &dyn Storage,
    d: &mut Dedup,
    cluster_bits: u32,
    mode: DedupMode,
    paused: bool,
) -> Result<()> {
    let mut ext = current_extension(d, cluster_bits, mode, paused);
    write_extension(s, &mut ext, cluster_bits, false)?;
    d.recorded = Some(ext);
    Ok(())
}

/// The extension as found at open (or a new one), with the setting of now.
fn current_extension(
    d: &Dedup,
    cluster_bits: u32,
    mode: DedupMode,
    paused: bool,
) -> DedupExtension {
    let cap = d.cap.min(u32::MAX as u64) as u32;
    let mut ext = d
        .recorded
        .clone()
        .unwrap_or_else(|| DedupExtension::new(mode, cluster_bits, cap));
    ext.mode = mode;
    ext.paused = paused;
    ext.cluster_bits = cluster_bits;
    ext
}
