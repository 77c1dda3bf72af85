//! Device scripts: JavaScript converters, sandboxed.
//!
//! - [`ScriptEngine`]: one trait, two engines — [`quickjs`] (default) and `v8`
//!   (deno_core, cargo feature `v8`). Entry points `decode(bytes, ctx)` → platform
//!   JSON, `encode(msg, ctx)` → bytes, and ThingsPanel 0.x's `encodeInp(msg, topic)`.
//! - [`Scripts`]: what the pipelines call. It resolves `lib:<name>` references in the
//!   script library, runs the engines on their own threads (engines are not `Send`;
//!   a script always runs on the same one, chosen by its content hash, so it is
//!   compiled once per worker and one slow script holds up only its shard), and
//!   quarantines a script that keeps failing for a device (for that device only: a
//!   shared `lib:` script that one device feeds garbage keeps serving the others).
//!
//! Sandbox, per call: CPU time, heap, output size; no file, network, timer or module
//! access (the engines are built without them).

pub mod cache;
pub mod library;
pub mod quickjs;
#[cfg(feature = "v8")]
pub mod v8;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::metrics::{CallLabel, CallReasonLabel, Metrics};

pub use library::Library;

/// Run once in every fresh script context: the built-ins' prototypes, `JSON` and `Math`
/// frozen, so that no script can patch what another call (another device, or under V8
/// another script) relies on. The global object stays writable: sloppy-mode converters
/// use implicit globals as temporaries, and freezing it would silently break them. The
/// constructors themselves are not frozen: QuickJS leaks a frozen function's object
/// when a later script fails to compile.
pub const FREEZE_INTRINSICS: &str = r#"(() => {
  const names = ["Object", "Function", "Array", "String", "Number", "Boolean", "Symbol", "BigInt", "RegExp",
    "Date", "Error", "TypeError", "RangeError", "SyntaxError", "Map", "Set", "WeakMap", "Promise",
    "ArrayBuffer", "DataView", "Uint8Array", "Int8Array", "Uint16Array", "Int16Array", "Uint32Array",
    "Int32Array", "Float32Array", "Float64Array"];
  // Each engine is built with its own set of built-ins: those it has.
  const constructors = names.map((name) => globalThis[name]).filter((c) => typeof c === "function");
  constructors.push(Object.getPrototypeOf(Uint8Array));
  for (const c of constructors) {
    Object.freeze(c.prototype);
  }
  Object.freeze(JSON);
  Object.freeze(Math);
})();"#;

/// A script's identity: the digest of its source.
pub type ScriptHash = String;

/// The digest of a script source.
pub fn hash(source: &str) -> ScriptHash {
    crate::hex(&Sha256::digest(source.as_bytes())[..16])
}

/// The functions a script may define.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Entry {
    Decode,
    Encode,
    /// ThingsPanel 0.x: `encodeInp(msg, topic)`, strings in and out.
    EncodeInp,
}

impl Entry {
    pub fn name(self) -> &'static str {
        match self {
            Entry::Decode => "decode",
            Entry::Encode => "encode",
            Entry::EncodeInp => "encodeInp",
        }
    }
}

/// What a call tells the script about the message (its `ctx` argument).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct CallContext {
    pub device_id: String,
    pub device_number: String,
    /// `uplink`, or the downlink's kind (`command`, `attribute_set`, …).
    pub kind: String,
    /// The platform topic of the message, when there is one.
    pub topic: String,
}

/// The sandbox's limits, per call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub cpu_time: Duration,
    pub heap: usize,
    /// Largest result (JSON size or bytes).
    pub output: usize,
    /// Bytes of compiled scripts kept per engine thread (least recently used evicted).
    pub cache_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_time: Duration::from_millis(100),
            heap: 16 << 20,
            output: 64 << 10,
            cache_bytes: 256 << 20,
        }
    }
}

