//! W3C trace-context propagation across pods: NATS headers (edge → worker), gRPC
//! metadata (worker → edge), MQTT v5 user properties (worker → platform).
//!
//! The carriers differ per transport, so [`inject`] and [`extract`] take closures, and
//! the NATS and gRPC carriers have their own pair. They use the globally installed
//! propagator, which is a no-op until a binary installs the W3C one (when OTLP export is
//! configured), so calling them costs nothing otherwise.
//!
//! What is propagated is the OpenTelemetry span of the current `tracing` span (the
//! tracing-opentelemetry layer keeps it), not `opentelemetry::Context::current()`.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{Context, global};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

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

/// A span of a NATS operation, after the messaging conventions (named
/// `<operation> <subject>`): `nats_span!(name, kind, operation type, operation, subject,
/// more fields…)`. At DEBUG, so that it is created only when exported (or logged at
/// debug); its target is the calling module, as for any `tracing` span.
#[macro_export]
macro_rules! nats_span {
    ($name:literal, $kind:literal, $type:literal, $operation:literal, $subject:expr, $($fields:tt)*) => {
        ::tracing::debug_span!(
            $name,
            "otel.kind" = $kind,
            "otel.name" = %format_args!("{} {}", $operation, $subject),
            "messaging.system" = "nats",
            "messaging.operation.type" = $type,
            "messaging.operation.name" = $operation,
            "messaging.destination.name" = %$subject,
            $($fields)*
        )
    };
}

/// A span of an `EdgeGateway` call, after the RPC conventions (named
/// `tcpc.v1.EdgeGateway/<method>`): `edge_rpc_span!(kind, method, more fields…)`; its
/// `rpc.grpc.status_code` is recorded when the call ends.
#[macro_export]
macro_rules! edge_rpc_span {
    ($kind:literal, $method:expr, $($fields:tt)*) => {
        ::tracing::debug_span!(
            "rpc",
            "otel.kind" = $kind,
            "otel.name" = %format_args!("tcpc.v1.EdgeGateway/{}", $method),
            "rpc.system" = "grpc",
            "rpc.service" = "tcpc.v1.EdgeGateway",
            "rpc.method" = $method,
            "rpc.grpc.status_code" = ::tracing::field::Empty,
            $($fields)*
        )
    };
}

/// The OpenTelemetry context of the current `tracing` span (empty without export).
pub fn current() -> Context {
    tracing::Span::current().context()
}

/// Makes the remote context read through `get` the parent of `span`, when there is one
/// (and `span` is exported at all).
pub fn set_remote_parent<'a>(span: &tracing::Span, get: impl Fn(&str) -> Option<&'a str>) {
    if span.is_disabled() {
        return;
    }
    let parent = extract(get);
    if parent.span().span_context().is_valid() {
        // Fails only when the span is not an OpenTelemetry span (export off): nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The current span's trace headers, for a NATS message (None when there are none).
pub fn nats_headers() -> Option<async_nats::HeaderMap> {
    let mut headers = None;
    inject(&current(), |name, value| {
        headers.get_or_insert_with(async_nats::HeaderMap::new).insert(name, value.as_str());
    });
    headers
}

/// Makes the trace context of a NATS message's headers the parent of `span`.
pub fn follow_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(headers) = headers {
        set_remote_parent(span, |name| headers.get(name).map(|value| value.as_str()));
    }
}

/// Writes the current span's trace headers into gRPC metadata.
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    inject(&current(), |name, value| {
        let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes());
        if let (Ok(key), Ok(value)) = (key, value.parse()) {
            metadata.insert(key, value);
        }
    });
}

/// Makes the trace context of gRPC metadata the parent of `span`.
pub fn follow_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    set_remote_parent(span, |name| metadata.get(name).and_then(|value| value.to_str().ok()));
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
