//! The commands of the control socket: argument checking and the shapes of their answers.
//! What they report comes from two places: the daemon ([`DaemonView`]: run state, per-queue
//! counters, quitting) and the image ([`ImageControl`]: engine counters, `info`, dedup).

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::qmp::{Handler, QmpError};
use crate::qcow2::EngineStats;
use crate::virtio::QueueSnapshot;

/// The answer of the dedup commands while the engine has no deduplication.
pub const DEDUP_NOT_ENABLED: &str = "deduplication is not enabled on this image";

/// Every command, for `query-commands`.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-status",
    "query-stats",
    "query-image",
    "query-dedup",
    "dedup-pause",
    "dedup-resume",
    "dedup-set-mode",
    "blockdev-set-active",
    "block_resize",
    "quit",
];

/// `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StatusInfo {
    /// "running" (the daemon stops answering once it shuts down).
    pub status: String,
    pub running: bool,
    pub singlestep: bool,
    /// A VMM is connected to the vhost-user socket.
    pub vmm_connected: bool,
    pub read_only: bool,
    /// The image is open and served (false between `blockdev-set-active {"active": false}`
    /// and the next activation, or from an `--inactive` start).
    pub active: bool,
}

/// The engine's counters in `query-stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EngineStatsInfo {
    pub l2_cache_hits: u64,
    pub l2_cache_misses: u64,
    pub clusters_allocated: u64,
    pub clusters_freed: u64,
    pub cow_clusters: u64,
    pub metadata_flushes: u64,
    pub locked_flushes: u64,
}

impl From<EngineStats> for EngineStatsInfo {
    fn from(s: EngineStats) -> Self {
        EngineStatsInfo {
            l2_cache_hits: s.l2_hits,
            l2_cache_misses: s.l2_misses,
            clusters_allocated: s.clusters_allocated,
            clusters_freed: s.clusters_freed,
            cow_clusters: s.cow_clusters,
            metadata_flushes: s.metadata_flushes,
            locked_flushes: s.locked_flushes,
        }
    }
}

/// `query-stats`: one entry per queue, their sum, and the engine's counters (null for raw).
#[derive(Debug, Clone, Serialize)]
pub struct StatsInfo {
    pub queues: Vec<QueueSnapshot>,
    pub total: QueueSnapshot,
    pub engine: Option<EngineStatsInfo>,
}

/// Deduplication mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    #[default]
    Off,
    Inline,
    Background,
}

impl From<crate::qcow2::format::dedup::DedupMode> for DedupMode {
    fn from(m: crate::qcow2::format::dedup::DedupMode) -> Self {
        use crate::qcow2::format::dedup::DedupMode as M;
        match m {
            M::Off => DedupMode::Off,
            M::Inline => DedupMode::Inline,
            M::Background => DedupMode::Background,
        }
    }
}

impl From<DedupMode> for crate::qcow2::format::dedup::DedupMode {
    fn from(m: DedupMode) -> Self {
        match m {
            DedupMode::Off => Self::Off,
            DedupMode::Inline => Self::Inline,
            DedupMode::Background => Self::Background,
        }
    }
}

impl DedupMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DedupMode::Off),
            "inline" => Some(DedupMode::Inline),
            "background" => Some(DedupMode::Background),
            _ => None,
        }
    }
}

/// `query-dedup`: the mode, the background worker's state, and the dedup metrics. All zero
/// until the engine deduplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DedupInfo {
    pub mode: DedupMode,
    /// The background worker is running (not paused, not off).
    pub running: bool,
    pub paused: bool,
    pub clusters_deduplicated: u64,
    pub clusters_written_unique: u64,
    pub zero_clusters_detected: u64,
    pub bytes_saved: u64,
    pub partial_cluster_reads: u64,
    pub index_entries: u64,
    pub index_ram_bytes: u64,
    pub refcount_cap_hits: u64,
    pub stale_hints_rejected: u64,
    /// Clusters written in background mode and not yet processed by the worker.
    pub pending_clusters: u64,
    /// The index is being rebuilt from the data (after a crash or a writable QEMU open) while
    /// the image is served: guest clusters passed of the total, and data clusters hashed.
    pub index_rebuild_running: bool,
    pub index_rebuild_clusters_done: u64,
    pub index_rebuild_clusters_total: u64,
    pub index_rebuild_clusters_hashed: u64,
}

/// What the image side answers. Runs on the daemon's main thread: keep each call short.
pub trait ImageControl: Send {
    /// The engine's counters (None for a raw image).
    fn engine_stats(&self) -> Option<EngineStatsInfo>;
    /// What `vhost-user-qcow2 info --output json` says about the image, now.
    fn image_info(&self) -> Result<Value, String>;
    fn dedup_info(&self) -> DedupInfo {
        DedupInfo::default()
    }
    fn dedup_pause(&self) -> Result<(), String> {
        Err(DEDUP_NOT_ENABLED.into())
    }
    fn dedup_resume(&self) -> Result<(), String> {
        Err(DEDUP_NOT_ENABLED.into())
    }
    fn dedup_set_mode(&self, _mode: DedupMode) -> Result<(), String> {
        Err(DEDUP_NOT_ENABLED.into())
    }
}

