//! The QuickJS engine (rquickjs), the default.
//!
//! One runtime and context per script (by content hash), so that each script has its
//! own heap limit and globals; runtimes are reused across calls (a fresh one costs
//! ~60 µs and ~100 KB). The context has no I/O at all (QuickJS without its libc: no
//! std, os, timers or modules), and `queueMicrotask` is removed so that nothing runs
//! between calls. Results are turned into JSON by walking the JS value, without a
//! `JSON.stringify` round trip.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rquickjs::context::{EvalOptions, intrinsic};
use rquickjs::{
    CaughtError, Context, Ctx, Error, Function, Object, Persistent, Runtime, Type, TypedArray, Value,
};
use serde_json::Value as Json;

use super::cache::ScriptCache;
use super::{CallContext, Entry, FREEZE_INTRINSICS, Limits, ScriptEngine, ScriptError, ScriptHash};

/// Built-ins a converter needs; no Promise (nothing may outlive a call).
type Intrinsics = (
    intrinsic::Eval,
    intrinsic::Json,
    intrinsic::TypedArrays,
    intrinsic::RegExp,
    intrinsic::MapSet,
    intrinsic::Date,
);

/// Deepest result accepted (a cycle would be infinite).
const MAX_DEPTH: usize = 64;

struct Script {
    // Dropped before the runtime: a Persistent must not outlive it.
    functions: HashMap<Entry, Persistent<Function<'static>>>,
    /// Frozen `ctx` arguments by call context: building one costs as much as a small
    /// script, and a device's is the same for every message.
    call_contexts: RefCell<HashMap<CallContext, Persistent<Object<'static>>>>,
    context: Context,
    runtime: Runtime,
}

/// Call contexts kept per script; past it the cache starts over.
const CALL_CONTEXTS: usize = 4096;

impl Script {
    /// The frozen `ctx` object of `call`, made once.
    fn call_context<'js>(&self, ctx: &Ctx<'js>, call: &CallContext) -> rquickjs::Result<Object<'js>> {
        if let Some(object) = self.call_contexts.borrow().get(call) {
            return object.clone().restore(ctx);
        }
        let object = Object::new(ctx.clone())?;
        object.set("device_id", call.device_id.as_str())?;
        object.set("device_number", call.device_number.as_str())?;
        object.set("kind", call.kind.as_str())?;
        object.set("topic", call.topic.as_str())?;
        let freeze: Function = ctx.globals().get::<_, Object>("Object")?.get("freeze")?;
        freeze.call::<_, ()>((object.clone(),))?;
        let mut cache = self.call_contexts.borrow_mut();
        if cache.len() >= CALL_CONTEXTS {
            cache.clear();
        }
        cache.insert(call.clone(), Persistent::save(ctx, object.clone()));
        Ok(object)
    }
}

/// QuickJS scripts by content hash.
pub struct QuickJs {
    limits: Limits,
    scripts: ScriptCache<Script>,
    /// The running call's deadline, in ns since `epoch` (0: none), read by the
    /// interrupt handler of every runtime.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
}

impl QuickJs {
    pub fn new(limits: Limits) -> Self {
        QuickJs {
            limits,
            scripts: ScriptCache::new(limits.cache_bytes),
            deadline: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        }
    }

    fn arm(&self) {
        let at = (self.epoch.elapsed() + self.limits.cpu_time).as_nanos() as u64;
        self.deadline.store(at.max(1), Ordering::Relaxed);
    }

    fn disarm(&self) {
        self.deadline.store(0, Ordering::Relaxed);
    }

