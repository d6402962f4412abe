//! `vhost-user-qcow2 serve` (not written yet).

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'serve' is not implemented yet")
}
