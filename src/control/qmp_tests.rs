use super::*;
use serde_json::json;

/// A handler that answers `echo` with its arguments and knows nothing else.
struct Echo {
    calls: usize,
}

impl Handler for Echo {
    fn execute(&mut self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        self.calls += 1;
        match name {
            "echo" => Ok(Value::Object(args.clone())),
            _ => Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }
}

/// Feed `input`, return the replies parsed (and check each ends with CRLF).
fn feed(s: &mut Session, h: &mut Echo, input: &[u8]) -> Result<Vec<Value>, TooLong> {
    let mut out = Vec::new();
    let r = s.feed(input, h, &mut out);
    let text = String::from_utf8(out).unwrap();
    let mut v = Vec::new();
    for l in text.split_inclusive("\r\n") {
        assert!(l.ends_with("\r\n"), "reply without CRLF: {l:?}");
        v.push(serde_json::from_str(l.trim_end()).unwrap());
    }
    r.map(|()| v)
}

fn negotiated() -> (Session, Echo) {
    let mut s = Session::new();
    let mut h = Echo { calls: 0 };
    let r = feed(&mut s, &mut h, br#"{"execute": "qmp_capabilities"}"#).unwrap();
    assert_eq!(r, vec![json!({"return": {}})]);
    assert!(s.negotiated());
    (s, h)
}

fn class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap()
}

#[test]
fn greeting_has_qemus_shape() {
    let g = Session::greeting(
        Version {
            major: 10,
            minor: 1,
            micro: 2,
        },
        "pkg",
    );
    assert!(g.ends_with(b"\r\n"));
    let v: Value = serde_json::from_slice(&g).unwrap();
    assert_eq!(v["QMP"]["version"]["qemu"]["minor"], 1);
    assert_eq!(v["QMP"]["version"]["package"], "pkg");
    assert_eq!(v["QMP"]["capabilities"], json!([]));
}

#[test]
fn commands_before_negotiation_are_refused_like_qemu() {
    let mut s = Session::new();
    let mut h = Echo { calls: 0 };
    let r = feed(&mut s, &mut h, br#"{"execute": "echo", "id": 7}"#).unwrap();
    assert_eq!(class(&r[0]), "CommandNotFound");
    assert_eq!(r[0]["id"], 7);
    assert_eq!(h.calls, 0);
    assert!(!s.negotiated());
}

#[test]
fn negotiation_twice_is_refused() {
    let (mut s, mut h) = negotiated();
    let r = feed(&mut s, &mut h, br#"{"execute": "qmp_capabilities"}"#).unwrap();
    assert_eq!(class(&r[0]), "CommandNotFound");
}

#[test]
fn unknown_capability_is_refused() {
    let mut s = Session::new();
    let mut h = Echo { calls: 0 };
    let r = feed(
        &mut s,
        &mut h,
        br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
    )
    .unwrap();
    assert_eq!(class(&r[0]), "GenericError");
    assert!(!s.negotiated());
}

#[test]
fn replies_echo_the_id_of_any_type() {
    let (mut s, mut h) = negotiated();
    let r = feed(
        &mut s,
        &mut h,
        br#"{"execute": "echo", "arguments": {"a": 1}, "id": {"x": [1, "two"]}}"#,
    )
    .unwrap();
    assert_eq!(
        r,
        vec![json!({"return": {"a": 1}, "id": {"x": [1, "two"]}})]
    );
}

#[test]
fn messages_split_anywhere_and_concatenated() {
    let (mut s, mut h) = negotiated();
    let input = br#"{"execute":"echo","arguments":{"s":"}{\"\\"},"id":1}{"execute":"echo","id":2}"#;
    let mut got = Vec::new();
    for b in input.iter() {
        got.extend(feed(&mut s, &mut h, std::slice::from_ref(b)).unwrap());
    }
    assert_eq!(
        got,
        vec![
            json!({"return": {"s": "}{\"\\"}, "id": 1}),
            json!({"return": {}, "id": 2})
        ]
    );
}

#[test]
fn malformed_input_gets_errors_and_the_session_goes_on() {
    let (mut s, mut h) = negotiated();
    let cases: &[&[u8]] = &[
        b"{bad json}",
        b"[1, 2]",
        b"\"a string\"",
        b"12 ",
        b"nonsense ",
        b"}",
        br#"{"arguments": {}}"#,
        br#"{"execute": 5}"#,
        br#"{"execute": "echo", "arguments": [1]}"#,
        br#"{"execute": "echo", "extra": 1}"#,
        br#"{"execute": "missing"}"#,
    ];
    for c in cases {
        let r = feed(&mut s, &mut h, c).unwrap();
        assert_eq!(r.len(), 1, "{}", String::from_utf8_lossy(c));
        assert!(
            r[0].get("error").is_some(),
            "{}: {}",
            String::from_utf8_lossy(c),
            r[0]
        );
    }
    let r = feed(&mut s, &mut h, br#"{"execute": "missing"}"#).unwrap();
    assert_eq!(class(&r[0]), "CommandNotFound");
    let r = feed(&mut s, &mut h, br#"{"execute": "echo"}"#).unwrap();
    assert_eq!(r, vec![json!({"return": {}})]);
}

#[test]
fn invalid_utf8_is_a_parse_error() {
    let (mut s, mut h) = negotiated();
    let r = feed(&mut s, &mut h, b"{\"execute\": \"\xff\"}").unwrap();
    assert_eq!(class(&r[0]), "GenericError");
}

#[test]
fn an_endless_message_is_cut_off() {
    let (mut s, mut h) = negotiated();
    let mut msg = br#"{"execute": "echo", "arguments": {"s": ""#.to_vec();
    msg.resize(MAX_MESSAGE + 10, b'a');
    assert_eq!(feed(&mut s, &mut h, &msg), Err(TooLong));
}

#[test]
fn a_large_message_under_the_cap_is_fine() {
    let (mut s, mut h) = negotiated();
    let big = "b".repeat(MAX_MESSAGE - 100);
    let msg = format!(r#"{{"execute": "echo", "arguments": {{"s": "{big}"}}}}"#);
    let r = feed(&mut s, &mut h, msg.as_bytes()).unwrap();
    assert_eq!(r[0]["return"]["s"].as_str().unwrap().len(), big.len());
}

#[test]
fn deep_nesting_closes() {
    let (mut s, mut h) = negotiated();
    let msg = "[".repeat(MAX_DEPTH + 1);
    assert_eq!(feed(&mut s, &mut h, msg.as_bytes()), Err(TooLong));
}

#[test]
fn events_have_qemus_shape() {
    let ev = Event::new("BLOCK_IMAGE_CORRUPTED", json!({"fatal": true}));
    let b = event_bytes(&ev);
    assert!(b.ends_with(b"\r\n"));
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["event"], "BLOCK_IMAGE_CORRUPTED");
    assert_eq!(v["data"]["fatal"], true);
    assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
}

#[test]
fn floods_of_whitespace_or_tiny_messages_stay_linear() {
    let (mut s, mut h) = negotiated();
    // 8 MiB of whitespace in 64 KiB chunks: nothing buffered, nothing answered, quickly.
    let t0 = std::time::Instant::now();
    let ws = vec![b' '; 65536];
    for _ in 0..128 {
        assert!(feed(&mut s, &mut h, &ws).unwrap().is_empty());
    }
    // 64 KiB chunks of back-to-back messages.
    let chunk = br#"{"execute":"echo"}"#.repeat(65536 / 18);
    let mut n = 0;
    for _ in 0..16 {
        n += feed(&mut s, &mut h, &chunk).unwrap().len();
    }
    assert_eq!(n, 16 * (65536 / 18));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn whitespace_and_newlines_between_messages() {
    let (mut s, mut h) = negotiated();
    let r = feed(
        &mut s,
        &mut h,
        b"\r\n  {\"execute\": \"echo\", \"id\": 1}\n\n\t{\"execute\":\n\"echo\"}\r\n",
    )
    .unwrap();
    assert_eq!(
        r,
        vec![json!({"return": {}, "id": 1}), json!({"return": {}})]
    );
}
