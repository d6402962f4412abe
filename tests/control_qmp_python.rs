//! The control socket driven by the `qemu.qmp` Python package's async client (tests/
//! qmp_client.py): the real-world QMP library must connect, negotiate, query and quit. Fails,
//! never skips, when python3 or qemu.qmp is missing (`./run test` installs them).

mod common;

use common::client::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn qemu_qmp_async_client_queries_and_quits() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-qcow2"))
        .args(["create", img.to_str().unwrap(), "--size", "64M"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ctl = dir.path().join("c.sock");
    let mut child = spawn_binary(
        &img,
        &dir.path().join("v.sock"),
        &["--num-queues", "2", "--control", ctl.to_str().unwrap()],
    );
    wait_for(&ctl);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qmp_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&ctl)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 (./run test installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qmp_client.py failed (is qemu.qmp installed? ./run test installs it):\n{text}"
    );
    assert!(text.contains("OK"), "{text}");
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let log = stderr_of(&mut child);
    assert!(st.success(), "exit status {st:?}; log:\n{log}");
    common::assert_check_clean(&img);
}
