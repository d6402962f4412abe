//! `vhost-user-qcow2 info IMG [--output human|json]`: what an image holds, in the shape of
//! `qemu-img info`.

use super::check::Output;
use super::size::format_size;
use clap::Args;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use vhost_user_qcow2::qcow2::info::{image_info, ImageInfo};
use vhost_user_qcow2::storage::FileStorage;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

fn print_human(i: &ImageInfo) {
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        format_size(i.virtual_size),
        i.virtual_size
    );
    if let Some(a) = i.actual_size {
        println!("disk size: {}", format_size(a));
    }
    println!("cluster_size: {}", i.cluster_size);
    if let Some(b) = &i.backing_filename {
        println!("backing file: {b}");
    }
    if let Some(f) = &i.backing_filename_format {
        println!("backing file format: {f}");
    }
    if !i.snapshots.is_empty() {
        println!("Snapshot list:");
        println!("ID      TAG               VM_SIZE       DATE (s)      VM_CLOCK (s)");
        for s in &i.snapshots {
            println!(
                "{:<7} {:<17} {:>7} {:>14} {:>12}.{:03}",
                s.id,
                s.name,
                format_size(s.vm_state_size),
                s.date_sec,
                s.vm_clock_sec,
                s.vm_clock_nsec / 1_000_000
            );
        }
    }
    let d = &i.format_specific.data;
    println!("Format specific information:");
    println!("    compat: {}", d.compat);
    println!("    compression type: {}", d.compression_type);
    if let Some(l) = d.lazy_refcounts {
        println!("    lazy refcounts: {l}");
    }
    println!("    refcount bits: {}", d.refcount_bits);
    if let Some(c) = d.corrupt {
        println!("    corrupt: {c}");
    }
    if let Some(e) = d.extended_l2 {
        println!("    extended l2: {e}");
    }
    if let Some(d) = &i.dedup {
        println!(
            "dedup: {}, {} clusters deduplicated, {} written unique, {} zero, {} saved",
            d.mode,
            d.clusters_deduplicated,
            d.clusters_written_unique,
            d.zero_clusters_detected,
            format_size(d.bytes_saved)
        );
    }
    if i.dirty_flag {
        println!("    dirty: true");
    }
}

pub fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let file = match File::open(&args.image) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "vhost-user-qcow2: could not open {}: {e}",
                args.image.display()
            );
            return Ok(ExitCode::from(1));
        }
    };
    let actual = file.metadata().map(|m| m.blocks() * 512).ok();
    let storage = FileStorage::new(file);
    let mut info = match image_info(&storage) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("vhost-user-qcow2: {}: {e}", args.image.display());
            return Ok(ExitCode::from(1));
        }
    };
    info.filename = args.image.display().to_string();
    info.actual_size = actual;
    match args.output {
        Output::Human => print_human(&info),
        Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
    }
    Ok(ExitCode::from(0))
}
