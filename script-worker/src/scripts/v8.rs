//! The V8 engine (deno_core), cargo feature `v8`.
//!
//! One `JsRuntime` for all scripts (isolates must be dropped in reverse creation order,
//! so a cache of runtimes per script is not an option): each script is evaluated inside
//! its own function scope and its entry points kept as globals. CPU time is enforced
//! by a watchdog thread that terminates execution; the heap by a near-heap-limit
//! callback that terminates and then rebuilds the runtime. `Deno` and `__bootstrap`
//! are deleted before any script runs, so scripts reach no op.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use deno_core::{JsRuntime, RuntimeOptions, v8};
use serde_json::Value as Json;

use super::cache::ScriptCache;
use super::{CallContext, Entry, FREEZE_INTRINSICS, Limits, ScriptEngine, ScriptError, ScriptHash};

const LOCKDOWN: &str = r#"
delete globalThis.Deno;
delete globalThis.__bootstrap;
delete globalThis.queueMicrotask;
globalThis.console = Object.freeze({ log() {}, info() {}, warn() {}, error() {}, debug() {} });
"#;
const MAX_DEPTH: usize = 64;

struct Loaded {
    functions: HashMap<Entry, v8::Global<v8::Function>>,
}

/// Bytes a compiled script weighs beside its source's share (its context objects).
const V8_OVERHEAD: usize = 16 << 10;

/// V8 scripts by content hash.
pub struct V8 {
    limits: Limits,
    // Dropped before the runtime.
    scripts: ScriptCache<Loaded>,
    watchdog: Option<Watchdog>,
    out_of_memory: Rc<Cell<bool>>,
    runtime: Option<JsRuntime>,
}

impl V8 {
    pub fn new(limits: Limits) -> Self {
        V8 {
            limits,
            scripts: ScriptCache::new(limits.cache_bytes),
            watchdog: None,
            out_of_memory: Rc::new(Cell::new(false)),
            runtime: None,
        }
    }

    /// The runtime, built on first use and after an out-of-memory.
    fn runtime(&mut self) -> Result<&mut JsRuntime, ScriptError> {
        if self.runtime.is_none() {
            let mut runtime = JsRuntime::try_new(RuntimeOptions {
                create_params: Some(v8::CreateParams::default().heap_limits(0, self.limits.heap)),
                ..Default::default()
            })
            .map_err(|e| ScriptError::Engine(e.to_string()))?;
            let out_of_memory = self.out_of_memory.clone();
            let handle = runtime.v8_isolate().thread_safe_handle();
            runtime.add_near_heap_limit_callback(move |current, _initial| {
                out_of_memory.set(true);
                handle.terminate_execution();
                // Room to unwind; the runtime is rebuilt after this call.
                current * 2
            });
            runtime.execute_script("<lockdown>", LOCKDOWN).map_err(|e| ScriptError::Engine(e.to_string()))?;
            runtime
                .execute_script("<freeze>", FREEZE_INTRINSICS)
                .map_err(|e| ScriptError::Engine(e.to_string()))?;
            self.watchdog = Some(Watchdog::new(runtime.v8_isolate().thread_safe_handle()));
            self.runtime = Some(runtime);
        }
        Ok(self.runtime.as_mut().expect("built above"))
    }

    /// Runs `work` under the CPU-time watchdog and sorts out termination.
    fn guarded<T>(
        &mut self,
        work: impl FnOnce(&mut JsRuntime) -> Result<T, Failure>,
    ) -> Result<T, ScriptError> {
        self.out_of_memory.set(false);
        let cpu_time = self.limits.cpu_time;
        self.runtime()?;
        let watchdog = self.watchdog.as_ref().expect("built with the runtime");
        watchdog.arm(cpu_time);
        let runtime = self.runtime.as_mut().expect("built above");
        let result = work(runtime);
        let fired = watchdog.disarm();
        runtime.v8_isolate().cancel_terminate_execution();
        match result {
            Ok(value) => Ok(value),
            Err(Failure::Terminated) if self.out_of_memory.get() => {
                self.scripts.clear();
                self.watchdog = None;
                self.runtime = None;
                Err(ScriptError::OutOfMemory)
            }
            Err(Failure::Terminated) if fired => Err(ScriptError::Timeout),
            Err(Failure::Terminated) => Err(ScriptError::Engine("execution terminated".to_owned())),
            Err(Failure::Script(error)) => Err(error),
        }
    }

