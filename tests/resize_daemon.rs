//! `block_resize` on the real daemon over QMP, with the libblkio client: refusals come back as
//! GenericError with a clear description; a growth shows in `query-image`, in the config space
//! a client reads when it connects again, and in the I/O it accepts; after `quit` the image
//! passes `qemu-img check` and `qemu-img info` shows the new size. For qcow2 and raw images.

mod common;

use common::client::*;
use common::qmp::{error_class, Qmp};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const M: u64 = 1 << 20;

fn info_size(img: &Path) -> u64 {
    let (code, out) = common::qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str::<Value>(&out).unwrap()["virtual-size"]
        .as_u64()
        .unwrap()
}

fn resize_served(img: &Path, qcow2: bool) {
    let dir = img.parent().unwrap();
    let (sock, ctl) = (dir.join("v.sock"), dir.join("c.sock"));
    let mut child = spawn_binary(img, &sock, &["--control", ctl.to_str().unwrap()]);
    wait_for(&ctl);
    wait_for(&sock);
    let mut c = connect_or_fail(&mut child, &sock, 1);
    assert_eq!(c.capacity(), 64 * M);
    let data = pattern(1, 4096);
    c.buf(0, 4096).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, 4096), 0);

    let mut q = Qmp::connect(&ctl);
    let cmds: Vec<Value> = q.ok("query-commands").as_array().unwrap().clone();
    assert!(cmds.contains(&json!({"name": "block_resize"})));
    let mut refused = vec![
        (json!({"size": 32 * M}), "shrinking is not supported"),
        (json!({"size": 64 * M + 100}), "not a multiple of 512"),
        (json!({}), "Parameter 'size' is missing"),
    ];
    if qcow2 {
        // (A raw file that large may be possible, on tmpfs say.)
        refused.push((
            json!({"size": 1u64 << 62}),
            "larger than QEMU's limit of 32 MiB",
        ));
    }
    for (args, want) in refused {
        let r = q.cmd("block_resize", args.clone());
        assert_eq!(error_class(&r), "GenericError", "{args}: {r}");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.contains(want), "{args}: {desc}");
    }
    let r = q.cmd(
        "block_resize",
        json!({"node-name": "disk0", "size": 256 * M}),
    );
    assert_eq!(r, json!({"return": {}}));
    // The same size again does nothing.
    let r = q.cmd("block_resize", json!({"device": "disk0", "size": 256 * M}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(q.ok("query-image")["virtual-size"], 256 * M);

    // The connected client's requests go on.
    assert_eq!(c.read(0, 0, 8192, 4096), 0);
    assert_eq!(c.buf(8192, 4096), &data[..]);
    drop(c);
    // A new connection reads the new capacity from the config space and may use it.
    std::thread::sleep(Duration::from_millis(100));
    let mut c = connect_or_fail(&mut child, &sock, 1);
    assert_eq!(c.capacity(), 256 * M);
    let tail = pattern(2, 4096);
    c.buf(0, 4096).copy_from_slice(&tail);
    assert_eq!(c.write(0, 256 * M - 4096, 0, 4096), 0);
    assert_eq!(c.read(0, 256 * M - 4096, 4096, 4096), 0);
    assert_eq!(c.buf(4096, 4096), &tail[..]);
    assert_eq!(c.read(0, 0, 8192, 4096), 0);
    assert_eq!(c.buf(8192, 4096), &data[..]);
    drop(c);

    assert_eq!(q.cmd("quit", json!({})), json!({"return": {}}));
    let st = wait_exit(&mut child, Duration::from_secs(30));
    let log = stderr_of(&mut child);
    assert!(st.success(), "exit {st:?}\n{log}");
    assert!(log.contains("block_resize"), "{log}");
    if qcow2 {
        common::assert_check_clean(img);
    }
    assert_eq!(info_size(img), 256 * M);
}

#[test]
fn block_resize_grows_a_served_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    common::create_with_cli(&img, "64M", &[]);
    resize_served(&img, true);
}

#[test]
fn block_resize_grows_a_served_raw_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * M)
        .unwrap();
    resize_served(&img, false);
}
