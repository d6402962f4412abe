//! `vhost-user-qcow2 create` (not written yet).

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CreateArgs {}

pub fn run(_args: CreateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'create' is not implemented yet")
}
