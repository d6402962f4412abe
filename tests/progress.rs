//! Progress of `check` and `dedup`: a bar on a terminal, never escape codes in a log.

mod common;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-qcow2");

/// An image with data written twice over (so dedup has something to link).
fn image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("p.qcow2");
    common::create_with_cli(&img, "256M", &["--cluster-size", "4K"]);
    common::qemu_io(&img, "qcow2", &["write -P 7 0 8M", "write -P 7 64M 8M"]);
    img
}

/// `BIN ARGS` on a pseudo-terminal (util-linux `script`); None when `script` is missing.
fn on_terminal(args: &str) -> Option<(bool, String)> {
    let o = Command::new("script")
        .args(["-qec", &format!("{BIN} {args}"), "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .ok()?;
    Some((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    ))
}

#[test]
fn bars_on_a_terminal_plain_output_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let p = img.to_str().unwrap();
    for args in [
        vec!["check", p],
        vec!["check", "--repair", "all", p],
        vec!["dedup", p],
    ] {
        let o = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(
            !err.contains('\r') && !err.contains('\x1b'),
            "{args:?} wrote terminal control codes into a pipe: {err:?}"
        );
        let Some((ok, tty)) = on_terminal(&args.join(" ")) else {
            eprintln!("no `script` here: the terminal half is not checked");
            continue;
        };
        assert!(ok, "{args:?} on a terminal: {tty}");
        let name = args[0];
        assert!(
            tty.contains(&format!("{name} [")) && tty.contains("%)"),
            "{args:?}: no progress bar on a terminal: {tty:?}"
        );
    }
    common::assert_check_clean(&img);
}
