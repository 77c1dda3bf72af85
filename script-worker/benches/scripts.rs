//! Per-message script cost: `cargo bench -p script-worker --bench scripts`.
//!
//! Calls the example converters (examples/devices.toml's custom device, and a 4-field
//! binary meter) on the QuickJS engine as the worker does (prepared once, reused), and
//! prints the mean cost per call.

use std::time::Instant;

use script_worker::scripts::{self, Call, CallContext, EngineKind, Limits, Output, ScriptEngine};

/// Calls per script; `BENCH_CALLS` overrides (fewer under valgrind).
fn calls() -> u32 {
    std::env::var("BENCH_CALLS").ok().and_then(|n| n.parse().ok()).unwrap_or(200_000)
}

const METER: &str = r#"
function decode(bytes, ctx) {
  return { temperature: ((bytes[0] << 8) | bytes[1]) / 10, humidity: bytes[2], battery: bytes[3], ok: true };
}"#;

const EXAMPLE_CUSTOM: &str = r#"
function decode(bytes, ctx) {
  var text = String.fromCharCode.apply(null, bytes).trim();
  var parts = text.split(",");
  return { temperature: Number(parts[0]) / 10, humidity: Number(parts[1]) / 10 };
}"#;

const EXAMPLE_DOWNLINK: &str = r#"
function encode(msg, ctx) {
  return "CMD " + (msg.method || "set") + " " + JSON.stringify(msg.params || msg) + "\n";
}"#;

fn bench(engine: &mut dyn ScriptEngine, name: &str, source: &str, call: Call) {
    let hash = scripts::hash(source);
    engine.prepare(&hash, source, name).expect("script compiles");
    // Warm up, and check the result once.
    let output = scripts::run_call(engine, source, name, &call).expect("script runs");
    let calls = calls();
    let started = Instant::now();
    for _ in 0..calls {
        let result = match &call {
            Call::Decode { bytes, context } => engine.decode(&hash, bytes, context).map(Output::Json),
            Call::Encode { message, context } => engine.encode(&hash, message, context).map(Output::Bytes),
        };
        std::hint::black_box(result.expect("script runs"));
    }
    let per_call = started.elapsed() / calls;
    println!("{name:<28} {per_call:>10.2?} per call   -> {output:?}");
}

fn main() {
    let mut engine = EngineKind::Quickjs.build(Limits::default());
    let context = CallContext {
        device_id: "d".into(),
        device_number: "D001".into(),
        kind: "uplink".into(),
        topic: String::new(),
    };
    // The floor: entering the context, the Uint8Array argument, the call, a null result.
    bench(
        engine.as_mut(),
        "empty decode",
        "function decode(b, ctx) { return null; }",
        Call::Decode { bytes: vec![1, 2, 3, 4], context: context.clone() },
    );
    bench(
        engine.as_mut(),
        "meter decode (4 fields)",
        METER,
        Call::Decode { bytes: vec![0x01, 0x6D, 52, 97], context: context.clone() },
    );
    bench(
        engine.as_mut(),
        "example custom decode",
        EXAMPLE_CUSTOM,
        Call::Decode { bytes: b"365,520\n".to_vec(), context: context.clone() },
    );
    let message = serde_json::json!({"method": "reboot", "params": {"delay": 5}});
    bench(
        engine.as_mut(),
        "example downlink encode",
        EXAMPLE_DOWNLINK,
        Call::Encode { message, context: context.clone() },
    );
    through_the_service(context.clone());
    for threads in [1, 2] {
        sharded(context.clone(), threads);
    }
}

/// Many devices' scripts at once through `Scripts::run` on `threads` engine threads:
/// eight variants of the meter (distinct scripts, spread over the threads by hash), 64
/// calls in flight. `SCRIPT_THREADS` in the worker; the figure the sharding is for.
fn sharded(context: CallContext, threads: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let scripts = std::sync::Arc::new(
            scripts::Scripts::start(
                EngineKind::Quickjs,
                Limits::default(),
                scripts::Library::default(),
                threads,
            )
            .unwrap(),
        );
        let variants: Vec<String> = (0..8).map(|n| format!("{METER} // variant {n}")).collect();
        let calls = calls() / 4;
        let started = Instant::now();
        let mut lanes = Vec::new();
        for lane in 0..64 {
            let (scripts, source, context) = (scripts.clone(), variants[lane % 8].clone(), context.clone());
            lanes.push(tokio::spawn(async move {
                for _ in 0..calls / 64 {
                    let call = Call::Decode { bytes: vec![0x01, 0x6D, 52, 97], context: context.clone() };
                    std::hint::black_box(scripts.run(&source, call).await.expect("script runs"));
                }
            }));
        }
        for lane in lanes {
            lane.await.unwrap();
        }
        let elapsed = started.elapsed();
        println!(
            "{:<28} {:>10.0} calls/s   (8 scripts, 64 in flight, {threads} engine thread(s))",
            "meters via Scripts::run",
            f64::from(calls / 64 * 64) / elapsed.as_secs_f64()
        );
    });
}

/// The meter through `Scripts::run`, as the pipeline calls it: the script resolved and
/// its hash looked up, the call handed to the engine thread and the answer awaited.
fn through_the_service(context: CallContext) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async {
        let scripts =
            scripts::Scripts::start(EngineKind::Quickjs, Limits::default(), scripts::Library::default(), 1)
                .unwrap();
        let call = || Call::Decode { bytes: vec![0x01, 0x6D, 52, 97], context: context.clone() };
        scripts.run(METER, call()).await.expect("script runs");
        let calls = calls() / 4;
        let started = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(scripts.run(METER, call()).await.expect("script runs"));
        }
        println!(
            "{:<28} {:>10.2?} per call   (one at a time, thread hop included)",
            "meter via Scripts::run",
            started.elapsed() / calls
        );
        // As a busy partition hands them: 64 calls in one job, one hop for the lot.
        let started = Instant::now();
        for _ in 0..calls / 64 {
            let batch = (0..64)
                .map(|_| scripts::ScriptCall { reference: METER, call: call(), span: tracing::Span::none() })
                .collect();
            std::hint::black_box(scripts.run_all(batch).await);
        }
        println!(
            "{:<28} {:>10.2?} per call   (64 per job, thread hop included)",
            "meters via Scripts::run_all",
            started.elapsed() / (calls / 64 * 64)
        );
    });
}
