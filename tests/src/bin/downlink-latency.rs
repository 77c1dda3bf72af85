//! Downlink latency: MQTT publish by the platform → bytes at the device.
//!
//! `cargo build --release -p tcpc-tests --bins && target/release/downlink-latency [count] [per second]`
//! starts its own nats-server, redis-server, mosquitto and fake ThingsPanel, one worker
//! process (release) and an edge in this process, connects one TP device, publishes
//! `count` telemetry-control downlinks at the given rate (default 1,000 at 1,000/s),
//! and reports the latency percentiles from each publish to its frame at the device.

use std::time::{Duration, Instant};

use serde_json::Value;
use tcpc_tests::device::TpDevice;
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::world::{World, wait_for_partitions};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().expect("numbers"));
    let count = args.next().unwrap_or(1000) as usize;
    let rate = args.next().unwrap_or(1000);
    let w = World::start().await;
    w.device("lat-token", "dev-lat", "L001", Value::Null);
    let watcher = Watcher::subscribe(&w.broker, &["devices/status/#"]).await;
    let worker = w.worker("lat-worker", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = w.edge().await;
    let mut device = TpDevice::online(edge.official, "lat-token").await;
    let mut watcher = watcher;
    watcher.next().await; // online: the route is in place

    let sent: Vec<Instant> = Vec::with_capacity(count);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(sent));
    let publisher = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            for n in 0..count {
                ticker.tick().await;
                sent.lock().unwrap().push(Instant::now());
                watcher.publish("plugin/TCP/devices/telemetry/control/L001", format!(r#"{{"n":{n}}}"#)).await;
            }
            watcher
        })
    };
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let frame = device.next().await.expect("a downlink");
        let received = Instant::now();
        let value: Value = serde_json::from_slice(&frame.payload).unwrap();
        assert_eq!(value["n"], n as u64, "in order");
        latencies.push(received - sent.lock().unwrap()[n]);
    }
    drop(publisher.await);
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{count} downlinks at {rate}/s, publish -> device: p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, max {:.2?}",
        at(0.50),
        at(0.90),
        at(0.99),
        latencies[latencies.len() - 1]
    );
}