/// Why a script produced no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("script exceeded its CPU time limit")]
    Timeout,
    #[error("script exceeded its memory limit")]
    OutOfMemory,
    #[error("{}{message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Thrown { message: String, line: Option<u32> },
    #[error("script defines no {0} function")]
    Missing(&'static str),
    #[error("script result: {0}")]
    Output(String),
    #[error("script quarantined after repeated failures")]
    Quarantined,
    /// Its engine thread did not get to it within [`QUEUE_WAIT`]: the worker is
    /// overloaded, which says nothing about the script (not counted for quarantine).
    #[error("script engine busy")]
    Busy,
    #[error("script library: {0}")]
    Library(String),
    #[error("script engine: {0}")]
    Engine(String),
    #[error("script not loaded")]
    NotLoaded,
}

impl ScriptError {
    /// The metric label (`worker_script_errors_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            ScriptError::Timeout => "timeout",
            ScriptError::OutOfMemory => "memory",
            ScriptError::Thrown { .. } => "thrown",
            ScriptError::Missing(_) => "missing_function",
            ScriptError::Output(_) => "output",
            ScriptError::Quarantined => "quarantined",
            ScriptError::Library(_) => "library",
            ScriptError::Engine(_) | ScriptError::NotLoaded => "engine",
            ScriptError::Busy => "busy",
        }
    }
}

/// A JavaScript engine holding compiled scripts by hash. Lives on one thread.
pub trait ScriptEngine {
    /// Compiles `source` unless a script with this hash is ready.
    fn prepare(&mut self, hash: &ScriptHash, source: &str, name: &str) -> Result<(), ScriptError>;
    /// The entry points a prepared script defines.
    fn entries(&self, hash: &ScriptHash) -> Vec<Entry>;
    /// `decode(bytes, ctx)`.
    fn decode(&mut self, hash: &ScriptHash, bytes: &[u8], call: &CallContext) -> Result<Json, ScriptError>;
    /// `encode(msg, ctx)`, or 0.x `encodeInp(JSON text, topic)` when there is no encode.
    fn encode(
        &mut self,
        hash: &ScriptHash,
        message: &Json,
        call: &CallContext,
    ) -> Result<Vec<u8>, ScriptError>;
    /// 0.x uplink: `encodeInp(text of the bytes, topic)` → JSON (string or object).
    fn decode_0x(&mut self, hash: &ScriptHash, bytes: &[u8], call: &CallContext)
    -> Result<Json, ScriptError>;
}

/// Which engine runs the scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Quickjs,
    #[cfg(feature = "v8")]
    V8,
}

impl EngineKind {
    /// A new engine of this kind.
    pub fn build(self, limits: Limits) -> Box<dyn ScriptEngine> {
        match self {
            EngineKind::Quickjs => Box::new(quickjs::QuickJs::new(limits)),
            #[cfg(feature = "v8")]
            EngineKind::V8 => Box::new(v8::V8::new(limits)),
        }
    }
}

/// Runs one call of a prepared or new script on an engine (`script-worker try`, tests).
pub fn run_call(
    engine: &mut dyn ScriptEngine,
    source: &str,
    name: &str,
    call: &Call,
) -> Result<Output, ScriptError> {
    run_hashed(engine, &hash(source), source, name, call)
}

/// Runs one call of the script whose content hash is `hash` (compiled on first use):
/// the engine thread knows the hash already and does not digest the source per call.
pub fn run_hashed(
    engine: &mut dyn ScriptEngine,
    hash: &ScriptHash,
    source: &str,
    name: &str,
    call: &Call,
) -> Result<Output, ScriptError> {
    engine.prepare(hash, source, name)?;
    let entries = engine.entries(hash);
    match call {
        Call::Decode { bytes, context } => {
            if entries.contains(&Entry::Decode) {
                engine.decode(hash, bytes, context).map(Output::Json)
            } else if entries.contains(&Entry::EncodeInp) {
                engine.decode_0x(hash, bytes, context).map(Output::Json)
            } else {
                Err(ScriptError::Missing("decode"))
            }
        }
        Call::Encode { message, context } => {
            if !entries.contains(&Entry::Encode) && !entries.contains(&Entry::EncodeInp) {
                return Err(ScriptError::Missing("encode"));
            }
            engine.encode(hash, message, context).map(Output::Bytes)
        }
    }
}

