//! `vhost-user-qcow2 man [COMMAND] [--dir DIR]`: manual pages generated from the command-line
//! definitions themselves (clap_mangen), so they cannot drift from `--help`.

use anyhow::{bail, Context};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The subcommand whose page to print (create, info, check, serve, dedup); the main page
    /// when absent.
    pub command: Option<String>,
    /// Write every page (vhost-user-qcow2.1, vhost-user-qcow2-serve.1, ...) into this directory
    /// instead of printing one, for example to install them under /usr/local/share/man/man1.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub dir: Option<PathBuf>,
}

/// The command tree `root` as the pages show it: built, so that subcommands carry their full
/// names, and without `help`, which has no page (as in `clap_mangen::generate_to`).
fn command(root: clap::Command) -> clap::Command {
    let mut cmd = root.disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The roff source of the main page of the command tree `root`, or of subcommand `name`'s page.
pub fn render(root: clap::Command, name: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let root = command(root);
    let cmd = match name {
        None => root,
        Some(n) => match root.find_subcommand(n) {
            Some(c) => c.clone(),
            None => bail!("no subcommand {n:?}"),
        },
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    Ok(out)
}

/// Print a page of the command tree `root`, or write all of them (`--dir`).
pub fn run(a: ManArgs, root: clap::Command) -> anyhow::Result<ExitCode> {
    if let Some(dir) = &a.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        clap_mangen::generate_to(root, dir)
            .with_context(|| format!("writing manual pages into {}", dir.display()))?;
        println!("manual pages written to {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let page = render(root, a.command.as_deref())?;
    std::io::stdout().write_all(&page)?;
    Ok(ExitCode::SUCCESS)
}
