//! W3C trace-context propagation across pods: NATS headers (edge → worker), gRPC
//! metadata (worker → edge), MQTT v5 user properties (worker → platform).
//!
//! The carriers differ per transport, so these helpers take closures; they use the
//! globally installed propagator, which is a no-op until a binary installs the W3C one
//! (when OTLP export is configured), so calling them costs nothing otherwise.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, global};

/// The W3C header that carries trace id, span id and flags.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor state.
pub const TRACESTATE: &str = "tracestate";

/// Writes `cx`'s trace headers through `set(name, value)`.
pub fn inject(cx: &Context, set: impl FnMut(&str, String)) {
    struct Setter<F>(F);
    impl<F: FnMut(&str, String)> Injector for Setter<F> {
        fn set(&mut self, key: &str, value: String) {
            (self.0)(key, value);
        }
    }
    let mut setter = Setter(set);
    global::get_text_map_propagator(|propagator| propagator.inject_context(cx, &mut setter));
}

/// Reads a remote parent context through `get(name)`; an empty context when absent.
pub fn extract<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Context {
    // The marker ties the borrowed values' lifetime to the getter's, as Extractor wants.
    struct Getter<'a, F>(F, std::marker::PhantomData<&'a str>);
    impl<'a, F: Fn(&str) -> Option<&'a str>> Extractor for Getter<'a, F> {
        fn get(&self, key: &str) -> Option<&str> {
            (self.0)(key)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT, TRACESTATE]
        }
    }
    let getter = Getter(get, std::marker::PhantomData);
    global::get_text_map_propagator(|propagator| propagator.extract(&getter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use std::collections::HashMap;

    #[test]
    fn round_trips_through_a_header_map() {
        global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(span.clone());
        let mut headers = HashMap::new();
        inject(&cx, |k, v| {
            headers.insert(k.to_owned(), v);
        });
        assert_eq!(headers[TRACEPARENT], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let back = extract(|k| headers.get(k).map(String::as_str));
        assert_eq!(back.span().span_context().trace_id(), span.trace_id());
        assert_eq!(back.span().span_context().span_id(), span.span_id());
    }
}
