//! Traces end to end: the real edge-gateway and script-worker binaries export to an
//! OTLP collector in the test process, over gRPC and over HTTP/protobuf. One uplink is
//! one trace across both services, one downlink too, and the device's token is in no
//! span.

use serde_json::json;
use tcpc_tests::device::RawDevice;
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::otlp::{CLIENT, CONSUMER, Collector, INTERNAL, PRODUCER, Protocol, ReceivedSpan, SERVER};
use tcpc_tests::worker::{EdgeProcess, WorkerProcess};
use tcpc_tests::world::{World, wait_for_partitions};
use tcpc_tests::{metric_in, wait_until};

/// The device's AccessToken: it must never reach the collector.
const TOKEN: &str = "trace-token-5d1f0c9e7a";
const DEVICE: &str = "dev-traced";

/// Which span a test looks for: its service, its name (or the start of it), its kind.
struct Wanted {
    service: &'static str,
    name: &'static str,
    kind: i32,
}

const fn wanted(service: &'static str, name: &'static str, kind: i32) -> Wanted {
    Wanted { service, name, kind }
}

impl Wanted {
    fn matches(&self, span: &ReceivedSpan) -> bool {
        span.service == self.service && span.name.starts_with(self.name) && span.kind == self.kind
    }
}

/// Waits until the collector holds a trace with a span `root` finds and one of each of
/// `wanted`; that trace's spans, in the order of `wanted`.
async fn trace_with(
    collector: &Collector,
    root: impl Fn(&ReceivedSpan) -> bool,
    wanted: &[Wanted],
) -> Vec<ReceivedSpan> {
    let found = |spans: &[ReceivedSpan]| -> Option<Vec<ReceivedSpan>> {
        let root = spans.iter().find(|span| root(span))?;
        let trace: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.trace_id == root.trace_id).collect();
        wanted.iter().map(|w| trace.iter().find(|span| w.matches(span)).map(|span| (*span).clone())).collect()
    };
    wait_until("the trace's spans at the collector", || {
        std::future::ready(found(&collector.spans()).is_some())
    })
    .await;
    found(&collector.spans()).expect("found")
}

/// `child`'s parent is `parent`.
fn assert_parent(child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        (child.trace_id.as_str(), child.parent_span_id.as_str()),
        (parent.trace_id.as_str(), parent.span_id.as_str()),
        "{} ({}) is a child of {} ({})",
        child.name,
        child.service,
        parent.name,
        parent.service
    );
}