    fn function(&mut self, hash: &ScriptHash, entry: Entry) -> Result<v8::Global<v8::Function>, ScriptError> {
        self.scripts.touch(hash);
        let loaded = self.scripts.get(hash).ok_or(ScriptError::NotLoaded)?;
        loaded.functions.get(&entry).cloned().ok_or(ScriptError::Missing(entry.name()))
    }
}

enum Failure {
    Terminated,
    Script(ScriptError),
}

impl ScriptEngine for V8 {
    fn prepare(&mut self, hash: &ScriptHash, source: &str, name: &str) -> Result<(), ScriptError> {
        if self.scripts.contains(hash) {
            return Ok(());
        }
        // Each script in its own function scope: its top-level names stay its own.
        let wrapped = format!(
            "(function() {{\n{source}\n;return {{ decode: typeof decode === 'function' ? decode : undefined, \
             encode: typeof encode === 'function' ? encode : undefined, \
             encodeInp: typeof encodeInp === 'function' ? encodeInp : undefined }};\n}})()"
        );
        let name = name.to_owned();
        let functions = self.guarded(move |runtime| {
            let exports = runtime.execute_script(name, wrapped).map_err(|error| {
                if error.exception_message.contains("execution terminated") {
                    Failure::Terminated
                } else {
                    // The wrapper adds one line before the script.
                    let line =
                        error.frames.first().and_then(|f| f.line_number).map(|l| (l - 1).max(1) as u32);
                    let message = error.exception_message.trim_start_matches("Uncaught ").to_owned();
                    Failure::Script(ScriptError::Thrown { message, line })
                }
            })?;
            deno_core::scope!(scope, runtime);
            let exports = v8::Local::new(scope, &exports);
            let exports = v8::Local::<v8::Object>::try_from(exports).map_err(|_| {
                Failure::Script(ScriptError::Engine("script wrapper returned no object".into()))
            })?;
            let mut functions = HashMap::new();
            for entry in [Entry::Decode, Entry::Encode, Entry::EncodeInp] {
                let key = v8::String::new(scope, entry.name()).expect("short ASCII name");
                if let Some(value) = exports.get(scope, key.into())
                    && let Ok(function) = v8::Local::<v8::Function>::try_from(value)
                {
                    functions.insert(entry, v8::Global::new(scope, function));
                }
            }
            Ok(functions)
        })?;
        // One isolate for all: a script's share is estimated from its source (compiled
        // code and its closures run to a few times the text).
        self.scripts.insert(hash.clone(), Loaded { functions }, V8_OVERHEAD + source.len() * 4);
        Ok(())
    }

    fn entries(&self, hash: &ScriptHash) -> Vec<Entry> {
        self.scripts.get(hash).map(|l| l.functions.keys().copied().collect()).unwrap_or_default()
    }

    fn decode(&mut self, hash: &ScriptHash, bytes: &[u8], call: &CallContext) -> Result<Json, ScriptError> {
        let function = self.function(hash, Entry::Decode)?;
        let max = self.limits.output;
        let bytes = bytes.to_vec();
        let call = call.clone();
        self.guarded(move |runtime| {
            invoke(
                runtime,
                &function,
                |scope| {
                    let length = bytes.len();
                    let store = v8::ArrayBuffer::new_backing_store_from_vec(bytes).make_shared();
                    let buffer = v8::ArrayBuffer::with_backing_store(scope, &store);
                    let input = v8::Uint8Array::new(scope, buffer, 0, length)?;
                    Some(vec![input.into(), context_object(scope, &call)?.into()])
                },
                |scope, value| to_json(scope, value, 0, &mut (max as isize)),
            )
        })
    }

