//! Helpers shared by the integration tests: running qemu-img / qemu-io and comparing images.
#![allow(dead_code)]

pub mod chfront;
pub mod client;
pub mod crash;
pub mod guest;
pub mod hooked;
pub mod qmp;
pub mod vring;

use std::path::Path;
use std::process::Command;

/// Run a command; return (exit code, stdout + stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} (is it installed? ./run test installs it): {e}")
    });
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

pub fn qemu_img(args: &[&str]) -> (i32, String) {
    run("qemu-img", args)
}

/// A new image with dedup recorded on (64 KiB clusters).
pub fn new_dedup_image(path: &Path, size: u64) {
    new_dedup_image_with(path, size, 16);
}

/// A new image with dedup recorded on and clusters of `1 << cluster_bits` bytes.
pub fn new_dedup_image_with(path: &Path, size: u64, cluster_bits: u32) {
    let o = vhost_user_qcow2::qcow2::CreateOptions {
        size,
        cluster_bits,
        dedup: true,
        ..Default::default()
    };
    let f = std::fs::File::create(path).unwrap();
    vhost_user_qcow2::qcow2::create(&vhost_user_qcow2::storage::FileStorage::new(f), &o).unwrap();
}

/// `qemu-img check` must exit 0.
pub fn assert_check_clean(img: &Path) {
    let (code, out) = qemu_img(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", img.display());
}

/// A check's output (qemu-img's or ours, which prints the same lines) of a DIRTY image: every
/// error is a refcount that differs from the references or a COPIED flag out of step with a
/// refcount (lines with `refcount=`), nothing a DIRTY window does not allow.
pub fn assert_only_refcount_errors(out: &str, what: &str) {
    for line in out.lines() {
        let l = line.trim_start();
        assert!(
            !l.starts_with("ERROR") || l.contains("refcount="),
            "{what}: a DIRTY image with more than refcounts behind: {line}\n{out}"
        );
    }
}

/// `qemu-img compare` of a qcow2 image against a raw file must say identical.
pub fn assert_same_as_raw(img: &Path, raw: &Path) {
    let (code, out) = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_eq!(
        code,
        0,
        "qemu-img compare {} {}:\n{out}",
        img.display(),
        raw.display()
    );
}

/// Run qemu-io commands on an image; assert success and no "Pattern verification failed".
pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    let (code, out) = run("qemu-io", &args);
    assert_eq!(code, 0, "qemu-io {cmds:?}:\n{out}");
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}:\n{out}"
    );
    out
}

/// `vhost-user-qcow2 create PATH --size SIZE EXTRA...`, which must succeed.
pub fn create_with_cli(path: &Path, size: &str, extra: &[&str]) {
    let mut args = vec!["create", path.to_str().unwrap(), "--size", size];
    args.extend_from_slice(extra);
    let (code, out) = run(env!("CARGO_BIN_EXE_vhost-user-qcow2"), &args);
    assert_eq!(code, 0, "create {}: {out}", path.display());
}

/// Distinct host clusters (of `cs` bytes) holding data, from `qemu-img map` (works while the
/// image is in use).
pub fn physical_clusters(img: &Path, cs: u64) -> usize {
    let (c, out) = qemu_img(&["map", "-U", "--output", "json", img.to_str().unwrap()]);
    assert_eq!(c, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut set = std::collections::HashSet::new();
    for e in v.as_array().unwrap() {
        if e["data"] == true && e["zero"] == false {
            let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for k in 0..len / cs {
                set.insert(off + k * cs);
            }
        }
    }
    set.len()
}