/// What the daemon answers.
pub trait DaemonView {
    fn status(&self) -> StatusInfo;
    fn queue_stats(&self) -> Vec<QueueSnapshot>;
    /// Begin a clean shutdown (as SIGTERM does) once the reply is sent.
    fn quit(&mut self);
    /// Open (`true`) or hand over (`false`) the image: `blockdev-set-active`.
    fn set_active(&mut self, _active: bool) -> Result<(), String> {
        Err("this daemon cannot hand its image over".into())
    }
    /// Grow the disk to `size` bytes and tell a connected frontend: `block_resize`.
    fn resize(&mut self, _size: u64) -> Result<(), String> {
        Err("this daemon cannot resize its image".into())
    }
}

/// The command table: implements [`Handler`] over a daemon and an image.
pub struct Commands<'a> {
    pub daemon: &'a mut dyn DaemonView,
    pub image: &'a dyn ImageControl,
    pub version: super::qmp::Version,
}

fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(format!("internal error: {e}")))
}

/// `blockdev-set-active`'s arguments: `active` (bool), and `node-name`, which may name only
/// the one image served (any string is taken: there is one node).
fn set_active_args(args: &Map<String, Value>) -> Result<bool, QmpError> {
    if let Some(k) = args
        .keys()
        .find(|k| !matches!(k.as_str(), "active" | "node-name"))
    {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    if args.get("node-name").is_some_and(|v| !v.is_string()) {
        return Err(QmpError::generic(
            "Invalid parameter type for 'node-name', expected: string",
        ));
    }
    match args.get("active") {
        None => Err(QmpError::generic("Parameter 'active' is missing")),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'active', expected: boolean",
        )),
    }
}

/// `block_resize`'s arguments: `size` (bytes), and `node-name` or `device`, which may name only
/// the one image served (any string is taken, as for `blockdev-set-active`).
fn resize_args(args: &Map<String, Value>) -> Result<u64, QmpError> {
    if let Some(k) = args
        .keys()
        .find(|k| !matches!(k.as_str(), "size" | "node-name" | "device"))
    {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    for k in ["node-name", "device"] {
        if args.get(k).is_some_and(|v| !v.is_string()) {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            )));
        }
    }
    match args.get("size") {
        None => Err(QmpError::generic("Parameter 'size' is missing")),
        Some(v) if v.as_i64().is_some_and(|n| n < 0) => Err(QmpError::generic(
            "Parameter 'size' must be a non-negative number of bytes",
        )),
        Some(v) => v.as_u64().ok_or_else(|| {
            QmpError::generic("Invalid parameter type for 'size', expected: integer")
        }),
    }
}

fn dedup_mode_arg(args: &Map<String, Value>) -> Result<DedupMode, QmpError> {
    if let Some(k) = args.keys().find(|k| k.as_str() != "mode") {
        return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
    }
    match args.get("mode") {
        None => Err(QmpError::generic("Parameter 'mode' is missing")),
        Some(Value::String(s)) => DedupMode::parse(s).ok_or_else(|| {
            QmpError::generic(format!("Parameter 'mode' does not accept value '{s}'"))
        }),
        Some(_) => Err(QmpError::generic(
            "Invalid parameter type for 'mode', expected: string",
        )),
    }
}

impl Handler for Commands<'_> {
    fn execute(&mut self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        log::debug!("control: {name} {args:?}");
        match name {
            "query-commands" => {
                no_args(args)?;
                Ok(Value::Array(
                    COMMANDS.iter().map(|c| json!({"name": c})).collect(),
                ))
            }
            "query-version" => {
                no_args(args)?;
                let v = self.version;
                Ok(json!({
                    "qemu": {"major": v.major, "minor": v.minor, "micro": v.micro},
                    "package": concat!("vhost-user-qcow2 ", env!("CARGO_PKG_VERSION")),
                }))
            }
            "query-status" => {
                no_args(args)?;
                to_value(&self.daemon.status())
            }
            "query-stats" => {
                no_args(args)?;
                let queues = self.daemon.queue_stats();
                let mut total = QueueSnapshot::default();
                for q in &queues {
                    total.add(q);
                }
                to_value(&StatsInfo {
                    queues,
                    total,
                    engine: self.image.engine_stats(),
                })
            }
            "query-image" => {
                no_args(args)?;
                self.image.image_info().map_err(QmpError::generic)
            }
            "query-dedup" => {
                no_args(args)?;
                to_value(&self.image.dedup_info())
            }
            "dedup-pause" => {
                no_args(args)?;
                self.image.dedup_pause().map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "dedup-resume" => {
                no_args(args)?;
                self.image.dedup_resume().map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "dedup-set-mode" => {
                let mode = dedup_mode_arg(args)?;
                self.image.dedup_set_mode(mode).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "blockdev-set-active" => {
                let active = set_active_args(args)?;
                self.daemon.set_active(active).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "block_resize" => {
                let size = resize_args(args)?;
                self.daemon.resize(size).map_err(QmpError::generic)?;
                Ok(json!({}))
            }
            "quit" => {
                no_args(args)?;
                self.daemon.quit();
                Ok(json!({}))
            }
            _ => Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }
}

#[cfg(test)]
#[path = "commands_tests.rs"]
mod tests;