    fn build(&self, source: &str, name: &str) -> Result<Script, ScriptError> {
        let runtime = Runtime::new().map_err(|e| ScriptError::Engine(e.to_string()))?;
        runtime.set_max_stack_size(256 * 1024);
        let (deadline, epoch) = (self.deadline.clone(), self.epoch);
        runtime.set_interrupt_handler(Some(Box::new(move || {
            let at = deadline.load(Ordering::Relaxed);
            at != 0 && epoch.elapsed().as_nanos() as u64 >= at
        })));
        let context =
            Context::custom::<Intrinsics>(&runtime).map_err(|e| ScriptError::Engine(e.to_string()))?;
        // After the context exists: building one under a tight limit can fail.
        runtime.set_memory_limit(self.limits.heap);
        self.arm();
        let functions = context.with(|ctx| -> Result<_, ScriptError> {
            ctx.globals().remove("queueMicrotask").map_err(|e| classify(&ctx, e))?;
            ctx.eval::<(), _>(FREEZE_INTRINSICS).map_err(|e| classify(&ctx, e))?;
            let mut options = EvalOptions::default();
            options.strict = false;
            options.filename = Some(name.to_owned());
            ctx.eval_with_options::<(), _>(source, options).map_err(|e| classify(&ctx, e))?;
            let mut functions = HashMap::new();
            for entry in [Entry::Decode, Entry::Encode, Entry::EncodeInp] {
                // Top-level `const f = …` is no property of globalThis; an eval sees it.
                let name = entry.name();
                let found: Value = ctx
                    .eval(format!("typeof {name} === 'function' ? {name} : undefined"))
                    .map_err(|e| classify(&ctx, e))?;
                if let Some(function) = found.into_function() {
                    functions.insert(entry, Persistent::save(&ctx, function));
                }
            }
            Ok(functions)
        });
        self.disarm();
        Ok(Script { functions: functions?, call_contexts: RefCell::default(), context, runtime })
    }

    fn call<T>(
        &mut self,
        hash: &ScriptHash,
        entry: Entry,
        call: impl for<'js> FnOnce(&Ctx<'js>, Function<'js>, &Script) -> rquickjs::Result<T>,
    ) -> Result<T, ScriptError> {
        if !self.scripts.touch(hash) {
            return Err(ScriptError::NotLoaded);
        }
        let script = self.scripts.get(hash).ok_or(ScriptError::NotLoaded)?;
        let function = script.functions.get(&entry).cloned().ok_or(ScriptError::Missing(entry.name()))?;
        self.arm();
        let result = script.context.with(|ctx| {
            let run = || call(&ctx, function.restore(&ctx)?, script);
            run().map_err(|e| classify(&ctx, e))
        });
        self.disarm();
        if matches!(result, Err(ScriptError::OutOfMemory)) {
            // Its heap may be full of what it still references: start it afresh.
            self.scripts.remove(hash);
        }
        result
    }
}

impl ScriptEngine for QuickJs {
    fn prepare(&mut self, hash: &ScriptHash, source: &str, name: &str) -> Result<(), ScriptError> {
        if self.scripts.contains(hash) {
            return Ok(());
        }
        let script = self.build(source, name)?;
        // Each script has a runtime of its own: what it allocated is what it weighs.
        let weight = usize::try_from(script.runtime.memory_usage().malloc_size).unwrap_or(0);
        self.scripts.insert(hash.clone(), script, weight);
        Ok(())
    }

    fn entries(&self, hash: &ScriptHash) -> Vec<Entry> {
        self.scripts.get(hash).map(|s| s.functions.keys().copied().collect()).unwrap_or_default()
    }

    fn decode(&mut self, hash: &ScriptHash, bytes: &[u8], call: &CallContext) -> Result<Json, ScriptError> {
        let max = self.limits.output;
        self.call(hash, Entry::Decode, |ctx, function, script| {
            let input = TypedArray::<u8>::new_copy(ctx.clone(), bytes)?;
            let value: Value = function.call((input, script.call_context(ctx, call)?))?;
            js_to_json(&value, 0, &mut Budget(max))
        })
    }

    fn encode(
        &mut self,
        hash: &ScriptHash,
        message: &Json,
        call: &CallContext,
    ) -> Result<Vec<u8>, ScriptError> {
        let max = self.limits.output;
        let entries = self.entries(hash);
        if entries.contains(&Entry::Encode) {
            self.call(hash, Entry::Encode, |ctx, function, script| {
                let message = json_to_js(ctx, message)?;
                let value: Value = function.call((message, script.call_context(ctx, call)?))?;
                js_to_bytes(&value, max)
            })
        } else {
            // ThingsPanel 0.x: encodeInp(msg, topic) takes and returns strings.
            let text = message.to_string();
            self.call(hash, Entry::EncodeInp, |_, function, _| {
                let value: Value = function.call((text, call.topic.clone()))?;
                js_to_bytes(&value, max)
            })
        }
    }

