//! Errors of the qcow2 engine.

use super::format::FormatError;
use crate::block::BlockError;
use std::io;

/// Everything that can go wrong opening or serving a qcow2 image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("the image is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the image is marked corrupt; repair it with `vhost-user-qcow2 check --repair all` first"
    )]
    MarkedCorrupt,
    #[error("backing file {path}: {source}")]
    Backing {
        path: String,
        source: Box<Qcow2Error>,
    },
    #[error("request {offset}+{len} is past the end of the disk ({capacity} bytes)")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the image is read-only")]
    ReadOnly,
    #[error("metadata overlap: a write of {len} bytes at {offset:#x} would overwrite the {kind}")]
    Overlap {
        kind: &'static str,
        offset: u64,
        len: u64,
    },
    #[error("deduplication is not enabled on this image")]
    DedupOff,
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Qcow2Error {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Qcow2Error::Corrupt(msg.into())
    }
}

impl From<Qcow2Error> for BlockError {
    fn from(e: Qcow2Error) -> Self {
        match e {
            Qcow2Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => BlockError::NoSpace,
            Qcow2Error::Io(e) => BlockError::Io(e),
            Qcow2Error::OutOfRange {
                offset,
                len,
                capacity,
            } => BlockError::OutOfRange {
                offset,
                len,
                capacity,
            },
            Qcow2Error::ReadOnly => BlockError::ReadOnly,
            Qcow2Error::Corrupt(m) => BlockError::Corrupt(m),
            e @ Qcow2Error::Overlap { .. } => BlockError::Corrupt(e.to_string()),
            other => BlockError::Corrupt(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Qcow2Error>;