    fn encode(
        &mut self,
        hash: &ScriptHash,
        message: &Json,
        call: &CallContext,
    ) -> Result<Vec<u8>, ScriptError> {
        let max = self.limits.output;
        let call = call.clone();
        if self.entries(hash).contains(&Entry::Encode) {
            let function = self.function(hash, Entry::Encode)?;
            let message = message.clone();
            self.guarded(move |runtime| {
                invoke(
                    runtime,
                    &function,
                    |scope| Some(vec![from_json(scope, &message)?, context_object(scope, &call)?.into()]),
                    |scope, value| to_bytes(scope, value, max),
                )
            })
        } else {
            let function = self.function(hash, Entry::EncodeInp)?;
            let text = message.to_string();
            self.guarded(move |runtime| {
                invoke(
                    runtime,
                    &function,
                    |scope| {
                        Some(vec![
                            v8::String::new(scope, &text)?.into(),
                            v8::String::new(scope, &call.topic)?.into(),
                        ])
                    },
                    |scope, value| to_bytes(scope, value, max),
                )
            })
        }
    }

    fn decode_0x(
        &mut self,
        hash: &ScriptHash,
        bytes: &[u8],
        call: &CallContext,
    ) -> Result<Json, ScriptError> {
        let function = self.function(hash, Entry::EncodeInp)?;
        let max = self.limits.output;
        let text = String::from_utf8_lossy(bytes).into_owned();
        let topic = call.topic.clone();
        self.guarded(move |runtime| {
            invoke(
                runtime,
                &function,
                |scope| {
                    Some(vec![v8::String::new(scope, &text)?.into(), v8::String::new(scope, &topic)?.into()])
                },
                |scope, value| {
                    if value.is_string() {
                        serde_json::from_str(&value.to_rust_string_lossy(scope))
                            .map_err(|e| format!("not JSON: {e}"))
                    } else {
                        to_json(scope, value, 0, &mut (max as isize))
                    }
                },
            )
        })
    }
}

/// Calls `function` with the arguments `arguments` builds and converts the result.
fn invoke<T>(
    runtime: &mut JsRuntime,
    function: &v8::Global<v8::Function>,
    arguments: impl for<'s, 'i> FnOnce(&mut v8::PinScope<'s, 'i>) -> Option<Vec<v8::Local<'s, v8::Value>>>,
    convert: impl for<'s, 'i> FnOnce(&mut v8::PinScope<'s, 'i>, v8::Local<'s, v8::Value>) -> Result<T, String>,
) -> Result<T, Failure> {
    deno_core::scope!(scope, runtime);
    v8::tc_scope!(let tc, scope);
    let function = v8::Local::new(tc, function);
    let Some(arguments) = arguments(tc) else {
        return Err(Failure::Script(ScriptError::Engine("arguments could not be built".into())));
    };
    let receiver: v8::Local<v8::Value> = v8::undefined(tc).into();
    let returned = function.call(tc, receiver, &arguments);
    let converted = returned.map(|value| convert(tc, value));
    if tc.has_terminated() || tc.is_execution_terminating() {
        return Err(Failure::Terminated);
    }
    if tc.has_caught() {
        let (message, line) = match tc.message() {
            Some(message) => (
                message.get(tc).to_rust_string_lossy(tc).trim_start_matches("Uncaught ").to_owned(),
                message.get_line_number(tc).map(|l| l as u32),
            ),
            None => ("uncaught exception".to_owned(), None),
        };
        return Err(Failure::Script(ScriptError::Thrown { message, line }));
    }
    match converted {
        Some(Ok(value)) => Ok(value),
        Some(Err(problem)) => Err(Failure::Script(ScriptError::Output(problem))),
        None => Err(Failure::Script(ScriptError::Engine("call returned nothing".into()))),
    }
}

fn context_object<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    call: &CallContext,
) -> Option<v8::Local<'s, v8::Object>> {
    let object = v8::Object::new(scope);
    for (key, value) in [
        ("device_id", &call.device_id),
        ("device_number", &call.device_number),
        ("kind", &call.kind),
        ("topic", &call.topic),
    ] {
        let key = v8::String::new(scope, key)?;
        let value = v8::String::new(scope, value)?;
        object.set(scope, key.into(), value.into());
    }
    Some(object)
}