/// One invocation.
#[derive(Clone, Debug)]
pub enum Call {
    Decode { bytes: Vec<u8>, context: CallContext },
    Encode { message: Json, context: CallContext },
}

impl Call {
    /// The script function it runs (the metric label).
    fn function(&self) -> &'static str {
        match self {
            Call::Decode { .. } => "decode",
            Call::Encode { .. } => "encode",
        }
    }

    fn device_id(&self) -> &str {
        match self {
            Call::Decode { context, .. } | Call::Encode { context, .. } => &context.device_id,
        }
    }
}

/// What an invocation returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Json(Json),
    Bytes(Vec<u8>),
}

/// Calls for one engine thread, run in order, answered together: one hop to the
/// thread and one back for the lot (a hop costs more than a small converter).
struct Job {
    calls: Vec<JobCall>,
    answer: oneshot::Sender<Vec<Answer>>,
    /// When it was queued: a job its thread reaches later than [`QUEUE_WAIT`] after
    /// is answered busy without running.
    queued: std::time::Instant,
}

/// A call's result, and how long the engine took for it (none: not run).
type Answer = (Result<Output, ScriptError>, Option<Duration>);

struct JobCall {
    script: library::Resolved,
    call: Call,
    /// The script's failures in a row for this device before the job: a job stops
    /// running it for the device where the quarantine would have begun.
    failures: u32,
}

/// A call for [`Scripts::run_all`]: the script reference (inline source or
/// `lib:<name>`), the call, and its span (see [`Scripts::span`]).
pub struct ScriptCall<'a> {
    pub reference: &'a str,
    pub call: Call,
    pub span: tracing::Span,
}

/// Failures in a row that quarantine a script.
const QUARANTINE_AFTER: u32 = 5;
/// How long a quarantined script is not run.
const QUARANTINE_FOR: Duration = Duration::from_secs(60);
/// Failing (script, device) pairs tracked, at most: past it, those not quarantined are
/// forgotten (a fleet of failing devices must not grow the map without end).
const HEALTH_ENTRIES: usize = 65_536;

/// What quarantine is keyed by: a script as one device runs it.
type HealthKey = (ScriptHash, String);

#[derive(Default)]
struct Health {
    failures: u32,
    quarantined_until: Option<Instant>,
}

/// How long a job may wait for its engine thread to reach it; past it the job is
/// answered busy without running.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// The scripts service: library resolution, engine threads, quarantine.
pub struct Scripts {
    /// One queue per engine thread.
    shards: Vec<mpsc::Sender<Job>>,
    /// One call's CPU time limit.
    cpu_time: Duration,
    library: Library,
    health: Mutex<HashMap<HealthKey, Health>>,
    /// Where call times and failures are counted, once [`Scripts::measured`].
    metrics: Option<Arc<Metrics>>,
}

impl Scripts {
    /// Starts `threads` engine threads.
    ///
    /// # Errors
    /// A thread cannot be started.
    pub fn start(
        kind: EngineKind,
        limits: Limits,
        library: Library,
        threads: usize,
    ) -> std::io::Result<Self> {
        let shards = (0..threads.max(1))
            .map(|shard| Self::start_engine(kind, limits, shard))
            .collect::<std::io::Result<_>>()?;
        Ok(Scripts { shards, cpu_time: limits.cpu_time, library, health: Mutex::default(), metrics: None })
    }

    /// Counts call times and failures in `metrics`.
    pub fn measured(self, metrics: Arc<Metrics>) -> Self {
        Scripts { metrics: Some(metrics), ..self }
    }

