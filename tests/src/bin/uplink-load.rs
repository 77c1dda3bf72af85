//! Uplink pipeline throughput: devices → edge → JetStream → worker → mosquitto.
//!
//! `cargo build --release -p tcpc-tests --bins && target/release/uplink-load [devices] [messages each]`
//! starts its own nats-server, redis-server, mosquitto and fake ThingsPanel, one worker
//! process (release) and an edge in this process, connects the TP devices, has each send
//! its messages as fast as the edge takes them, and reports the rate at which the MQTT
//! watcher (the platform's side) received them.

use std::time::Instant;

use bytes::Bytes;
use edge_gateway::codec::{Frame, cmd};
use serde_json::Value;
use tcpc_tests::device::TpDevice;
use tcpc_tests::edge::{TestEdge, one_address_load};
use tcpc_tests::mqtt::{Mosquitto, Watcher};
use tcpc_tests::platform::{FakePlatform, direct_device};
use tcpc_tests::servers::{NatsServer, RedisServer};
use tcpc_tests::wait_until;
use tcpc_tests::worker::WorkerProcess;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("numbers"));
    let devices = args.next().unwrap_or(100);
    let each = args.next().unwrap_or(200);
    let (nats, redis, broker) = tokio::join!(NatsServer::spawn(), RedisServer::spawn(), Mosquitto::spawn());
    let platform = FakePlatform::spawn().await;
    for i in 0..devices {
        let voucher = format!(r#"{{"access_token":"load-{i}"}}"#);
        platform.add(&voucher, direct_device(&format!("dev-{i}"), &format!("N{i}"), &voucher, Value::Null));
    }
    let mut watcher = Watcher::subscribe(&broker, &["devices/telemetry"]).await;
    let worker = WorkerProcess::spawn(&nats, &redis, &broker, &platform, "load-worker", &[]).await;
    wait_until("the worker to own its partitions", || async {
        worker.metric("worker_partitions").await >= 16.0
    })
    .await;
    let edge = TestEdge::spawn(&nats, &redis, "load-edge", one_address_load).await;
    let mut connected = Vec::new();
    for i in 0..devices {
        connected.push(TpDevice::online(edge.official, &format!("load-{i}")).await);
    }
    let started = Instant::now();
    for mut device in connected {
        tokio::spawn(async move {
            for n in 0..each {
                device.send(Frame::data(cmd::TELEMETRY, Bytes::from(format!(r#"{{"n":{n}}}"#)))).await;
            }
            // Keep the connection open until the process ends.
            std::future::pending::<()>().await;
        });
    }
    let total = devices * each;
    for _ in 0..total {
        watcher.next().await;
    }
    let elapsed = started.elapsed();
    println!(
        "{total} uplinks from {devices} devices reached the broker in {elapsed:.2?}: {:.0} msg/s",
        total as f64 / elapsed.as_secs_f64()
    );
}