fn from_json<'s>(scope: &mut v8::PinScope<'s, '_>, value: &Json) -> Option<v8::Local<'s, v8::Value>> {
    Some(match value {
        Json::Null => v8::null(scope).into(),
        Json::Bool(b) => v8::Boolean::new(scope, *b).into(),
        Json::Number(n) => v8::Number::new(scope, n.as_f64().unwrap_or(f64::NAN)).into(),
        Json::String(s) => v8::String::new(scope, s)?.into(),
        Json::Array(items) => {
            let array = v8::Array::new(scope, items.len() as i32);
            for (i, item) in items.iter().enumerate() {
                let item = from_json(scope, item)?;
                array.set_index(scope, i as u32, item);
            }
            array.into()
        }
        Json::Object(map) => {
            let object = v8::Object::new(scope);
            for (key, item) in map {
                let key = v8::String::new(scope, key)?;
                let item = from_json(scope, item)?;
                object.set(scope, key.into(), item);
            }
            object.into()
        }
    })
}

fn number(n: f64) -> Json {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Json::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
    }
}

fn to_json<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    value: v8::Local<'s, v8::Value>,
    depth: usize,
    budget: &mut isize,
) -> Result<Json, String> {
    *budget -= 8;
    if *budget < 0 {
        return Err("result exceeds the output size limit".into());
    }
    if depth > MAX_DEPTH {
        return Err("result nested too deeply (a cycle?)".into());
    }
    if value.is_null_or_undefined() || value.is_function() || value.is_symbol() {
        return Ok(Json::Null);
    }
    if value.is_boolean() {
        return Ok(Json::Bool(value.is_true()));
    }
    if value.is_number() {
        return Ok(number(value.number_value(scope).unwrap_or(f64::NAN)));
    }
    if value.is_string() {
        let text = value.to_rust_string_lossy(scope);
        *budget -= text.len() as isize;
        if *budget < 0 {
            return Err("result exceeds the output size limit".into());
        }
        return Ok(Json::String(text));
    }
    if value.is_uint8_array() {
        let view = v8::Local::<v8::ArrayBufferView>::try_from(value).map_err(|e| e.to_string())?;
        // Each byte is a JSON value, charged like one (8), before any is made.
        *budget -= view.byte_length().saturating_mul(8).min(isize::MAX as usize) as isize;
        if *budget < 0 {
            return Err("result exceeds the output size limit".into());
        }
        let mut bytes = vec![0u8; view.byte_length()];
        view.copy_contents(&mut bytes);
        return Ok(Json::Array(bytes.into_iter().map(Json::from).collect()));
    }
    if value.is_array() {
        let array = v8::Local::<v8::Array>::try_from(value).map_err(|e| e.to_string())?;
        // The script chose the length (`a.length = 2**31 - 1`): reserve no more than the
        // budget can hold.
        let room = usize::try_from(*budget).unwrap_or(0) / 8;
        let mut out = Vec::with_capacity((array.length() as usize).min(room));
        for i in 0..array.length() {
            let item = array.get_index(scope, i).ok_or("exception reading an array element")?;
            out.push(to_json(scope, item, depth + 1, budget)?);
        }
        return Ok(Json::Array(out));
    }
    if value.is_object() {
        let object = v8::Local::<v8::Object>::try_from(value).map_err(|e| e.to_string())?;
        let arguments = v8::GetPropertyNamesArgsBuilder::new()
            .mode(v8::KeyCollectionMode::OwnOnly)
            .property_filter(v8::PropertyFilter::ONLY_ENUMERABLE | v8::PropertyFilter::SKIP_SYMBOLS)
            .key_conversion(v8::KeyConversionMode::ConvertToString)
            .build();
        let names = object.get_own_property_names(scope, arguments).ok_or("exception listing properties")?;
        let mut map = serde_json::Map::new();
        for i in 0..names.length() {
            let key = names.get_index(scope, i).ok_or("exception reading a key")?;
            let item = object.get(scope, key).ok_or("exception reading a property")?;
            if item.is_undefined() || item.is_function() || item.is_symbol() {
                continue;
            }
            map.insert(key.to_rust_string_lossy(scope), to_json(scope, item, depth + 1, budget)?);
        }
        return Ok(Json::Object(map));
    }
    Ok(Json::Null)
}

