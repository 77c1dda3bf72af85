//! Uplink pipeline throughput: devices → edge → JetStream → worker → mosquitto, with
//! tracing off or exporting at given sampling ratios.
//!
//! `cargo build --release -p tcpc-tests --bins && target/release/uplink-load [devices] [messages each] [modes…]`
//! where a mode is `off` (no OTLP endpoint: the default, and the only mode when none is
//! given) or a sampling ratio (`1`, `0.01`: export to an OTLP/gRPC collector in this
//! process with `parentbased_traceidratio`). Each mode starts its own nats-server,
//! redis-server, mosquitto and fake ThingsPanel, one worker process and one edge process
//! (release), connects the TP devices, has each send its messages as fast as the edge
//! takes them, and reports the rate at which the MQTT watcher (the platform's side)
//! received them, and the spans the collector received.

use std::time::Instant;

use bytes::Bytes;
use edge_gateway::codec::{Frame, cmd};
use serde_json::Value;
use tcpc_tests::device::TpDevice;
use tcpc_tests::mqtt::{Mosquitto, Watcher};
use tcpc_tests::otlp::{Collector, Protocol};
use tcpc_tests::platform::{FakePlatform, direct_device};
use tcpc_tests::servers::{NatsServer, RedisServer};
use tcpc_tests::wait_until;
use tcpc_tests::worker::{EdgeProcess, WorkerProcess};

/// Every simulated device connects from 127.0.0.1: the edge's per-source limits lifted.
const ONE_ADDRESS_LOAD: &[&str] = &[
    "--max-connections-per-source",
    "0",
    "--auth-rate-per-source",
    "1000000",
    "--auth-burst-per-source",
    "1000000",
    "--ban-after",
    "1000000",
];

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut number = || args.next().map(|a| a.parse::<usize>().expect("numbers"));
    let devices = number().unwrap_or(100);
    let each = number().unwrap_or(200);
    let mut modes: Vec<Option<f64>> = std::env::args()
        .skip(3)
        .map(|mode| (mode != "off").then(|| mode.parse().expect("off or a ratio")))
        .collect();
    if modes.is_empty() {
        modes.push(None);
    }
    for ratio in modes {
        run(devices, each, ratio).await;
    }
}

/// One run with tracing off (`None`) or sampled at `ratio`.
async fn run(devices: usize, each: usize, ratio: Option<f64>) {
    let (nats, redis, broker) = tokio::join!(NatsServer::spawn(), RedisServer::spawn(), Mosquitto::spawn());
    let platform = FakePlatform::spawn().await;
    for i in 0..devices {
        let voucher = format!(r#"{{"access_token":"load-{i}"}}"#);
        platform.add(&voucher, direct_device(&format!("dev-{i}"), &format!("N{i}"), &voucher, Value::Null));
    }
    let collector = match ratio {
        Some(_) => Some(Collector::spawn(Protocol::Grpc).await),
        None => None,
    };
    let env: Vec<(&str, String)> = match (&collector, ratio) {
        (Some(collector), Some(ratio)) => collector
            .env()
            .into_iter()
            // The batch processor as in production: its default delay and queue.
            .filter(|(name, _)| !name.starts_with("OTEL_BSP_"))
            .chain([
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
                ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
            ])
            .collect(),
        _ => Vec::new(),
    };
    let mut watcher = Watcher::subscribe(&broker, &["devices/telemetry"]).await;
    let mut worker =
        WorkerProcess::spawn_with_env(&nats, &redis, &broker, &platform, "load-worker", &[], &env).await;
    wait_until("the worker to own its partitions", || async {
        worker.metric("worker_partitions").await >= 16.0
    })
    .await;
    let mut edge = EdgeProcess::spawn_with_env(&nats, &redis, "load-edge", ONE_ADDRESS_LOAD, &env).await;
    let mut connected = Vec::new();
    for i in 0..devices {
        connected.push(TpDevice::online(edge.official, &format!("load-{i}")).await);
    }
    let started = Instant::now();
    let mut senders = Vec::new();
    for mut device in connected {
        senders.push(tokio::spawn(async move {
            for n in 0..each {
                device.send(Frame::data(cmd::TELEMETRY, Bytes::from(format!(r#"{{"n":{n}}}"#)))).await;
            }
            // Held open until the run's end.
            device
        }));
    }
    let total = devices * each;
    for _ in 0..total {
        watcher.next().await;
    }
    let elapsed = started.elapsed();
    let tracing = match ratio {
        None => "tracing off".to_owned(),
        Some(ratio) => format!("tracing sampled at {}%", ratio * 100.0),
    };
    for sender in senders {
        drop(sender.await);
    }
    // Both flush their spans as they exit.
    edge.stop().await;
    worker.stop().await;
    let spans = collector.map(|collector| format!(", {} spans at the collector", collector.count()));
    println!(
        "{tracing}: {total} uplinks from {devices} devices reached the broker in {elapsed:.2?}: {:.0} msg/s{}",
        total as f64 / elapsed.as_secs_f64(),
        spans.unwrap_or_default()
    );
}
