use clap::Parser;
use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = cli::Args::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-user-qcow2: {e:#}");
            ExitCode::from(1)
        }
    }
}
