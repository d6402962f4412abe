//! The qcow2 engine. It knows nothing about virtio: it serves byte ranges of a virtual disk.

pub mod format;
pub mod offsets;
