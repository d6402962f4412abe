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

/// A shell command line on a pseudo-terminal (util-linux `script`); None when `script` is
/// missing.
fn script(cmd: &str) -> Option<(bool, String)> {
    let o = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .ok()?;
    Some((
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    ))
}

/// `BIN ARGS` on a pseudo-terminal; None when `script` is missing.
fn on_terminal(args: &str) -> Option<(bool, String)> {
    script(&format!("{BIN} {args}"))
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

/// A lazy-refcount image that qemu-io left DIRTY (killed by its own `abort`), its refcounts
/// behind its tables: a read-write open repairs it.
fn dirty_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    common::create_with_cli(&img, "256M", &["--cluster-size", "4K", "--lazy-refcounts"]);
    let p = img.to_str().unwrap();
    let (_, out) = common::run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 7 0 8M", "-c", "abort", p],
    );
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[79] & 1 != 0,
        "qemu-io abort should leave DIRTY set: {out}"
    );
    img
}

#[test]
fn repair_on_open_reports_its_progress_to_the_hook() {
    use std::sync::{Arc, Mutex};
    use vhost_user_qcow2::qcow2::{OpenOptions, ProgressHook, Qcow2};
    let dir = tempfile::tempdir().unwrap();
    let img = dirty_image(dir.path(), "d.qcow2");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let opts = OpenOptions {
        repair_progress: Some(ProgressHook::new(move |done, total| {
            seen.lock().unwrap().push((done, total))
        })),
        ..Default::default()
    };
    Qcow2::open_with(&img, &opts).unwrap().close().unwrap();
    let got = calls.lock().unwrap().clone();
    assert!(!got.is_empty(), "the repair at open never called the hook");
    assert!(got.iter().all(|&(d, t)| d <= t && t > 0), "{got:?}");
    let &(d, t) = got.last().unwrap();
    assert_eq!(d, t, "the last pass ends complete: {got:?}");
    common::assert_check_clean(&img);

    // A clean image is not repaired: the hook stays silent.
    Qcow2::open_with(&img, &opts).unwrap().close().unwrap();
    assert_eq!(
        calls.lock().unwrap().len(),
        got.len(),
        "a clean open reported progress"
    );
}

#[test]
fn repair_on_open_shows_a_bar_on_a_terminal_and_log_lines_otherwise() {
    use common::guest::{Backend, Which};
    let dir = tempfile::tempdir().unwrap();
    // serve as a daemon (stderr a log): plain progress lines (at most every 5 s, here every
    // update: the repair is short), never terminal codes.
    let img = dirty_image(dir.path(), "log.qcow2");
    let (sock, log) = (dir.path().join("log.sock"), dir.path().join("serve.log"));
    let env = [("VUQ_TEST_PROGRESS_EVERY_MS", "0")];
    let mut d = Backend::start_with_env(Which::Ours, &img, &sock, &log, &[], &env);
    d.wait_listening(&sock);
    let st = d.terminate();
    let text = d.log_text();
    assert!(st.success(), "serve: {st}\n{text}");
    assert!(
        text.contains("repairing it") && text.contains("repair done"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("repair: ") && l.contains(" steps (") && l.ends_with("%)")),
        "serve logged no progress line for the repair: {text}"
    );
    assert!(
        !text.contains('\r') && !text.contains('\x1b'),
        "serve wrote terminal control codes into its log: {text:?}"
    );
    common::assert_check_clean(&img);

    // On a terminal: a bar for the repair, in serve (stopped after 3 s) and in dedup.
    for which in ["serve", "dedup"] {
        let img = dirty_image(dir.path(), &format!("{which}.qcow2"));
        let cmd = match which {
            "serve" => format!(
                "timeout --preserve-status -s TERM 3 {BIN} serve --image {} --socket {}",
                img.display(),
                dir.path().join("tty.sock").display()
            ),
            _ => format!("{BIN} dedup {}", img.display()),
        };
        let Some((ok, tty)) = script(&cmd) else {
            eprintln!("no `script` here: the terminal half is not checked");
            return;
        };
        assert!(ok, "{which} on a terminal: {tty}");
        assert!(
            tty.contains("repair [") && tty.contains("%)"),
            "{which}: no progress bar for the repair on a terminal: {tty:?}"
        );
        common::assert_check_clean(&img);
    }
}