    fn decode_0x(
        &mut self,
        hash: &ScriptHash,
        bytes: &[u8],
        call: &CallContext,
    ) -> Result<Json, ScriptError> {
        let max = self.limits.output;
        let text = String::from_utf8_lossy(bytes).into_owned();
        self.call(hash, Entry::EncodeInp, |_, function, _| {
            let value: Value = function.call((text, call.topic.clone()))?;
            // 0.x converters return a JSON string; an object is taken as it is.
            match value.as_string() {
                Some(s) => {
                    let s = s.to_string()?;
                    serde_json::from_str(&s)
                        .map_err(|e| Error::new_from_js_message("string", "JSON", format!("not JSON: {e}")))
                }
                None => js_to_json(&value, 0, &mut Budget(max)),
            }
        })
    }
}

fn classify(ctx: &Ctx<'_>, error: Error) -> ScriptError {
    match CaughtError::from_error(ctx, error) {
        CaughtError::Exception(exception) => {
            let message = exception.message().unwrap_or_default();
            if exception.as_value().is_uncatchable_error() || message == "interrupted" {
                return ScriptError::Timeout;
            }
            if message == "out of memory" {
                return ScriptError::OutOfMemory;
            }
            let name: Option<String> = exception.get("name").ok();
            let message = match name {
                Some(name) if !name.is_empty() => format!("{name}: {message}"),
                _ => message,
            };
            let line = exception.stack().as_deref().and_then(first_line_number);
            ScriptError::Thrown { message, line }
        }
        CaughtError::Value(value) => {
            // QuickJS throws null when it cannot even allocate the error object.
            if value.is_null() || value.type_of() == Type::Uninitialized {
                return ScriptError::OutOfMemory;
            }
            let shown = value
                .as_string()
                .and_then(|s| s.to_string().ok())
                .unwrap_or_else(|| format!("a {}", value.type_name()));
            ScriptError::Thrown { message: format!("uncaught {shown}"), line: None }
        }
        CaughtError::Error(Error::Allocation) => ScriptError::OutOfMemory,
        CaughtError::Error(error) => ScriptError::Output(error.to_string()),
    }
}

/// The line of the first stack frame: `    at decode (uplink.js:3:11)`.
fn first_line_number(stack: &str) -> Option<u32> {
    stack.lines().find_map(|line| {
        let line = line.trim_end().trim_end_matches(')');
        let mut parts = line.rsplitn(3, ':');
        parts.next()?.parse::<u32>().ok()?;
        let number = parts.next()?.parse::<u32>().ok()?;
        parts.next()?;
        Some(number)
    })
}

/// Bytes of output left (a script may not return more than the output limit). Every
/// value costs [`VALUE_COST`], strings and keys their length too; charged before the
/// value is built, so that nothing the script controls sizes an allocation first.
struct Budget(usize);

/// What one JSON value is charged, whatever its kind.
const VALUE_COST: usize = 8;

impl Budget {
    fn spend(&mut self, bytes: usize) -> rquickjs::Result<()> {
        self.0 = self.0.checked_sub(bytes).ok_or_else(|| {
            Error::new_from_js_message("value", "JSON", "result exceeds the output size limit")
        })?;
        Ok(())
    }

    /// Room for `len` more values at most: the capacity to reserve for an array whose
    /// length the script chose (`a.length = 2**31 - 1` must not reserve 64 GiB).
    fn capacity(&self, len: usize) -> usize {
        len.min(self.0 / VALUE_COST)
    }
}

fn number(n: f64) -> Json {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Json::from(n as i64)
    } else {
        // NaN and infinities become null, as JSON.stringify does.
        serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
    }
}

