//! Asynchronous QMP events: any thread (the engine, a background worker) emits through an
//! [`EventSender`]; the daemon's main loop wakes on the receiver's eventfd and forwards each
//! event to every negotiated client.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Events kept while the daemon has not picked them up; older ones are dropped past this.
const MAX_QUEUED: usize = 1024;

/// One event, stamped when it was emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub seconds: u64,
    pub microseconds: u32,
}

impl Event {
    pub fn new(name: impl Into<String>, data: Value) -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Event {
            name: name.into(),
            data,
            seconds: t.as_secs(),
            microseconds: t.subsec_micros(),
        }
    }
}

struct Shared {
    queue: Mutex<VecDeque<Event>>,
    wake: EventFd,
}

/// The emitting end; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EventSender(Arc<Shared>);

/// The daemon's end: an eventfd to poll and the queued events.
pub struct EventReceiver(Arc<Shared>);

/// A connected sender and receiver.
pub fn channel() -> std::io::Result<(EventSender, EventReceiver)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        wake: EventFd::new(EFD_NONBLOCK)?,
    });
    Ok((EventSender(shared.clone()), EventReceiver(shared)))
}

impl EventSender {
    /// Queue an event for every connected client.
    pub fn emit(&self, ev: Event) {
        {
            let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_QUEUED {
                q.pop_front();
            }
            q.push_back(ev);
        }
        let _ = self.0.wake.write(1);
    }

    /// `BLOCK_IMAGE_CORRUPTED` as QEMU sends it when a metadata overlap check fires: `msg`
    /// says what, `offset`/`size` the host range when known; `fatal` when the image was
    /// marked corrupt and further writes are refused.
    pub fn image_corrupted(
        &self,
        node_name: &str,
        msg: &str,
        offset: Option<u64>,
        size: Option<u64>,
        fatal: bool,
    ) {
        let mut data = json!({
            "device": "",
            "node-name": node_name,
            "msg": msg,
            "fatal": fatal,
        });
        if let (Some(o), Value::Object(m)) = (offset, &mut data) {
            m.insert("offset".into(), json!(o));
        }
        if let (Some(s), Value::Object(m)) = (size, &mut data) {
            m.insert("size".into(), json!(s));
        }
        self.emit(Event::new("BLOCK_IMAGE_CORRUPTED", data));
    }
}

impl EventReceiver {
    /// Everything queued so far, oldest first; clears the wake-up.
    pub fn drain(&self) -> Vec<Event> {
        let _ = self.0.wake.read();
        let mut q = self.0.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }
}

impl AsRawFd for EventReceiver {
    fn as_raw_fd(&self) -> RawFd {
        self.0.wake.as_raw_fd()
    }
}