fn to_bytes<'s>(
    scope: &mut v8::PinScope<'s, '_>,
    value: v8::Local<'s, v8::Value>,
    max: usize,
) -> Result<Vec<u8>, String> {
    let bytes = if value.is_array_buffer_view() {
        let view = v8::Local::<v8::ArrayBufferView>::try_from(value).map_err(|e| e.to_string())?;
        if view.byte_length() > max {
            return Err("result exceeds the output size limit".into());
        }
        let mut bytes = vec![0u8; view.byte_length()];
        view.copy_contents(&mut bytes);
        bytes
    } else if value.is_array() {
        let array = v8::Local::<v8::Array>::try_from(value).map_err(|e| e.to_string())?;
        if array.length() as usize > max {
            return Err("result exceeds the output size limit".into());
        }
        let mut bytes = Vec::with_capacity(array.length() as usize);
        for i in 0..array.length() {
            let item = array.get_index(scope, i).ok_or("exception reading an element")?;
            match item.number_value(scope) {
                Some(n) if item.is_number() && n.fract() == 0.0 && (0.0..=255.0).contains(&n) => {
                    bytes.push(n as u8)
                }
                _ => return Err(format!("element {i} is not a byte")),
            }
        }
        bytes
    } else if value.is_string() {
        value.to_rust_string_lossy(scope).into_bytes()
    } else {
        return Err("encode must return a Uint8Array, an array of bytes or a string".into());
    };
    if bytes.len() > max {
        return Err("result exceeds the output size limit".into());
    }
    Ok(bytes)
}

/// Terminates a call that runs past its deadline, from its own thread.
struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct WatchState {
    generation: u64,
    deadline: Option<Instant>,
    fired: u64,
    shutdown: bool,
}

impl Watchdog {
    fn new(isolate: v8::IsolateHandle) -> Self {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("v8-watchdog".into())
            .spawn(move || {
                let (lock, wake) = &*watched;
                let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !state.shutdown {
                    match state.deadline {
                        None => state = wake.wait(state).unwrap_or_else(|e| e.into_inner()),
                        Some(deadline) if Instant::now() >= deadline => {
                            isolate.terminate_execution();
                            state.fired = state.generation;
                            state.deadline = None;
                        }
                        Some(deadline) => {
                            let wait = deadline - Instant::now();
                            state = wake.wait_timeout(state, wait).unwrap_or_else(|e| e.into_inner()).0;
                        }
                    }
                }
            })
            .expect("a watchdog thread");
        Watchdog { shared, thread: Some(thread) }
    }

    fn arm(&self, limit: std::time::Duration) {
        let (lock, wake) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        state.deadline = Some(Instant::now() + limit);
        wake.notify_one();
    }

    /// Whether the deadline fired during this arm.
    fn disarm(&self) -> bool {
        let (lock, _) = &*self.shared;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        state.deadline = None;
        state.fired == state.generation
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.shared;
            lock.lock().unwrap_or_else(|e| e.into_inner()).shutdown = true;
            wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
