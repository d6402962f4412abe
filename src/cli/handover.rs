//! The image as `serve` holds it while active (the open device, its locks, the background
//! dedup worker, the engine for the periodic jobs), and the handover that closes and opens it
//! at run time (`blockdev-set-active`, `serve --inactive`).

use std::sync::{Arc, Mutex};

use anyhow::Context;
use vhost_user_qcow2::active::ActiveDevice;
use vhost_user_qcow2::control::{
    EventSender, ImageControl, PlainControl, Qcow2Control, SwitchControl,
};
use vhost_user_qcow2::qcow2::engine::DedupWorker;
use vhost_user_qcow2::qcow2::Qcow2;
use vhost_user_qcow2::storage::FileStorage;
use vhost_user_qcow2::vhost::Handover;

use super::open::{open_device, OpenArgs, OpenImage};

/// An open image and what runs with it. Dropping it stops the worker and releases the locks
/// (close the device first).
pub struct Session {
    pub image: OpenImage,
    pub _worker: Option<DedupWorker>,
}

/// The engine the periodic jobs (the lazy-refcount timer) work on, if an image is open.
pub type Current = Arc<Mutex<Option<Arc<Qcow2>>>>;

impl Session {
    /// Open the image, report corruption on `events`, start the background dedup worker.
    pub fn open(a: &OpenArgs, events: Option<&EventSender>) -> anyhow::Result<Session> {
        let image = open_device(a)?;
        if let (Some(q), Some(ev)) = (&image.qcow2, events) {
            let ev = ev.clone();
            q.set_corruption_listener(Box::new(move |msg| {
                ev.image_corrupted("qcow2", msg, None, None, true);
            }));
        }
        // The background dedup worker rebuilds the index when the open left that to it, then
        // sleeps unless clusters are pending. Closing the device stops it before its next
        // cluster or batch; dropping the handle joins it.
        let worker = image.qcow2.as_ref().and_then(|q| q.start_dedup_worker());
        Ok(Session {
            image,
            _worker: worker,
        })
    }

    /// What the control socket reports about this image.
    pub fn control(&self, path: &std::path::Path) -> Box<dyn ImageControl> {
        match self.image.qcow2.clone() {
            Some(engine) => Box::new(Qcow2Control {
                engine,
                path: path.to_path_buf(),
            }),
            None => Box::new(PlainControl {
                path: path.to_path_buf(),
                format: "raw",
                capacity: self.image.device.capacity(),
            }),
        }
    }
}

/// Size, mode and discard granularity of the image, read without opening it for real (no
/// lock, nothing written): what an inactive daemon announces to the VMM.
pub fn probe(a: &OpenArgs) -> anyhow::Result<(u64, u32)> {
    let f = std::fs::File::open(&a.path)
        .with_context(|| format!("cannot open image {}", a.path.display()))?;
    let len = f.metadata()?.len();
    let st = FileStorage::new(f);
    match vhost_user_qcow2::qcow2::info::image_info(&st) {
        Ok(i) => Ok((
            i.virtual_size,
            u32::try_from(i.cluster_size).unwrap_or(u32::MAX),
        )),
        // Not qcow2: served raw, as `open_device` does.
        Err(_) => Ok((len, 4096)),
    }
}

/// `blockdev-set-active` for `serve`.
pub struct ImageHandover {
    pub args: OpenArgs,
    pub device: Arc<ActiveDevice>,
    pub control: Arc<SwitchControl>,
    pub current: Current,
    pub events: Option<EventSender>,
    pub session: Option<Session>,
}

impl ImageHandover {
    /// Serve the open session `s`.
    pub fn install(&mut self, s: Session) -> Result<(), String> {
        self.device
            .activate(s.image.device.clone())
            .map_err(|e| e.to_string())?;
        self.control.set(Some(s.control(&self.args.path)));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = s.image.qcow2.clone();
        self.session = Some(s);
        Ok(())
    }
}

impl Handover for ImageHandover {
    fn is_active(&self) -> bool {
        self.session.is_some()
    }

    fn activate(&mut self) -> Result<(), String> {
        if self.session.is_some() {
            return Ok(());
        }
        let s = Session::open(&self.args, self.events.as_ref()).map_err(|e| format!("{e:#}"))?;
        self.install(s)
    }

    fn deactivate(&mut self) -> Result<(), String> {
        if self.session.is_none() {
            return Ok(());
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.control.set(None);
        // Waits for the requests in progress, flushes and closes the image (index written,
        // DIRTY cleared, the worker stopped before its next cluster).
        self.device.deactivate().map_err(|e| e.to_string())?;
        // The worker joins and the locks go with the session.
        self.session = None;
        Ok(())
    }
}
