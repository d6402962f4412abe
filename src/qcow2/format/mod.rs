//! Pure big-endian codecs for qcow2's on-disk structures: bytes in, structs out, and back. No file
//! handles here; the engine and the checker do the I/O.

pub mod dedup;
pub mod entries;
pub mod header;
pub mod refblock;
pub mod snapshot;

mod codec;

pub use codec::{decode_table, encode_table, FormatError};
pub use entries::{L1Entry, L2Entry};
pub use header::{Header, HeaderExtension};
pub use snapshot::Snapshot;
