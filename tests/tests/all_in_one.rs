//! The all-in-one binary with the shipped example devices: platform messages come out
//! as JSON lines on stdout.

use std::process::Stdio;

use edge_gateway::codec::{Frame, cmd};
use tcpc_tests::device::{RawDevice, TpDevice};
use tcpc_tests::servers::free_port;
use tcpc_tests::{DEADLINE, binary, http_get, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread")]
async fn example_devices_produce_the_expected_json_lines() {
    let port = |_| format!("127.0.0.1:{}", free_port());
    let [official, custom, grpc, metrics, http] = [0; 5].map(port);
    let devices = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/devices.toml");
    let mut child = tokio::process::Command::new(binary("aio-under-test"))
        .args(["--devices", devices, "--official-listen", &official, "--custom-listen", &custom])
        .args(["--grpc-listen", &grpc, "--metrics-listen", &metrics, "--http-listen", &http])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the all-in-one");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let metrics_addr = metrics.parse().unwrap();
    wait_until("the all-in-one to be ready", || async {
        http_get(metrics_addr, "/readyz").await.is_some_and(|r| r.contains("200 OK"))
    })
    .await;
    let mut next_line =
        async || tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap();

    let mut device = TpDevice::online(official.parse().unwrap(), "tp-demo-token").await;
    assert_eq!(
        next_line().await,
        r#"{"topic":"devices/status/6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10","payload":1}"#
    );
    device.send(Frame::data(cmd::ATTRIBUTES, &br#"{"temperature":36.5,"humidity":52}"#[..])).await;
    assert_eq!(
        next_line().await,
        r#"{"topic":"devices/telemetry","payload":{"device_id":"6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10","values":"eyJ0ZW1wZXJhdHVyZSI6MzYuNSwiaHVtaWRpdHkiOjUyfQ=="}}"#
    );
    drop(device);
    assert_eq!(
        next_line().await,
        r#"{"topic":"devices/status/6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10","payload":0}"#
    );

    // The custom example device: its script turns "365,520" into the same reading.
    let mut custom = RawDevice::connect(custom.parse().unwrap()).await;
    custom.send(b"custom-demo-token\n365,520\n").await;
    assert_eq!(
        next_line().await,
        r#"{"topic":"devices/status/9d3e1a2b-4c5d-4e6f-8a7b-1c2d3e4f5a6b","payload":1}"#
    );
    assert_eq!(
        next_line().await,
        r#"{"topic":"devices/telemetry","payload":{"device_id":"9d3e1a2b-4c5d-4e6f-8a7b-1c2d3e4f5a6b","values":"eyJ0ZW1wZXJhdHVyZSI6MzYuNSwiaHVtaWRpdHkiOjUyfQ=="}}"#
    );
    let metrics = http_get(metrics_addr, "/metrics").await.unwrap();
    assert!(metrics.contains("edge_connections{listener=\"custom\"} 1"), "{metrics}");
    assert!(metrics.contains("worker_published_total"), "one exposition for edge and worker: {metrics}");
    assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
}

/// An all-in-one replica on the shared services (NATS, Redis, the platform broker).
struct Replica {
    official: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    _child: tokio::process::Child,
}

impl Replica {
    async fn spawn(w: &tcpc_tests::world::World, pod: &str) -> Self {
        let port = |_| format!("127.0.0.1:{}", free_port());
        let [official, custom, grpc, metrics, http] = [0; 5].map(port);
        let child = tokio::process::Command::new(binary("aio-under-test"))
            .args(["--nats-url", &w.nats.url(), "--redis-url", &w.redis.url(), "--mqtt-url", &w.broker.url()])
            .args(["--platform-url", &w.platform.url(), "--pod-name", pod])
            .args(["--official-listen", &official, "--custom-listen", &custom, "--grpc-listen", &grpc])
            .args(["--metrics-listen", &metrics, "--http-listen", &http])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the all-in-one");
        let replica =
            Replica { official: official.parse().unwrap(), metrics: metrics.parse().unwrap(), _child: child };
        wait_until("the replica to be ready", || async {
            http_get(replica.metrics, "/readyz").await.is_some_and(|r| r.contains("200 OK"))
        })
        .await;
        replica
    }

    /// A counter or gauge's value from /metrics (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let text = http_get(self.metrics, "/metrics").await.unwrap_or_default();
        text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
    }

    async fn partitions(&self) -> f64 {
        self.metric("worker_partitions ").await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_deliver_each_downlink_once() {
    let w = tcpc_tests::world::World::start().await;
    w.device("tp-token", "dev-replicas", "R001", serde_json::Value::Null);
    let watcher = tcpc_tests::mqtt::Watcher::subscribe(&w.broker, &["devices/#"]).await;
    let replicas = [Replica::spawn(&w, "aio-a").await, Replica::spawn(&w, "aio-b").await];
    wait_until("the replicas to share the partitions between them", || async {
        replicas[0].partitions().await + replicas[1].partitions().await
            == f64::from(tcpc_proto::names::DEFAULT_PARTITIONS)
            && replicas[0].partitions().await > 0.0
            && replicas[1].partitions().await > 0.0
    })
    .await;
    let mut device = TpDevice::online(replicas[0].official, "tp-token").await;
    for id in ["c1", "c2", "c3"] {
        watcher.publish(&format!("plugin/TCP/devices/command/R001/{id}"), r#"{"method":"reboot"}"#).await;
    }
    // Each replica sees each command and either delivers it or leaves it to the owner.
    let replicas = &replicas;
    let total = |series: &'static str| async move {
        replicas[0].metric(series).await + replicas[1].metric(series).await
    };
    const DELIVERED: &str = "worker_downlinks_total{reason=\"delivered\"} ";
    const NOT_OWNER: &str = "worker_downlinks_total{reason=\"not_owner\"} ";
    wait_until("both replicas to have taken the three commands", || async {
        total(DELIVERED).await + total(NOT_OWNER).await >= 6.0
    })
    .await;
    assert_eq!(total(DELIVERED).await, 3.0, "each command delivered once");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let frame = device.next().await.expect("a command frame");
        let json: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
        ids.push(json["message_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, ["c1", "c2", "c3"], "in order");
}
