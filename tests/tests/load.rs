//! tcpc-load against the real pipeline (edge, NATS JetStream, a worker process,
//! mosquitto, the fake platform): a small run's every message arrives once, in order,
//! attributed to its device, both ways; with TP devices in this process, and with
//! custom devices through an uplink script in two shard processes. And its peer
//! baseline, MQTT devices publishing straight to mosquitto, measured the same way.

use std::net::SocketAddr;

use clap::Parser;
use serde_json::{Value, json};
use tcpc_load::report::Flow;
use tcpc_load::{Args, Report};
use tcpc_tests::mqtt::Mosquitto;
use tcpc_tests::world::{World, wait_for_partitions};

const DEVICES: u64 = 20;
const UPLINKS_EACH: u64 = 50;
const DOWNLINKS_EACH: u64 = 5;

/// A world whose platform knows the run's devices, with `template` as their form values.
async fn world(template: Value) -> (World, tcpc_tests::worker::WorkerProcess) {
    let w = World::start().await;
    for i in 0..DEVICES {
        w.device(&format!("load-{i}"), &format!("dev-{i}"), &format!("N{i}"), template.clone());
    }
    let worker = w.worker("load-worker", &[]).await;
    wait_for_partitions(&[&worker]).await;
    (w, worker)
}

fn args(w: &World, edge: SocketAddr, extra: &[&str]) -> Args {
    let (edge, broker, devices, uplinks, downlinks) = (
        edge.to_string(),
        w.broker.url(),
        DEVICES.to_string(),
        UPLINKS_EACH.to_string(),
        DOWNLINKS_EACH.to_string(),
    );
    let mut line = vec!["tcpc-load", "--edge", &edge, "--mqtt-url", &broker, "--devices", &devices];
    line.extend(["--device-id", "dev-{i}", "--messages", &uplinks]);
    line.extend(["--downlink-rate", "500", "--downlinks", &downlinks]);
    // A bound on a slow machine, never reached when everything arrives.
    line.extend(["--drain", "60s"]);
    line.extend(extra);
    Args::try_parse_from(line).expect("valid flags")
}

fn assert_everything_arrived_once_in_order(report: &Report) {
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(report.connect.authenticated, DEVICES, "{report}");
    assert_eq!(report.connect.connected_at_end, DEVICES, "{report}");
    for (flow, each) in [(&report.uplink, UPLINKS_EACH), (&report.downlink, DOWNLINKS_EACH)] {
        let flow = flow.as_ref().expect("both directions measured");
        assert_each_arrived_once_in_order(report, flow, each);
        assert!(flow.latency.is_some(), "{report}");
    }
}

/// Every one of the devices' `each` messages of `flow` arrived, once, in order.
fn assert_each_arrived_once_in_order(report: &Report, flow: &Flow, each: u64) {
    let sent = DEVICES * each;
    assert_eq!(
        (flow.sent, flow.received, flow.lost, flow.duplicates, flow.out_of_order, flow.misattributed),
        (sent, sent, 0, 0, 0, 0),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp_devices_every_message_arrives_once_in_order_both_ways() {
    let (w, _worker) = world(Value::Null).await;
    let edge = w.edge().await;
    let report = tcpc_load::run(args(&w, edge.official, &[])).await.expect("the run");
    assert_everything_arrived_once_in_order(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_devices_through_a_script_in_two_processes_every_message_arrives_once_in_order() {
    let decode = "function decode(bytes) { return JSON.parse(String.fromCharCode.apply(null, bytes)); }";
    let template =
        json!({"protocol": "custom", "framing": "delimiter", "delimiter": "\\n", "uplink_script": decode});
    let (w, _worker) = world(template).await;
    let edge = w.edge().await;
    let extra = ["--protocol", "custom", "--processes", "2", "--size", "200"];
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_load-under-test"));
    let report = tcpc_load::run_with_program(args(&w, edge.custom, &extra), program).await.expect("the run");
    assert_eq!(report.processes, 2);
    assert_everything_arrived_once_in_order(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_devices_straight_to_the_broker_every_message_arrives_once_in_order() {
    let broker = Mosquitto::spawn().await;
    let (url, devices, uplinks) = (broker.url(), DEVICES.to_string(), UPLINKS_EACH.to_string());
    let line = ["tcpc-load", "--protocol", "mqtt", "--mqtt-url", &url, "--devices", &devices];
    let line = line.into_iter().chain(["--device-id", "dev-{i}", "--messages", &uplinks, "--drain", "60s"]);
    let report = tcpc_load::run(Args::try_parse_from(line).expect("valid flags")).await.expect("the run");
    assert!(report.errors.is_empty(), "{report}");
    assert_eq!(report.connect.authenticated, DEVICES, "{report}");
    assert_each_arrived_once_in_order(
        &report,
        report.uplink.as_ref().expect("uplinks measured"),
        UPLINKS_EACH,
    );
    assert!(report.downlink.is_none(), "{report}");
}
