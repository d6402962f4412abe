use super::*;
use crate::control::qmp::{ErrorClass, Version};
use crate::virtio::QueueStats;
use std::time::Duration;

struct FakeDaemon {
    queues: Vec<QueueStats>,
    quit: bool,
}

impl DaemonView for FakeDaemon {
    fn status(&self) -> StatusInfo {
        StatusInfo {
            status: "running".into(),
            running: true,
            singlestep: false,
            vmm_connected: true,
            read_only: false,
            active: true,
        }
    }
    fn queue_stats(&self) -> Vec<QueueSnapshot> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.snapshot(i as u16))
            .collect()
    }
    fn quit(&mut self) {
        self.quit = true;
    }
}

struct NoEngine;

impl ImageControl for NoEngine {
    fn engine_stats(&self) -> Option<EngineStatsInfo> {
        None
    }
    fn image_info(&self) -> Result<Value, String> {
        Err("no image".into())
    }
}

fn run(d: &mut FakeDaemon, name: &str, args: Value) -> Result<Value, QmpError> {
    let mut c = Commands {
        daemon: d,
        image: &NoEngine,
        version: Version {
            major: 10,
            minor: 0,
            micro: 0,
        },
    };
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    c.execute(name, &args)
}

fn daemon() -> FakeDaemon {
    FakeDaemon {
        queues: vec![QueueStats::default(), QueueStats::default()],
        quit: false,
    }
}

#[test]
fn every_listed_command_exists() {
    let mut d = daemon();
    for c in COMMANDS {
        if *c == "qmp_capabilities" {
            continue; // the session's own
        }
        let r = run(&mut d, c, json!({}));
        if let Err(e) = r {
            assert_ne!(e.class, ErrorClass::CommandNotFound, "{c}");
        }
    }
    let e = run(&mut d, "no-such-command", json!({})).unwrap_err();
    assert_eq!(e.class, ErrorClass::CommandNotFound);
}

#[test]
fn stats_per_queue_and_total() {
    let mut d = daemon();
    d.queues[0].record(
        Some(crate::virtio::RequestType::In),
        4096,
        true,
        Duration::from_micros(5),
    );
    d.queues[1].record(
        Some(crate::virtio::RequestType::Out),
        512,
        false,
        Duration::from_micros(5),
    );
    let v = run(&mut d, "query-stats", json!({})).unwrap();
    assert_eq!(v["queues"].as_array().unwrap().len(), 2);
    assert_eq!(v["queues"][0]["bytes-read"], 4096);
    assert_eq!(v["queues"][1]["errors"], 1);
    assert_eq!(v["total"]["requests"], 2);
    assert_eq!(v["engine"], Value::Null);
}

#[test]
fn dedup_commands_validate_then_say_not_enabled() {
    let mut d = daemon();
    let v = run(&mut d, "query-dedup", json!({})).unwrap();
    assert_eq!(v["mode"], "off");
    assert_eq!(v["running"], false);
    assert_eq!(v["bytes-saved"], 0);
    for c in ["dedup-pause", "dedup-resume"] {
        let e = run(&mut d, c, json!({})).unwrap_err();
        assert_eq!(e.desc, DEDUP_NOT_ENABLED);
        let e = run(&mut d, c, json!({"x": 1})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'x' is unexpected");
    }
    let bad = [
        (json!({}), "Parameter 'mode' is missing"),
        (
            json!({"mode": 1}),
            "Invalid parameter type for 'mode', expected: string",
        ),
        (
            json!({"mode": "sometimes"}),
            "Parameter 'mode' does not accept value 'sometimes'",
        ),
        (
            json!({"mode": "off", "y": 2}),
            "Parameter 'y' is unexpected",
        ),
    ];
    for (args, desc) in bad {
        let e = run(&mut d, "dedup-set-mode", args).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        assert_eq!(e.desc, desc);
    }
    for m in ["off", "inline", "background"] {
        let e = run(&mut d, "dedup-set-mode", json!({ "mode": m })).unwrap_err();
        assert_eq!(e.desc, DEDUP_NOT_ENABLED);
    }
}

#[test]
fn quit_asks_the_daemon() {
    let mut d = daemon();
    assert!(run(&mut d, "quit", json!({"now": true})).is_err());
    assert!(!d.quit);
    assert_eq!(run(&mut d, "quit", json!({})).unwrap(), json!({}));
    assert!(d.quit);
}

#[test]
fn block_resize_checks_its_arguments() {
    let mut d = daemon();
    let desc = |r: Result<Value, QmpError>| r.unwrap_err().desc;
    assert_eq!(
        desc(run(&mut d, "block_resize", json!({}))),
        "Parameter 'size' is missing"
    );
    assert!(desc(run(&mut d, "block_resize", json!({"size": "1G"}))).contains("integer"));
    assert!(desc(run(&mut d, "block_resize", json!({"size": -1}))).contains("non-negative"));
    assert!(desc(run(
        &mut d,
        "block_resize",
        json!({"size": 1, "node-name": 3})
    ))
    .contains("string"));
    assert!(desc(run(&mut d, "block_resize", json!({"size": 1, "x": 1}))).contains("'x'"));
    // Well formed (qsd's `node-name` or the older `device`): the daemon decides.
    let e = run(
        &mut d,
        "block_resize",
        json!({"size": 1 << 30, "device": "d0"}),
    )
    .unwrap_err();
    assert_eq!(e.class, ErrorClass::GenericError);
    assert_eq!(e.desc, "this daemon cannot resize its image");
}
