//! Logs and traces of a binary: the log subscriber, and OTLP export of its spans when
//! the standard OpenTelemetry variables ask for it.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set. Then the W3C propagator is installed, `tracing` spans of our crates become
//! OpenTelemetry spans (tracing-opentelemetry), and JSON log lines written inside one
//! carry its `trace_id` and `span_id`. Unset, there is no exporter, no propagator and no
//! OpenTelemetry layer: the per-message spans (at DEBUG) are not even created at the
//! default log level.
//!
//! What the OpenTelemetry crates read by themselves, and so is not read here: the
//! endpoint, timeout, headers and compression (`OTEL_EXPORTER_OTLP_*`, opentelemetry-otlp),
//! the sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), the batch processor
//! (`OTEL_BSP_*`) and the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`)
//! (opentelemetry_sdk). Read here: whether to export at all, the protocol (gRPC unless
//! told otherwise: opentelemetry-otlp's own default with both transports built in is
//! HTTP), and the service name when none is given (the binary's, not `unknown_service`).

use std::time::Duration;

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, FilterExt as _, filter_fn};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::LogFormat;

/// Spans that live as long as a device connection: in logs only, never OpenTelemetry
/// spans, so that an idle connection holds no OpenTelemetry state (and a trace is one
/// message, not a connection's hours).
const LOG_ONLY_SPANS: &[&str] = &["session"];

/// The crates whose spans are exported; other libraries' spans (h2, hyper, tonic) are not.
const TRACED_CRATES: &[&str] = &["edge_gateway", "script_worker", "tcp_connectivity", "tcpc_"];

/// How long the exit waits for the last spans to reach the collector: a pod's grace
/// period has a few seconds of margin, not more.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(3);

/// The OpenTelemetry configuration cannot work.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{variable}={value:?}: the OTLP protocols served are grpc and http/protobuf")]
    Protocol { variable: &'static str, value: String },
    #[error(
        "{variable}={value:?}: the collector is reached in plaintext (an agent or an in-cluster collector); https is not supported"
    )]
    Tls { variable: &'static str, value: String },
    #[error("OTLP span exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// Keeps the span exporter of the process; dropping it flushes the spans still queued
/// (within [`FLUSH_ON_EXIT`]) and stops it. Drop it at the end of `main`, on a
/// multi-threaded runtime: the gRPC exporter's connection is a task of that runtime.
#[must_use = "spans are exported while this lives, and flushed when it is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(FLUSH_ON_EXIT)
        {
            tracing::warn!(%error, "spans not all flushed to the collector at exit");
        }
    }
}

