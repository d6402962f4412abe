//! `vhost-user-qcow2 check IMG [--repair leaks|all] [--output human|json]`: our own consistency
//! check, with qemu-img's exit codes: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.

use super::progress::Progress;
use clap::{Args, ValueEnum};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use vhost_user_qcow2::qcow2::check::{check, CheckError, CheckOptions, CheckReport, RepairMode};
use vhost_user_qcow2::storage::lock::ImageLock;
use vhost_user_qcow2::storage::FileStorage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Fix leaked clusters only.
    Leaks,
    /// Fix leaks and corruptions (rebuilds refcounts when needed).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Human,
    Json,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Repair what the check finds (opens the image read-write).
    #[arg(short = 'r', long)]
    pub repair: Option<Repair>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

fn print_human(r: &CheckReport, repaired: bool) {
    if repaired && (r.corruptions_fixed > 0 || r.leaks_fixed > 0) {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    \
             {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        );
    }
    if r.image_end_offset != 0 {
        println!("Image end offset: {}", r.image_end_offset);
    }
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    // A repair rewrites metadata: never under a daemon or QEMU serving the image. (A read-only
    // check takes no lock, like `qemu-img check -U`: it may see a half-written state, no more.)
    let _lock = match args.repair {
        Some(_) => Some(ImageLock::acquire(&args.image, false)?),
        None => None,
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(args.repair.is_some())
        .open(&args.image)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "vhost-user-qcow2: could not open {}: {e}",
                args.image.display()
            );
            return Ok(ExitCode::from(1));
        }
    };
    let storage = FileStorage::new(file);
    // A bar on a terminal, plain log lines otherwise; the checker calls back with each pass's
    // progress (a repair walks the image more than once).
    let progress = Progress::new("check", "steps");
    let show = |done: u64, total: u64| progress.update(done, total);
    let opts = CheckOptions {
        repair: args.repair.map(|r| match r {
            Repair::Leaks => RepairMode::Leaks,
            Repair::All => RepairMode::All,
        }),
        mark_clean: true,
        progress: Some(&show),
    };
    let result = check(&storage, &opts);
    progress.finish();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vhost-user-qcow2: check failed: {e}");
            let code = if matches!(e, CheckError::Unsupported(_)) {
                63
            } else {
                1
            };
            return Ok(ExitCode::from(code));
        }
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    match args.output {
        Output::Human => print_human(&report, args.repair.is_some()),
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("filename".into(), args.image.display().to_string().into());
                o.insert("format".into(), "qcow2".into());
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(ExitCode::from(report.exit_code()))
}