    fn start_engine(kind: EngineKind, limits: Limits, shard: usize) -> std::io::Result<mpsc::Sender<Job>> {
        // Bounded: a flood of messages waits for the engine instead of queueing without end.
        let (jobs, mut queue) = mpsc::channel::<Job>(1024);
        // V8 (deno_core) needs a tokio runtime to be current where it is created.
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new().name(format!("scripts-{shard}")).spawn(move || {
            let _runtime = runtime.as_ref().map(|r| r.enter());
            let mut engine = kind.build(limits);
            while let Some(job) = queue.blocking_recv() {
                if job.queued.elapsed() > QUEUE_WAIT {
                    let _ =
                        job.answer.send(job.calls.iter().map(|_| (Err(ScriptError::Busy), None)).collect());
                    continue;
                }
                let mut answers = Vec::with_capacity(job.calls.len());
                let mut streaks = HashMap::new();
                for JobCall { script, call, failures } in &job.calls {
                    if job.answer.is_closed() {
                        // Its caller is gone (shutdown, a cancelled batch): no CPU for it.
                        break;
                    }
                    // Kept only for a device whose script failed: none in the usual job.
                    let key = (&script.hash, call.device_id());
                    let streak = streaks.get(&key).copied().unwrap_or(*failures);
                    if streak >= QUARANTINE_AFTER {
                        answers.push((Err(ScriptError::Quarantined), None));
                        continue;
                    }
                    let started = std::time::Instant::now();
                    let run = std::panic::AssertUnwindSafe(|| {
                        run_hashed(engine.as_mut(), &script.hash, &script.source, &script.name, call)
                    });
                    // A panic inside an engine must not end the worker's scripting: that
                    // call fails, and the engine starts afresh (its state may be
                    // inconsistent).
                    let result = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                        tracing::error!(script = %script.hash, "script engine panicked; restarting it");
                        engine = kind.build(limits);
                        Err(ScriptError::Engine("the script engine failed on this call".to_owned()))
                    });
                    match (&result, streak) {
                        (Ok(_), 0) => {}
                        (Ok(_), _) => drop(streaks.insert(key, 0)),
                        (Err(_), _) => drop(streaks.insert(key, streak + 1)),
                    }
                    answers.push((result, Some(started.elapsed())));
                }
                if answers.len() == job.calls.len() {
                    let _ = job.answer.send(answers);
                }
            }
        })?;
        Ok(jobs)
    }

    /// The engine thread of a script: by its content hash, so that each script is
    /// compiled and cached on one thread only.
    fn shard_of(&self, hash: &ScriptHash) -> usize {
        let key = hash.get(..16).and_then(|prefix| u64::from_str_radix(prefix, 16).ok()).unwrap_or(0);
        (key % self.shards.len() as u64) as usize
    }

    /// Runs a call of the script `reference` (inline source or `lib:<name>`).
    ///
    /// # Errors
    /// The script is missing, quarantined, or failed.
    pub async fn run(&self, reference: &str, call: Call) -> Result<Output, ScriptError> {
        let span = Self::span(&call, &tracing::Span::current());
        let mut results = self.run_all(vec![ScriptCall { reference, call, span }]).await;
        results.pop().expect("one result per call")
    }

    /// The span of one call, under `parent`: it lasts until the call's result is in.
    pub fn span(call: &Call, parent: &tracing::Span) -> tracing::Span {
        let function = call.function();
        tracing::debug_span!(
            parent: parent,
            "script",
            "otel.name" = %format_args!("script {function}"),
            "tcpc.script.function" = function,
            "tcpc.device.id" = call.device_id(),
            "error.type" = tracing::field::Empty,
        )
    }

    /// Runs calls, each engine thread's share in one job (in the given order), and
    /// returns their results in the same order. The calls are taken to be in their
    /// messages' order: a busy one is retried with every call after it, so the outcomes
    /// after it count only when they are made again (quarantine, error metrics).
    pub async fn run_all(&self, calls: Vec<ScriptCall<'_>>) -> Vec<Result<Output, ScriptError>> {
        let mut results: Vec<Option<Result<Output, ScriptError>>> = vec![None; calls.len()];
        let mut spans = Vec::with_capacity(calls.len());
        let mut keys = Vec::with_capacity(calls.len());
        let mut shards: Vec<Vec<(usize, JobCall)>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for (index, ScriptCall { reference, call, span }) in calls.into_iter().enumerate() {
            spans.push((span, call.function()));
            let script = match self.library.resolve(reference) {
                Ok(script) => script,
                Err(error) => {
                    results[index] = Some(Err(error));
                    keys.push(None);
                    continue;
                }
            };
            let key = (script.hash.clone(), call.device_id().to_owned());
            let Some(failures) = self.failures(&key) else {
                results[index] = Some(Err(ScriptError::Quarantined));
                keys.push(None);
                continue;
            };
            keys.push(Some(key));
            shards[self.shard_of(&script.hash)].push((index, JobCall { script, call, failures }));
        }
        let jobs = shards.into_iter().enumerate().filter(|(_, calls)| !calls.is_empty()).map(
            |(shard, calls)| async move {
                let indices: Vec<usize> = calls.iter().map(|(index, _)| *index).collect();
                let answers = self.send_job(shard, calls).await;
                indices.into_iter().zip(answers)
            },
        );
        for (index, (result, took)) in futures::future::join_all(jobs).await.into_iter().flatten() {
            if let (Some(metrics), Some(took)) = (&self.metrics, took) {
                let call = spans[index].1;
                metrics.script_duration.get_or_create(&CallLabel { call }).observe(took.as_secs_f64());
            }
            results[index] = Some(result);
        }
        let results: Vec<_> = results.into_iter().map(|r| r.expect("every call answered")).collect();
        // The calls are in their messages' order, and a busy one is retried with every
        // message after it: what those calls did is done again then, and counted then.
        let retried = results.iter().position(|r| r == &Err(ScriptError::Busy)).unwrap_or(results.len());
        for ((result, (span, function)), key) in results.iter().zip(&spans).zip(keys).take(retried + 1) {
            // A call not run (busy, or quarantined during its job) says nothing of the
            // script.
            if let Some(key) = key
                && !matches!(result, Err(ScriptError::Busy | ScriptError::Quarantined))
            {
                self.record(key, result.is_ok());
            }
            if let Err(error) = result {
                span.record("error.type", error.label());
                if let Some(metrics) = &self.metrics {
                    let label = CallReasonLabel { call: function, reason: error.label() };
                    metrics.script_errors.get_or_create(&label).inc();
                }
            }
        }
        results
    }

    /// One job on engine thread `shard`: each call's result and the engine's time for
    /// it (none when the job was not run in time: [`ScriptError::Busy`]).
    async fn send_job(&self, shard: usize, calls: Vec<(usize, JobCall)>) -> Vec<Answer> {
        let count = calls.len();
        let (answer, result) = oneshot::channel();
        let stopped = || ScriptError::Engine("the script thread stopped".to_owned());
        let calls = calls.into_iter().map(|(_, call)| call).collect();
        let job = Job { calls, answer, queued: std::time::Instant::now() };
        let queued = async {
            self.shards[shard].send(job).await.map_err(|_| stopped())?;
            result.await.map_err(|_| stopped())
        };
        // The engine answers a job it reaches too late as busy, and each call has its CPU
        // time: this bound is only for an engine that does neither (past it, the engine
        // skips the rest of the job: its answer channel is closed).
        let deadline = 2 * QUEUE_WAIT + self.cpu_time * u32::try_from(count).unwrap_or(u32::MAX);
        match tokio::time::timeout(deadline, queued).await {
            Ok(Ok(answers)) => answers,
            Ok(Err(error)) => vec![(Err(error), None); count],
            Err(_) => vec![(Err(ScriptError::Busy), None); count],
        }
    }

    /// The content hash of the script a reference names.
    ///
    /// # Errors
    /// A library script that cannot be read.
    pub fn hash_of(&self, reference: &str) -> Result<ScriptHash, ScriptError> {
        Ok(self.library.resolve(reference)?.hash)
    }

    /// The script's failures in a row for the device; none while it is quarantined.
    fn failures(&self, key: &HealthKey) -> Option<u32> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match health.get(key) {
            Some(h) if h.quarantined_until.is_some_and(|until| Instant::now() < until) => None,
            Some(h) => Some(h.failures),
            None => Some(0),
        }
    }

    fn record(&self, key: HealthKey, ok: bool) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            health.remove(&key);
            return;
        }
        if health.len() >= HEALTH_ENTRIES && !health.contains_key(&key) {
            let now = Instant::now();
            health.retain(|_, h| h.quarantined_until.is_some_and(|until| now < until));
        }
        let (script, device_id) = (key.0.clone(), key.1.clone());
        let entry = health.entry(key).or_default();
        entry.failures += 1;
        if entry.failures >= QUARANTINE_AFTER {
            entry.failures = 0;
            entry.quarantined_until = Some(Instant::now() + QUARANTINE_FOR);
            tracing::error!(
                %script,
                %device_id,
                "script quarantined for this device for {QUARANTINE_FOR:?} after {QUARANTINE_AFTER} failures in a row"
            );
        }
    }
}

