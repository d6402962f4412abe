//! [`ImageControl`] for the images the daemon serves: a qcow2 image through the engine, a raw
//! file, or anything else (tests) with no engine behind it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};

use super::commands::{DedupInfo, DedupMode, EngineStatsInfo, ImageControl, DEDUP_NOT_ENABLED};
use crate::qcow2::info::image_info;
use crate::qcow2::Qcow2;
use crate::storage::FileStorage;

/// A qcow2 image served by the engine.
pub struct Qcow2Control {
    pub engine: Arc<Qcow2>,
    pub path: PathBuf,
}

impl Qcow2Control {
    fn set_paused(&self, paused: bool) -> Result<(), String> {
        self.engine
            .set_dedup_paused(paused)
            .map_err(|e| e.to_string())
    }
}

impl ImageControl for Qcow2Control {
    fn engine_stats(&self) -> Option<EngineStatsInfo> {
        Some(self.engine.stats().into())
    }

    fn dedup_info(&self) -> DedupInfo {
        let Some(d) = self.engine.dedup_stats() else {
            return DedupInfo::default();
        };
        DedupInfo {
            mode: self.engine.dedup_mode().into(),
            running: self.engine.dedup_worker_running(),
            paused: self.engine.dedup_paused(),
            clusters_deduplicated: d.clusters_deduplicated,
            clusters_written_unique: d.clusters_unique,
            zero_clusters_detected: d.zero_clusters,
            bytes_saved: d.bytes_saved,
            partial_cluster_reads: d.partial_cluster_reads,
            index_entries: d.index_entries,
            index_ram_bytes: d.index_ram_bytes,
            refcount_cap_hits: d.refcount_cap_hits,
            stale_hints_rejected: d.stale_hints_rejected,
            pending_clusters: d.pending_clusters,
            index_rebuild_running: d.rebuild_running,
            index_rebuild_clusters_done: d.rebuild_clusters_done,
            index_rebuild_clusters_total: d.rebuild_clusters_total,
            index_rebuild_clusters_hashed: d.rebuild_clusters_hashed,
        }
    }

    fn dedup_pause(&self) -> Result<(), String> {
        self.set_paused(true)
    }

    fn dedup_resume(&self) -> Result<(), String> {
        self.set_paused(false)
    }

    fn dedup_set_mode(&self, mode: DedupMode) -> Result<(), String> {
        self.engine
            .set_dedup_mode(mode.into())
            .map_err(|e| match e {
                crate::qcow2::Qcow2Error::DedupOff => DEDUP_NOT_ENABLED.to_string(),
                e => e.to_string(),
            })
    }

    /// `info` on the file as it is now, through a read-only descriptor of its own (the
    /// header, L1 and refcount tables are read; no cluster data).
    fn image_info(&self) -> Result<Value, String> {
        let file = File::open(&self.path)
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        let actual = file.metadata().map(|m| m.blocks() * 512).ok();
        let mut info = image_info(&FileStorage::new(file)).map_err(|e| e.to_string())?;
        info.filename = self.path.display().to_string();
        info.actual_size = actual;
        serde_json::to_value(&info).map_err(|e| e.to_string())
    }
}

/// A raw file (or any device without an engine): size and file name only.
pub struct PlainControl {
    pub path: PathBuf,
    pub format: &'static str,
    pub capacity: u64,
}

impl ImageControl for PlainControl {
    fn engine_stats(&self) -> Option<EngineStatsInfo> {
        None
    }

    fn image_info(&self) -> Result<Value, String> {
        let md = std::fs::metadata(&self.path).ok();
        let actual = md.as_ref().map(|m| m.blocks() * 512);
        // A raw image is as large as its file (which `block_resize` grows).
        let size = md.map_or(self.capacity, |m| m.len().max(self.capacity));
        let mut v = json!({
            "virtual-size": size,
            "filename": self.path.display().to_string(),
            "format": self.format,
            "dirty-flag": false,
        });
        if let (Some(a), Value::Object(m)) = (actual, &mut v) {
            m.insert("actual-size".into(), json!(a));
        }
        Ok(v)
    }
}

/// The answer of the image commands while the image is handed over.
pub const IMAGE_INACTIVE: &str =
    "the image is inactive (handed over; blockdev-set-active {\"active\": true} takes it back)";

/// The image side of a daemon that can hand its image over (`blockdev-set-active`): the
/// control of the open image while active, plain answers while not.
pub struct SwitchControl {
    current: std::sync::Mutex<Option<Box<dyn ImageControl>>>,
}

impl SwitchControl {
    pub fn new(current: Option<Box<dyn ImageControl>>) -> Arc<Self> {
        Arc::new(SwitchControl {
            current: std::sync::Mutex::new(current),
        })
    }

    /// The control of the image just opened, or None when it was closed.
    pub fn set(&self, c: Option<Box<dyn ImageControl>>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    fn with<R>(&self, f: impl FnOnce(&dyn ImageControl) -> R, inactive: R) -> R {
        match self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
        {
            Some(c) => f(c),
            None => inactive,
        }
    }
}

impl ImageControl for Arc<SwitchControl> {
    fn engine_stats(&self) -> Option<EngineStatsInfo> {
        self.with(|c| c.engine_stats(), None)
    }
    fn image_info(&self) -> Result<Value, String> {
        self.with(|c| c.image_info(), Err(IMAGE_INACTIVE.into()))
    }
    fn dedup_info(&self) -> DedupInfo {
        self.with(|c| c.dedup_info(), DedupInfo::default())
    }
    fn dedup_pause(&self) -> Result<(), String> {
        self.with(|c| c.dedup_pause(), Err(IMAGE_INACTIVE.into()))
    }
    fn dedup_resume(&self) -> Result<(), String> {
        self.with(|c| c.dedup_resume(), Err(IMAGE_INACTIVE.into()))
    }
    fn dedup_set_mode(&self, mode: DedupMode) -> Result<(), String> {
        self.with(|c| c.dedup_set_mode(mode), Err(IMAGE_INACTIVE.into()))
    }
}
