//! The QMP wire protocol, independent of sockets: framing of a byte stream into JSON values,
//! the capabilities negotiation, requests and their replies, events. The daemon feeds the
//! bytes a client sent into a [`Session`] and writes back whatever it produces.
//!
//! Framing follows QEMU's JSON streamer: a message ends where its top-level object closes, with
//! or without a newline after it (the `qemu.qmp` package sends none). Replies and events end
//! with "\r\n" as QEMU's do.

use serde_json::{json, Map, Value};

use super::events::Event;

/// Largest message a client may send; a longer one closes the connection.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting of arrays and objects accepted in a message.
const MAX_DEPTH: usize = 64;

/// The `class` of a QMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// A command's failure, sent as `{"error": {"class", "desc"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

/// Runs the commands of a negotiated session (everything but `qmp_capabilities`).
pub trait Handler {
    /// Run `name` with `args` (an empty object when the request had none).
    fn execute(&mut self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;
}

/// The message was longer than [`MAX_MESSAGE`] (or nested deeper than allowed): close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("QMP message over {MAX_MESSAGE} bytes or nested too deeply")]
pub struct TooLong;

/// The version the greeting announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// Where the scanner is inside the current message.
#[derive(Debug, Default)]
struct Scan {
    /// Bytes of `buf` already scanned.
    pos: usize,
    /// Where the message being scanned starts (after the whitespace before it).
    start: usize,
    depth: usize,
    in_str: bool,
    escape: bool,
    /// A bare token (number, keyword, garbage) at depth 0 is being read.
    bare: bool,
}

/// One client's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
    buf: Vec<u8>,
    scan: Scan,
}

impl Session {
    pub fn new() -> Self {
        Session::default()
    }

    /// True once `qmp_capabilities` succeeded: commands run and events are delivered.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The greeting sent when a client connects.
    pub fn greeting(v: Version, package: &str) -> Vec<u8> {
        line(&json!({
            "QMP": {
                "version": {
                    "qemu": {"major": v.major, "minor": v.minor, "micro": v.micro},
                    "package": package,
                },
                "capabilities": [],
            }
        }))
    }

    /// Take bytes from the client; append the replies of every complete message to `out`.
    /// `Err(TooLong)` means the connection must be closed (replies already in `out` may still
    /// be sent).
    pub fn feed(
        &mut self,
        data: &[u8],
        h: &mut dyn Handler,
        out: &mut Vec<u8>,
    ) -> Result<(), TooLong> {
        self.buf.extend_from_slice(data);
        // Messages are parsed in place and the buffer is shifted once per call, so a chunk
        // full of small messages or of whitespace costs linear time.
        while let Some((start, end)) = self.next_message()? {
            let parsed = serde_json::from_slice::<Value>(&self.buf[start..end]);
            self.scan = Scan {
                pos: end,
                start: end,
                ..Scan::default()
            };
            let reply = match parsed {
                Ok(v) => self.request(v, h),
                Err(e) => error_reply(QmpError::generic(format!("JSON parse error, {e}")), None),
            };
            out.extend_from_slice(&line(&reply));
        }
        let cut = self.scan.start;
        if cut > 0 {
            self.buf.drain(..cut);
            self.scan.pos -= cut;
            self.scan.start = 0;
        }
        if self.buf.len() > MAX_MESSAGE {
            return Err(TooLong);
        }
        Ok(())
    }

    /// Scan on from where the last call stopped; return the bounds of the first complete
    /// message. Whitespace between messages is skipped.
    fn next_message(&mut self) -> Result<Option<(usize, usize)>, TooLong> {
        let s = &mut self.scan;
        while s.pos < self.buf.len() {
            let b = self.buf[s.pos];
            s.pos += 1;
            if s.in_str {
                if s.escape {
                    s.escape = false;
                } else if b == b'\\' {
                    s.escape = true;
                } else if b == b'"' {
                    s.in_str = false;
                    if s.depth == 0 {
                        return Ok(Some((s.start, s.pos)));
                    }
                }
                continue;
            }
            if s.bare {
                // A bare token ends at whitespace or at the start of something else.
                if b.is_ascii_whitespace() || matches!(b, b'{' | b'[' | b'"') {
                    s.pos -= 1;
                    return Ok(Some((s.start, s.pos)));
                }
                continue;
            }
            match b {
                b'"' => s.in_str = true,
                b'{' | b'[' => {
                    s.depth += 1;
                    if s.depth > MAX_DEPTH {
                        return Err(TooLong);
                    }
                }
                b'}' | b']' => {
                    if s.depth <= 1 {
                        return Ok(Some((s.start, s.pos)));
                    }
                    s.depth -= 1;
                }
                // Between messages: not part of the next one.
                _ if s.depth == 0 && b.is_ascii_whitespace() => s.start = s.pos,
                _ if s.depth == 0 => s.bare = true,
                _ => {}
            }
        }
        Ok(None)
    }

    fn request(&mut self, v: Value, h: &mut dyn Handler) -> Value {
        let Value::Object(obj) = v else {
            return error_reply(QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = obj.get("id").cloned();
        match self.run(&obj, h) {
            Ok(ret) => {
                let mut r = Map::new();
                r.insert("return".into(), ret);
                if let Some(id) = id {
                    r.insert("id".into(), id);
                }
                Value::Object(r)
            }
            Err(e) => error_reply(e, id),
        }
    }

    fn run(&mut self, obj: &Map<String, Value>, h: &mut dyn Handler) -> Result<Value, QmpError> {
        for k in obj.keys() {
            if !matches!(k.as_str(), "execute" | "arguments" | "id") {
                return Err(QmpError::generic(format!(
                    "QMP input member '{k}' is unexpected"
                )));
            }
        }
        let name = match obj.get("execute") {
            None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            capabilities(args)?;
            self.negotiated = true;
            return Ok(json!({}));
        }
        if !self.negotiated {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        h.execute(name, args)
    }
}

/// Check the arguments of `qmp_capabilities`: no capability is offered, so `enable` may only
/// be empty.
fn capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    for (k, v) in args {
        if k != "enable" {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let Value::Array(caps) = v else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        if let Some(c) = caps.first() {
            let name = c.as_str().unwrap_or("?");
            return Err(QmpError::generic(format!(
                "Capability '{name}' not available"
            )));
        }
    }
    Ok(())
}

fn error_reply(e: QmpError, id: Option<Value>) -> Value {
    let mut r = Map::new();
    r.insert(
        "error".into(),
        json!({"class": e.class.as_str(), "desc": e.desc}),
    );
    if let Some(id) = id {
        r.insert("id".into(), id);
    }
    Value::Object(r)
}

/// One serialized message with QEMU's line ending.
fn line(v: &Value) -> Vec<u8> {
    // Serializing a Value cannot fail (its map keys are strings).
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.extend_from_slice(b"\r\n");
    b
}

/// An event as sent to negotiated clients.
pub fn event_bytes(ev: &Event) -> Vec<u8> {
    line(&json!({
        "event": ev.name,
        "data": ev.data,
        "timestamp": {"seconds": ev.seconds, "microseconds": ev.microseconds},
    }))
}

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