/// Walks a JS value into JSON natively; undefined, functions and symbols are dropped
/// from objects (null in arrays), as `JSON.stringify` does.
fn js_to_json(value: &Value<'_>, depth: usize, budget: &mut Budget) -> rquickjs::Result<Json> {
    if depth > MAX_DEPTH {
        return Err(Error::new_from_js_message("value", "JSON", "result nested too deeply (a cycle?)"));
    }
    budget.spend(VALUE_COST)?;
    Ok(match value.type_of() {
        Type::Null | Type::Undefined | Type::Uninitialized => Json::Null,
        Type::Bool => Json::Bool(value.as_bool().unwrap_or(false)),
        Type::Int => Json::from(value.as_int().unwrap_or(0)),
        Type::Float => number(value.as_float().unwrap_or(f64::NAN)),
        Type::String => {
            let text = value.as_string().map(|s| s.to_string()).transpose()?.unwrap_or_default();
            budget.spend(text.len())?;
            Json::String(text)
        }
        Type::BigInt => Json::from(value.as_big_int().cloned().map(|b| b.to_i64()).transpose()?.unwrap_or(0)),
        Type::Array => {
            let array = value.as_array().expect("type_of says array");
            let mut out = Vec::with_capacity(budget.capacity(array.len()));
            for i in 0..array.len() {
                let item: Value = array.get(i)?;
                out.push(js_to_json(&item, depth + 1, budget)?);
            }
            Json::Array(out)
        }
        Type::Object | Type::Exception => {
            let object = value.as_object().expect("type_of says object");
            if let Some(bytes) = object.as_typed_array::<u8>() {
                // Each byte is a JSON value, charged like one, before any is made.
                budget.spend(bytes.len().saturating_mul(VALUE_COST))?;
                return Ok(Json::Array(typed_bytes(bytes)?.into_iter().map(Json::from).collect()));
            }
            // Read as a plain value: asking for a Function would build an error for
            // every object without toJSON.
            let to_json: Value = object.get("toJSON")?;
            if let Some(to_json) = to_json.as_function() {
                let converted: Value = to_json.call((rquickjs::function::This(object.clone()),))?;
                return js_to_json(&converted, depth + 1, budget);
            }
            let mut map = serde_json::Map::new();
            for property in object.props::<String, Value>() {
                let (key, item) = property?;
                if matches!(
                    item.type_of(),
                    Type::Undefined | Type::Function | Type::Constructor | Type::Symbol
                ) {
                    continue;
                }
                budget.spend(key.len())?;
                map.insert(key, js_to_json(&item, depth + 1, budget)?);
            }
            Json::Object(map)
        }
        _ => Json::Null,
    })
}

/// The bytes of a Uint8Array, element by element (no unsafe view of its buffer).
fn typed_bytes(array: &TypedArray<'_, u8>) -> rquickjs::Result<Vec<u8>> {
    (0..array.len()).map(|i| array.as_object().get::<_, u8>(i as u32)).collect()
}

/// What `encode` returned, as bytes: a Uint8Array, an array of numbers 0–255, or a
/// string (its UTF-8).
fn js_to_bytes(value: &Value<'_>, max: usize) -> rquickjs::Result<Vec<u8>> {
    let too_long = || Error::new_from_js_message("value", "bytes", "result exceeds the output size limit");
    let bytes = if let Some(text) = value.as_string() {
        text.to_string()?.into_bytes()
    } else if let Some(array) = value.as_array() {
        if array.len() > max {
            return Err(too_long());
        }
        let mut out = Vec::with_capacity(array.len());
        for i in 0..array.len() {
            let item: Value = array.get(i)?;
            match item.as_number() {
                Some(n) if n.fract() == 0.0 && (0.0..=255.0).contains(&n) => out.push(n as u8),
                _ => {
                    return Err(Error::new_from_js_message(
                        "value",
                        "bytes",
                        format!("element {i} is not a byte"),
                    ));
                }
            }
        }
        out
    } else if let Some(typed) = value.as_object().and_then(|o| o.as_typed_array::<u8>()) {
        if typed.len() > max {
            return Err(too_long());
        }
        typed_bytes(typed)?
    } else {
        return Err(Error::new_from_js_message(
            value.type_name(),
            "bytes",
            "encode must return a Uint8Array, an array of bytes or a string",
        ));
    };
    if bytes.len() > max {
        return Err(too_long());
    }
    Ok(bytes)
}

/// A JSON value as a JS value (for `encode`'s message).
fn json_to_js<'js>(ctx: &Ctx<'js>, value: &Json) -> rquickjs::Result<Value<'js>> {
    Ok(match value {
        Json::Null => Value::new_null(ctx.clone()),
        Json::Bool(b) => Value::new_bool(ctx.clone(), *b),
        Json::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
            Some(i) => Value::new_int(ctx.clone(), i),
            None => Value::new_float(ctx.clone(), n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => rquickjs::String::from_str(ctx.clone(), s)?.into_value(),
        Json::Array(items) => {
            let array = rquickjs::Array::new(ctx.clone())?;
            for (i, item) in items.iter().enumerate() {
                array.set(i, json_to_js(ctx, item)?)?;
            }
            array.into_value()
        }
        Json::Object(map) => {
            let object = Object::new(ctx.clone())?;
            for (key, item) in map {
                object.set(key.as_str(), json_to_js(ctx, item)?)?;
            }
            object.into_value()
        }
    })
}
