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
