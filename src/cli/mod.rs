//! The command line: one file per subcommand. `anyhow` lives only here and in main.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod check;
pub mod create;
pub mod dedup;
mod handover;
pub mod info;
pub mod man;
mod open;
mod progress;
mod ready;
pub mod serve;
mod size;

/// vhost-user-blk backend with its own qcow2 engine.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-qcow2", version, about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a qcow2 v3 image.
    Create(create::CreateArgs),
    /// Show what an image holds.
    Info(info::InfoArgs),
    /// Check an image's consistency and repair it (exit 0 clean, 1 check failed, 2 corruptions,
    /// 3 leaks only, 63 an image this checker does not support).
    Check(check::CheckArgs),
    /// Serve an image as a vhost-user-blk device on a UNIX socket.
    Serve(serve::ServeArgs),
    /// Deduplicate an existing image offline (for example one made by qemu-img convert).
    Dedup(dedup::DedupArgs),
    /// Print a manual page (roff), or write all of them into a directory.
    Man(man::ManArgs),
}

/// Run a parsed command line; the exit code follows qemu-img where it has one.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Dedup(a) => dedup::run(a),
        Command::Man(a) => man::run(a, <Args as clap::CommandFactory>::command()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn manual_pages_come_from_the_definitions() {
        let main = String::from_utf8(man::render(Args::command(), None).unwrap()).unwrap();
        assert!(main.contains(".TH vhost-user-qcow2 1"), "{main}");
        for sub in ["create", "info", "check", "serve", "dedup"] {
            assert!(main.contains(sub), "{sub} missing from the main page");
        }
        let serve =
            String::from_utf8(man::render(Args::command(), Some("serve")).unwrap()).unwrap();
        assert!(serve.contains("vhost-user-qcow2-serve"), "{serve}");
        for opt in ["pidfile", "dedup\\-cache\\-size", "overlap\\-check"] {
            assert!(serve.contains(opt), "{opt} missing:\n{serve}");
        }
        assert!(
            !main.contains("qcow2\\-help"),
            "a page for help, which has none"
        );
        assert!(man::render(Args::command(), Some("nope")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let a = Args::try_parse_from(["x", "man", "--dir", dir.path().to_str().unwrap()]);
        match a.map(|a| a.command) {
            Ok(Command::Man(m)) => {
                assert_eq!(man::run(m, Args::command()).ok(), Some(ExitCode::SUCCESS))
            }
            other => panic!("{other:?}"),
        }
        for page in [
            "vhost-user-qcow2.1",
            "vhost-user-qcow2-serve.1",
            "vhost-user-qcow2-man.1",
        ] {
            assert!(dir.path().join(page).exists(), "{page} not written");
        }
    }

    #[test]
    fn dedup_cache_size_is_checked() {
        let serve = |size: &str| {
            let a = ["vhost-user-qcow2", "serve", "--image", "i", "--socket", "s"];
            let a = a.iter().copied().chain(["--dedup-cache-size", size]);
            match Args::try_parse_from(a).map(|a| a.command) {
                Ok(Command::Serve(s)) => s.dedup_cache_size.ok_or("no size".to_string()),
                Ok(_) => Err("not serve".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(serve("256M"), Ok(256 << 20));
        let e = serve("512K").unwrap_err();
        assert!(e.contains("give 1M to 1T"), "{e}");
        assert!(serve("lots").is_err());
        let a = ["vhost-user-qcow2", "serve", "--image", "i", "--socket", "s"];
        match Args::try_parse_from(a).map(|a| a.command) {
            // No size given: the engine's default, which the help text names.
            Ok(Command::Serve(s)) => assert_eq!(
                s.dedup_cache_size
                    .unwrap_or(vhost_user_qcow2::qcow2::engine::dedup::DEFAULT_RECORD_CACHE_BYTES),
                64 << 20
            ),
            other => panic!("{other:?}"),
        }
    }
}
