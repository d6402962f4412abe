//! `vhost-user-qcow2 info` (not written yet).

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct InfoArgs {}

pub fn run(_args: InfoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'info' is not implemented yet")
}