/// The first non-empty value of `names`, with the name it came from.
fn env_first(names: &[&'static str]) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|&name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| (name, v)))
}

/// The transport that `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`
/// names (the first set, as [`env_first`] gives it); gRPC when neither is set.
fn protocol(named: Option<(&'static str, String)>) -> Result<Protocol, TelemetryError> {
    match named {
        None => Ok(Protocol::Grpc),
        Some((_, value)) if value.trim().eq_ignore_ascii_case("grpc") => Ok(Protocol::Grpc),
        Some((_, value)) if value.trim().eq_ignore_ascii_case("http/protobuf") => Ok(Protocol::HttpBinary),
        Some((variable, value)) => Err(TelemetryError::Protocol { variable, value }),
    }
}

/// Whether the resource variables name the service (`OTEL_SERVICE_NAME`, or
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`); the SDK's fallback otherwise is
/// `unknown_service`.
fn service_named(service_name: Option<&str>, resource_attributes: Option<&str>) -> bool {
    service_name.is_some_and(|name| !name.trim().is_empty())
        || resource_attributes.is_some_and(|attributes| {
            attributes
                .split(',')
                .any(|pair| pair.split_once('=').is_some_and(|(key, _)| key.trim() == "service.name"))
        })
}

/// The span exporter the environment asks for, if any, and where it sends.
fn exporter() -> Result<Option<(opentelemetry_otlp::SpanExporter, String)>, TelemetryError> {
    let Some((variable, endpoint)) =
        env_first(&["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
    else {
        return Ok(None);
    };
    if endpoint.trim().to_ascii_lowercase().starts_with("https:") {
        return Err(TelemetryError::Tls { variable, value: endpoint });
    }
    let builder = opentelemetry_otlp::SpanExporter::builder();
    // The endpoint, timeout and headers come from the variables (read by the builders).
    let named = env_first(&["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]);
    let (exporter, protocol) = match protocol(named)? {
        Protocol::HttpBinary => {
            (builder.with_http().with_protocol(Protocol::HttpBinary).build(), "http/protobuf")
        }
        _ => (builder.with_tonic().build(), "grpc"),
    };
    let exporter = exporter.map_err(TelemetryError::Exporter)?;
    Ok(Some((exporter, format!("{endpoint} ({protocol})"))))
}

/// Installs the process's log subscriber (level from `RUST_LOG`, default info, to
/// stderr so that stdout stays free for data: the all-in-one's JSON lines) and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, span export to that collector; `service` names
/// the process unless `OTEL_SERVICE_NAME` does. Call it within a Tokio runtime.
///
/// # Errors
/// The OpenTelemetry variables ask for what cannot work (an unknown protocol, TLS).
pub fn init(service: &'static str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    init_with_writer(service, format, std::io::stderr)
}

fn init_with_writer<W>(
    service: &'static str,
    format: LogFormat,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let exporter = exporter()?;
    let collector = exporter.as_ref().map(|(_, collector)| collector.clone());
    let provider = exporter.map(|(exporter, _)| {
        let resource = if service_named(
            std::env::var("OTEL_SERVICE_NAME").ok().as_deref(),
            std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().as_deref(),
        ) {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name(service).build()
        };
        // The sampler and the batch processor's settings come from their variables.
        SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()
    });
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    subscriber(provider.as_ref().map(|provider| provider.tracer(service)), format, writer).init();
    if let Some(collector) = collector {
        tracing::info!(%collector, "exporting spans");
    }
    Ok(Telemetry { provider })
}

/// Logs through `writer` in `format`, and spans to `tracer` when there is one.
fn subscriber<W>(
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
    format: LogFormat,
    writer: W,
) -> impl Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let spans = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Level and target are in the span's name and scope already.
            .with_level(false)
            .with_target(false)
            // The exported spans, and the events that the log level lets through (they
            // become events of the span they are written in).
            .with_filter(exported_spans().or(log_filter().and(filter_fn(|metadata| metadata.is_event()))))
    });
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(WithTraceIds(format::format().json()))
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    tracing_subscriber::registry().with(spans).with(logs.with_filter(log_filter()))
}

/// What `RUST_LOG` lets through (default info).
fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The spans that become OpenTelemetry spans, whatever the log level: our crates'
/// (the per-message spans are at DEBUG, so that without export they are not created),
/// but not those of a connection's whole life.
fn exported_spans<S>() -> impl tracing_subscriber::layer::Filter<S> {
    filter_fn(|metadata| {
        metadata.is_span()
            && !LOG_ONLY_SPANS.contains(&metadata.name())
            && TRACED_CRATES.iter().any(|name| metadata.target().starts_with(name))
    })
}

/// JSON log lines with the `trace_id` and `span_id` of the OpenTelemetry span they are
/// written in, if any (tracing-opentelemetry makes an entered span's context current).
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let current = opentelemetry::Context::current();
        let span = current.span();
        let context = span.span_context();
        if !context.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // One JSON object per line: the ids go in first.
        match line.strip_prefix('{') {
            Some(rest) => {
                write!(
                    writer,
                    r#"{{"trace_id":"{}","span_id":"{}",{rest}"#,
                    context.trace_id(),
                    context.span_id()
                )
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use super::*;

    #[test]
    fn the_service_is_named_by_either_variable() {
        assert!(!service_named(None, None));
        assert!(!service_named(Some(" "), Some("deployment.environment=prod")));
        assert!(service_named(Some("edge-eu"), None));
        assert!(service_named(None, Some("deployment.environment=prod, service.name=edge-eu")));
    }

    #[test]
    fn grpc_unless_http_protobuf_is_asked_for() {
        let named = |value: &str| Some(("OTEL_EXPORTER_OTLP_PROTOCOL", value.to_owned()));
        assert_eq!(protocol(None).unwrap(), Protocol::Grpc);
        assert_eq!(protocol(named("grpc")).unwrap(), Protocol::Grpc);
        assert_eq!(protocol(named(" HTTP/Protobuf")).unwrap(), Protocol::HttpBinary);
        let refused = protocol(named("http/json")).unwrap_err().to_string();
        assert!(refused.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\""), "{refused}");
    }

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Tracing caches each callsite's interest across every subscriber alive in the
    /// process: tests that install subscribers run one at a time, or one test's
    /// subscriber decides whether another's spans are made.
    static ONE_SUBSCRIBER_AT_A_TIME: Mutex<()> = Mutex::new(());

    impl Lines {
        fn json(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
        }
    }

    #[test]
    fn json_lines_carry_the_ids_of_the_span_they_are_written_in() {
        let _alone = ONE_SUBSCRIBER_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let provider = SdkTracerProvider::builder().build();
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = subscriber(Some(provider.tracer("test")), LogFormat::Json, move || writer.clone());
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("outside any span");
            let span = tracing::debug_span!("publish");
            let _entered = span.enter();
            tracing::warn!("inside");
            let context = span.context();
            let ids = context.span().span_context().clone();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });
        let lines = lines.json();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].get("trace_id").is_none(), "{}", lines[0]);
        assert_eq!(lines[1]["trace_id"], trace_id.as_str());
        assert_eq!(lines[1]["span_id"], span_id.as_str());
        assert_eq!(lines[1]["fields"]["message"], "inside");
    }

    #[test]
    fn a_connection_span_is_never_an_opentelemetry_span_and_without_export_message_spans_are_not_made() {
        let _alone = ONE_SUBSCRIBER_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let provider = SdkTracerProvider::builder().build();
        let exporting = subscriber(Some(provider.tracer("test")), LogFormat::Pretty, std::io::sink);
        tracing::subscriber::with_default(exporting, || {
            let session = tracing::info_span!("session");
            assert!(!session.is_disabled(), "logged");
            assert!(!session.context().span().span_context().is_valid(), "not an OpenTelemetry span");
            let message = tracing::debug_span!("publish");
            assert!(message.context().span().span_context().is_valid());
        });
        let logging = subscriber(None, LogFormat::Pretty, std::io::sink);
        tracing::subscriber::with_default(logging, || {
            assert!(tracing::debug_span!("publish").is_disabled(), "no cost without export");
        });
    }
}