#[cfg(test)]
mod engine_suite;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_for(device_id: &str) -> Call {
        let context = CallContext { device_id: device_id.to_owned(), ..Default::default() };
        Call::Decode { bytes: b"x".to_vec(), context }
    }

    #[tokio::test]
    async fn quarantine_silences_the_failing_device_only() {
        let scripts = Scripts::start(EngineKind::Quickjs, Limits::default(), Library::new(None), 1).unwrap();
        let shared = r#"function decode(b, ctx) { if (ctx.device_id === "bad") throw new Error("garbage"); return {ok: 1}; }"#;
        for _ in 0..QUARANTINE_AFTER {
            assert!(matches!(scripts.run(shared, decode_for("bad")).await, Err(ScriptError::Thrown { .. })));
        }
        assert_eq!(scripts.run(shared, decode_for("bad")).await, Err(ScriptError::Quarantined));
        assert_eq!(
            scripts.run(shared, decode_for("good")).await,
            Ok(Output::Json(serde_json::json!({"ok": 1}))),
            "another device on the same script is served"
        );
    }

    #[tokio::test]
    async fn a_job_stops_running_a_script_for_a_device_where_its_quarantine_begins() {
        let scripts = Scripts::start(EngineKind::Quickjs, Limits::default(), Library::new(None), 1).unwrap();
        let shared = r#"function decode(b, ctx) { if (ctx.device_id === "bad") throw new Error("garbage"); return {ok: 1}; }"#;
        let call = |device: &str| ScriptCall {
            reference: shared,
            call: decode_for(device),
            span: tracing::Span::none(),
        };
        // One failure before the job: four more in it quarantine the script for "bad".
        assert!(matches!(scripts.run(shared, decode_for("bad")).await, Err(ScriptError::Thrown { .. })));
        let devices = ["bad", "bad", "good", "bad", "bad", "bad", "good"];
        let results = scripts.run_all(devices.iter().map(|d| call(d)).collect()).await;
        let labels: Vec<&str> =
            results.iter().map(|r| r.as_ref().map_or_else(ScriptError::label, |_| "ok")).collect();
        assert_eq!(labels, ["thrown", "thrown", "ok", "thrown", "thrown", "quarantined", "ok"]);
        assert_eq!(scripts.run(shared, decode_for("bad")).await, Err(ScriptError::Quarantined));
        assert!(scripts.run(shared, decode_for("good")).await.is_ok());
    }

    #[tokio::test]
    async fn calls_run_together_answer_in_their_order_each_with_its_own_outcome() {
        let scripts = Scripts::start(EngineKind::Quickjs, Limits::default(), Library::new(None), 2).unwrap();
        // Variants of one script on both engine threads, a failing one, a missing one.
        let variants: Vec<String> = (0..8)
            .map(|n| format!("function decode(b, ctx) {{ return {{n: {n}, d: ctx.device_id}}; }}"))
            .collect();
        assert!(variants.iter().any(|v| scripts.shard_of(&hash(v)) != scripts.shard_of(&hash(&variants[0]))));
        let throws = "function decode(b) { throw new Error('bad'); }";
        let mut references: Vec<&str> = variants.iter().map(String::as_str).collect();
        references.insert(3, throws);
        references.insert(5, "lib:absent");
        let calls = references
            .iter()
            .enumerate()
            .map(|(i, &reference)| ScriptCall {
                reference,
                call: decode_for(&format!("d{i}")),
                span: tracing::Span::none(),
            })
            .collect();
        let results = scripts.run_all(calls).await;
        assert_eq!(results.len(), references.len());
        let mut variant = 0;
        for (i, result) in results.into_iter().enumerate() {
            match i {
                3 => assert!(matches!(result, Err(ScriptError::Thrown { .. })), "{result:?}"),
                5 => assert!(matches!(result, Err(ScriptError::Library(_))), "{result:?}"),
                _ => {
                    let expected = serde_json::json!({"n": variant, "d": format!("d{i}")});
                    assert_eq!(result, Ok(Output::Json(expected)), "call {i}");
                    variant += 1;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_job_reached_too_late_is_busy_and_what_comes_after_it_counts_when_retried() {
        let limits = Limits { cpu_time: QUEUE_WAIT + Duration::from_secs(1), ..Limits::default() };
        let scripts = Scripts::start(EngineKind::Quickjs, limits, Library::new(None), 2).unwrap();
        let slow = "function decode(b) { while (true) {} }";
        let on_thread = |thread: usize, body: &str| {
            (0..1000)
                .map(|n| format!("function decode(b) {{ {body} }} // {n}"))
                .find(|source| scripts.shard_of(&hash(source)) == thread)
                .expect("a variant on that thread")
        };
        let behind = on_thread(scripts.shard_of(&hash(slow)), "return {ok: 1};");
        let throws = on_thread(1 - scripts.shard_of(&hash(slow)), "throw new Error('bad');");
        // The slow call is queued first (one poll sends its job), and holds its thread
        // past the queue wait of the job queued behind it.
        let mut slow_call = Box::pin(scripts.run(slow, decode_for("a")));
        assert!(futures::poll!(&mut slow_call).is_pending());
        let call = |reference, device| ScriptCall {
            reference,
            call: decode_for(device),
            span: tracing::Span::none(),
        };
        let results = scripts.run_all(vec![call(&behind, "b"), call(&throws, "c")]).await;
        assert_eq!(results[0], Err(ScriptError::Busy));
        assert!(matches!(results[1], Err(ScriptError::Thrown { .. })), "{:?}", results[1]);
        // The failure after the busy call is not counted: it comes again with the retry.
        assert_eq!(scripts.failures(&(hash(&throws), "c".to_owned())), Some(0));
        assert_eq!(slow_call.await, Err(ScriptError::Timeout));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_script_holds_up_only_its_own_engine_thread() {
        let limits = Limits { cpu_time: Duration::from_secs(2), ..Limits::default() };
        let scripts = Scripts::start(EngineKind::Quickjs, limits, Library::new(None), 2).unwrap();
        let slow = "function decode(b) { while (true) {} }";
        // A quick script that lands on the other thread (variants differ only in a comment).
        let quick = (0..1000)
            .map(|n| format!("function decode(b) {{ return {{ok: 1}}; }} // {n}"))
            .find(|source| scripts.shard_of(&hash(source)) != scripts.shard_of(&hash(slow)))
            .expect("a variant of the quick script on the other thread");
        let (slow_done, mut finished) = mpsc::unbounded_channel();
        let slow_call = {
            let (scripts, done) = (&scripts, slow_done.clone());
            async move {
                let result = scripts.run(slow, decode_for("a")).await;
                let _ = done.send("slow");
                result
            }
        };
        let quick_call = async {
            let result = scripts.run(&quick, decode_for("b")).await;
            let _ = slow_done.send("quick");
            result
        };
        let (slow_result, quick_result) = tokio::join!(slow_call, quick_call);
        assert_eq!(slow_result, Err(ScriptError::Timeout));
        assert_eq!(quick_result, Ok(Output::Json(serde_json::json!({"ok": 1}))));
        // The quick call did not wait out the slow one's 2 s of CPU.
        assert_eq!(finished.recv().await, Some("quick"));
    }
}
