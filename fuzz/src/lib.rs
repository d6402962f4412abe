//! Fuzz targets of vhost-user-qcow2 (cargo-fuzz, nightly). The harness bodies are in
//! `harness/`, shared with `tests/fuzz_regressions.rs` of the main crate.

pub mod harness;
