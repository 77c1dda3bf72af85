//! One suite for every engine that is built: the same scripts, the same answers.

use serde_json::json;

use super::*;

fn engines() -> Vec<(&'static str, Box<dyn ScriptEngine>)> {
    let limits =
        Limits { cpu_time: Duration::from_millis(100), heap: 8 << 20, output: 4096, cache_bytes: 64 << 20 };
    let engines: Vec<(&'static str, Box<dyn ScriptEngine>)> =
        vec![("quickjs", EngineKind::Quickjs.build(limits))];
    #[cfg(feature = "v8")]
    let engines = {
        let mut engines = engines;
        engines.push(("v8", EngineKind::V8.build(limits)));
        engines
    };
    engines
}

fn decode(engine: &mut dyn ScriptEngine, source: &str, bytes: &[u8]) -> Result<Json, ScriptError> {
    let context = CallContext {
        device_id: "dev-1".into(),
        device_number: "D001".into(),
        kind: "uplink".into(),
        ..Default::default()
    };
    match run_call(engine, source, "uplink.js", &Call::Decode { bytes: bytes.to_vec(), context })? {
        Output::Json(json) => Ok(json),
        Output::Bytes(_) => unreachable!(),
    }
}

fn encode(engine: &mut dyn ScriptEngine, source: &str, message: Json) -> Result<Vec<u8>, ScriptError> {
    let context =
        CallContext { kind: "command".into(), topic: "devices/command/D001/m1".into(), ..Default::default() };
    match run_call(engine, source, "downlink.js", &Call::Encode { message, context })? {
        Output::Bytes(bytes) => Ok(bytes),
        Output::Json(_) => unreachable!(),
    }
}

const METER: &str = r#"
function decode(bytes, ctx) {
  return { temperature: ((bytes[0] << 8) | bytes[1]) / 10, humidity: bytes[2], ok: true,
           device: ctx.device_number, tags: ["a", 1.5], nothing: undefined };
}
function encode(msg, ctx) {
  return [0xAA, msg.params.delay, ctx.kind.length];
}
"#;

#[test]
fn decode_walks_the_result_into_json() {
    for (name, mut engine) in engines() {
        let result = decode(engine.as_mut(), METER, &[0x01, 0x6D, 52]).unwrap();
        assert_eq!(
            result,
            json!({"temperature": 36.5, "humidity": 52, "ok": true, "device": "D001", "tags": ["a", 1.5]}),
            "{name}"
        );
    }
}

#[test]
fn encode_returns_bytes_from_arrays_typed_arrays_and_strings() {
    for (name, mut engine) in engines() {
        let message = json!({"method": "reboot", "params": {"delay": 5}});
        assert_eq!(encode(engine.as_mut(), METER, message.clone()).unwrap(), [0xAA, 5, 7], "{name}");
        let typed = "function encode(m) { return new Uint8Array([1, 2, 255]); }";
        assert_eq!(encode(engine.as_mut(), typed, message.clone()).unwrap(), [1, 2, 255], "{name}");
        let text = "function encode(m) { return 'AT+' + m.method + '\\r\\n'; }";
        assert_eq!(encode(engine.as_mut(), text, message).unwrap(), b"AT+reboot\r\n", "{name}");
    }
}

#[test]
fn thingspanel_0x_encode_inp() {
    for (name, mut engine) in engines() {
        let script = "function encodeInp(msg, topic) { var o = JSON.parse(msg); o.topic = topic; return JSON.stringify(o); }";
        assert_eq!(
            encode(engine.as_mut(), script, json!({"a": 1})).unwrap(),
            br#"{"a":1,"topic":"devices/command/D001/m1"}"#,
            "{name}"
        );
        let uplink = "function encodeInp(msg, topic) { return JSON.stringify({raw: msg}); }";
        assert_eq!(decode(engine.as_mut(), uplink, b"t=1").unwrap(), json!({"raw": "t=1"}), "{name}");
    }
}

#[test]
fn a_throw_reports_its_message_and_line() {
    for (name, mut engine) in engines() {
        let script = "function decode(bytes) {\n  var x = 1;\n  throw new Error('bad frame');\n}";
        assert_eq!(
            decode(engine.as_mut(), script, b"").unwrap_err(),
            ScriptError::Thrown { message: "Error: bad frame".into(), line: Some(3) },
            "{name}"
        );
        let syntax = "function decode(bytes) {\n  return {;\n}";
        let ScriptError::Thrown { message, line } = decode(engine.as_mut(), syntax, b"").unwrap_err() else {
            panic!("{name}: a syntax error is thrown")
        };
        assert!(message.starts_with("SyntaxError"), "{name}: {message}");
        assert_eq!(line, Some(2), "{name}");
    }
}

#[test]
fn an_endless_loop_is_stopped_and_the_engine_goes_on() {
    for (name, mut engine) in engines() {
        let script = "function decode(bytes) { while (true) {} }";
        assert_eq!(decode(engine.as_mut(), script, b"").unwrap_err(), ScriptError::Timeout, "{name}");
        assert_eq!(decode(engine.as_mut(), script, b"").unwrap_err(), ScriptError::Timeout, "{name}: again");
        assert!(decode(engine.as_mut(), METER, &[0, 1, 2]).is_ok(), "{name}: others still run");
    }
}

#[test]
fn endless_allocation_hits_the_heap_limit() {
    for (name, mut engine) in engines() {
        let script =
            "function decode(bytes) { var a = []; while (true) { a.push(new Array(1000).fill('x')); } }";
        assert_eq!(decode(engine.as_mut(), script, b"").unwrap_err(), ScriptError::OutOfMemory, "{name}");
        assert!(decode(engine.as_mut(), METER, &[0, 1, 2]).is_ok(), "{name}: others still run");
    }
}

#[test]
fn no_io_timers_or_modules() {
    for (name, mut engine) in engines() {
        for attempt in [
            "require('fs')",
            "fetch('http://example.com')",
            "setTimeout(function(){}, 1)",
            "std.open('/etc/passwd', 'r')",
            "os.exec(['ls'])",
            "queueMicrotask(function(){})",
        ] {
            let script = format!("function decode(bytes) {{ {attempt}; return {{}}; }}");
            let error = decode(engine.as_mut(), &script, b"").unwrap_err();
            assert!(
                matches!(&error, ScriptError::Thrown { message, .. } if message.starts_with("ReferenceError")),
                "{name}: {attempt} gave {error:?}"
            );
        }
        let import = "import * as fs from 'fs'; function decode(b) { return {}; }";
        assert!(matches!(decode(engine.as_mut(), import, b""), Err(ScriptError::Thrown { .. })), "{name}");
    }
}

#[test]
fn typed_arrays_and_script_chosen_lengths_are_charged_before_allocating() {
    for (name, mut engine) in engines() {
        // Within the heap, far over the output limit once each byte is a JSON value.
        let typed = "function decode(b) { return { a: new Uint8Array(100000) }; }";
        assert!(matches!(decode(engine.as_mut(), typed, b""), Err(ScriptError::Output(_))), "{name}");
        // A sparse array of 2^31 - 1 holes: no capacity reserved from its length.
        let sparse = "function decode(b) { var a = []; a.length = 2 ** 31 - 1; return { a: a }; }";
        assert!(matches!(decode(engine.as_mut(), sparse, b""), Err(ScriptError::Output(_))), "{name}");
        let fits = "function decode(b) { return { a: new Uint8Array(3) }; }";
        assert_eq!(decode(engine.as_mut(), fits, b"").unwrap(), json!({"a": [0, 0, 0]}), "{name}");
    }
}

#[test]
fn output_is_bounded() {
    for (name, mut engine) in engines() {
        let big = "function decode(b) { return { s: 'x'.repeat(100000) }; }";
        assert!(matches!(decode(engine.as_mut(), big, b""), Err(ScriptError::Output(_))), "{name}");
        let missing = "function encode(m) { return []; }";
        assert_eq!(
            decode(engine.as_mut(), missing, b"").unwrap_err(),
            ScriptError::Missing("decode"),
            "{name}"
        );
    }
}

#[test]
fn built_ins_cannot_be_patched_for_the_next_call() {
    for (name, mut engine) in engines() {
        let patch = "function decode(b) { Array.prototype.leak = 'from dev-1'; \
                     try { JSON.parse = () => ({}); } catch (e) {} return { patched: [].leak === 'from dev-1' }; }";
        let engine = engine.as_mut();
        assert_eq!(decode(engine, patch, b"").unwrap(), json!({"patched": false}), "{name}");
        let check = "function decode(b) { return { v: JSON.parse('{\"a\":1}').a }; }";
        assert_eq!(decode(engine, check, b"").unwrap(), json!({"v": 1}), "{name}");
    }
}
