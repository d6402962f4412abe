//! Parsing a virtio-blk descriptor chain: its shape, its header and where its status goes.
//!
//! The chain iterator of virtio-queue stops silently on a bad descriptor, so nothing about the
//! chain is trusted: the shape is checked here (a readable 16-byte header first, data of the
//! direction the request type needs, a device-writable status byte last) and every address is
//! checked against guest memory before use.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::consts::{
    HEADER_SIZE, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not implement (answered with UNSUPP).
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// True when the data buffers are written by the device (the guest reads them).
    fn device_writes_data(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

/// One guest-memory buffer of the request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers in order, all of the direction `kind` needs.
    pub data: Vec<Segment>,
    /// Sum of the data buffers' lengths.
    pub data_len: u64,
    /// Guest address of the status byte.
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No device-writable status byte inside guest memory: nothing can be answered.
    #[error("the chain has no device-writable status byte in guest memory")]
    NoStatus,
    /// The chain is malformed but its status byte can carry IOERR.
    #[error("malformed request: {reason}")]
    Malformed {
        status: GuestAddress,
        reason: &'static str,
    },
}

/// Parse the descriptors of one chain. `descs` is the chain as popped from the queue.
pub fn parse_chain<M, I>(mem: &M, descs: I) -> Result<Request, ParseError>
where
    M: GuestMemoryBackend + ?Sized,
    I: IntoIterator<Item = Descriptor>,
{
    let descs: Vec<Descriptor> = descs.into_iter().collect();
    let last = descs.last().ok_or(ParseError::NoStatus)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ParseError::NoStatus)?;
    if !GuestMemoryBackend::check_range(mem, status, 1) {
        return Err(ParseError::NoStatus);
    }
    let bad = |reason| ParseError::Malformed { status, reason };

    if descs.len() < 2 {
        return Err(bad("no request header"));
    }
    let head = &descs[0];
    if head.is_write_only() {
        return Err(bad("the request header is device-writable"));
    }
    if head.len() < HEADER_SIZE {
        return Err(bad("the request header is shorter than 16 bytes"));
    }
    let mut hdr = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut hdr, head.addr())
        .map_err(|_| bad("the request header is outside guest memory"))?;
    let raw_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let kind = RequestType::from_raw(raw_type);

    let mut data = Vec::with_capacity(descs.len() - 1);
    let middle = &descs[1..descs.len() - 1];
    let want_writable = kind.device_writes_data();
    for d in middle {
        if d.len() == 0 {
            continue;
        }
        let dir_ok = d.is_write_only() == want_writable;
        match kind {
            // Flush carries no data; an unknown type is answered UNSUPP whatever it carries.
            RequestType::Flush | RequestType::Unsupported(_) => continue,
            _ if !dir_ok => {
                return Err(bad(if want_writable {
                    "a data buffer of a read request is read-only"
                } else {
                    "a data buffer of a write request is device-writable"
                }))
            }
            _ => data.push(Segment {
                addr: d.addr(),
                len: d.len(),
            }),
        }
    }
    // Bytes before the status byte in the last descriptor are data for device-writes requests.
    if want_writable && last.len() > 1 {
        data.push(Segment {
            addr: last.addr(),
            len: last.len() - 1,
        });
    }
    let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    for s in &data {
        if !GuestMemoryBackend::check_range(mem, s.addr, s.len as usize) {
            return Err(bad("a data buffer is outside guest memory"));
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}