async fn an_uplink_and_a_downlink_are_one_trace_each(protocol: Protocol) {
    let w = World::start().await;
    w.device(
        TOKEN,
        DEVICE,
        "T001",
        json!({
            "protocol": "custom", "framing": "delimiter", "delimiter": "\\n",
            "uplink_script": "function decode(b) { return {n: b.length}; }",
            "downlink_script": "function encode(msg, ctx) { return [0xAB, msg.params.x]; }"
        }),
    );
    let collector = Collector::spawn(protocol).await;
    let env = collector.env();
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let worker =
        WorkerProcess::spawn_with_env(&w.nats, &w.redis, &w.broker, &w.platform, "worker-a", &[], &env).await;
    wait_for_partitions(&[&worker]).await;
    let edge = EdgeProcess::spawn_with_env(&w.nats, &w.redis, "edge-a", &[], &env).await;

    let mut device = RawDevice::connect(edge.custom).await;
    device.send(format!("{TOKEN}\n").as_bytes()).await;
    assert_eq!(&watcher.next_on(&format!("devices/status/{DEVICE}")).await.payload[..], b"1");
    device.send(b"hello\n").await;
    assert_eq!(watcher.next_on("devices/telemetry").await.values(DEVICE), json!({"n": 5}));

    // The uplink: the edge's receive (its root) and publish, the worker's consume,
    // script and MQTT publish.
    let uplink = trace_with(
        &collector,
        |span| span.service == "edge-gateway" && span.name == "receive",
        &[
            wanted("edge-gateway", "receive", SERVER),
            wanted("edge-gateway", "publish tcpc.up.", PRODUCER),
            wanted("script-worker", "process tcpc.up.", CONSUMER),
            wanted("script-worker", "script decode", INTERNAL),
            wanted("script-worker", "publish", PRODUCER),
        ],
    )
    .await;
    let [receive, publish, process, script, mqtt] = &uplink[..] else { unreachable!() };
    assert!(receive.parent_span_id.is_empty(), "the receive span is the trace's root");
    assert_parent(publish, receive);
    assert_parent(process, publish);
    assert_parent(script, process);
    assert_parent(mqtt, process);
    assert_eq!(receive.attribute("tcpc.device.id"), Some(DEVICE));
    assert_eq!(publish.attribute("messaging.system"), Some("nats"));
    assert_eq!(
        publish.attribute("messaging.destination.name"),
        process.attribute("messaging.destination.name")
    );
    assert_eq!(mqtt.attribute("messaging.system"), Some("mqtt"));
    assert_eq!(mqtt.attribute("messaging.destination.name"), Some("devices/telemetry"));

    // The downlink: the worker's MQTT receive (its root), encode and gRPC client span,
    // the edge's Deliver server span and its write to the socket.
    let topic = "plugin/TCP/devices/command/T001/c0ffee";
    watcher.publish(topic, r#"{"method":"set","params":{"x":7}}"#).await;
    let mut written = [0u8; 2];
    tokio::time::timeout(
        tcpc_tests::DEADLINE,
        tokio::io::AsyncReadExt::read_exact(&mut device.stream, &mut written),
    )
    .await
    .expect("the downlink within the deadline")
    .expect("read");
    assert_eq!(written, [0xAB, 7]);
    let downlink = trace_with(
        &collector,
        |span| span.name == "receive" && span.attribute("messaging.destination.name") == Some(topic),
        &[
            wanted("script-worker", "receive", CONSUMER),
            wanted("script-worker", "encode", INTERNAL),
            wanted("script-worker", "script encode", INTERNAL),
            wanted("script-worker", "tcpc.v1.EdgeGateway/Deliver", CLIENT),
            wanted("edge-gateway", "tcpc.v1.EdgeGateway/Deliver", SERVER),
            wanted("edge-gateway", "write", INTERNAL),
        ],
    )
    .await;
    let [receive, encode, script, client, server, write] = &downlink[..] else { unreachable!() };
    assert!(receive.parent_span_id.is_empty(), "the MQTT receive span is the trace's root");
    assert_parent(encode, receive);
    assert_parent(script, encode);
    assert_parent(client, receive);
    assert_parent(server, client);
    assert_parent(write, server);
    assert_eq!(client.attribute("rpc.system"), Some("grpc"));
    assert_eq!(server.attribute("rpc.grpc.status_code"), Some("0"));
    assert_eq!(server.attribute("tcpc.outcome"), Some("delivered"));

    // The metrics counted the same messages.
    let edge_metrics = tcpc_tests::http_get(edge.metrics, "/metrics").await.unwrap_or_default();
    let received = format!("{TOKEN}\nhello\n").len() as f64;
    assert_eq!(metric_in(&edge_metrics, r#"edge_received_bytes_total{listener="custom"}"#), received);
    assert_eq!(metric_in(&edge_metrics, r#"edge_frames_received_total{listener="custom"}"#), 1.0);
    assert_eq!(metric_in(&edge_metrics, r#"edge_frames_sent_total{listener="custom"}"#), 1.0);
    assert_eq!(metric_in(&edge_metrics, r#"edge_connections_accepted_total{listener="custom"}"#), 1.0);
    assert!(metric_in(&edge_metrics, "edge_publish_duration_seconds_count") >= 2.0, "online and the uplink");
    assert_eq!(worker.metric(r#"worker_script_duration_seconds_count{call="decode"}"#).await, 1.0);
    assert_eq!(worker.metric(r#"worker_script_duration_seconds_count{call="encode"}"#).await, 1.0);
    assert_eq!(worker.metric("worker_downlink_duration_seconds_count").await, 1.0);

    // The authentication crossed too, and nothing exported carries the token.
    let auth = trace_with(
        &collector,
        |span| span.service == "edge-gateway" && span.name == "send tcpc.auth",
        &[
            wanted("edge-gateway", "send tcpc.auth", CLIENT),
            wanted("script-worker", "process tcpc.auth", SERVER),
        ],
    )
    .await;
    assert_parent(&auth[1], &auth[0]);
    assert_eq!(auth[0].attribute("tcpc.auth.outcome"), Some("ok"));
    for span in collector.spans() {
        for (key, value) in &span.attributes {
            assert!(!value.contains(TOKEN), "the token in {key} of {} ({})", span.name, span.service);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_per_uplink_and_per_downlink_over_otlp_grpc() {
    an_uplink_and_a_downlink_are_one_trace_each(Protocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_per_uplink_and_per_downlink_over_otlp_http_protobuf() {
    an_uplink_and_a_downlink_are_one_trace_each(Protocol::HttpProtobuf).await;
}
