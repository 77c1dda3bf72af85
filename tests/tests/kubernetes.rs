//! Where Kubernetes holds the truth, against a fake API server in-process: the edge
//! keeps its pod's deletion cost at its connection count; workers purge the routes of
//! edge pods that Kubernetes removed.

use serde_json::Value;
use tcpc_tests::device::TpDevice;
use tcpc_tests::kube::FakeKube;
use tcpc_tests::mqtt::Watcher;
use tcpc_tests::wait_until;
use tcpc_tests::worker::{EdgeProcess, WorkerProcess};
use tcpc_tests::world::{World, wait_for_partitions};

const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
const EDGE_LABELS: &[(&str, &str)] = &[("app.kubernetes.io/component", "edge-gateway")];

#[tokio::test(flavor = "multi_thread")]
async fn the_deletion_cost_follows_the_connection_count() {
    let w = World::start().await;
    for n in 0..3 {
        w.device(&format!("token-{n}"), &format!("dev-{n}"), &format!("N{n}"), Value::Null);
    }
    let kube = FakeKube::start("tcpc").await;
    kube.add_pod("edge-a", EDGE_LABELS);
    let worker = w.worker("worker-a", &[]).await;
    wait_for_partitions(&[&worker]).await;
    let edge = EdgeProcess::spawn_with_env(
        &w.nats,
        &w.redis,
        "edge-a",
        &["--pod-deletion-cost", "on", "--pod-namespace", "tcpc"],
        &[kube.env()],
    )
    .await;
    wait_until("the cost of an empty pod", || async {
        kube.annotation("edge-a", ANNOTATION).as_deref() == Some("0")
    })
    .await;
    let mut devices = Vec::new();
    for n in 0..3 {
        devices.push(TpDevice::online(edge.official, &format!("token-{n}")).await);
    }
    wait_until("the cost to follow three connections", || async {
        kube.annotation("edge-a", ANNOTATION).as_deref() == Some("3")
    })
    .await;
    drop(devices.pop());
    wait_until("the cost to follow a close", || async {
        kube.annotation("edge-a", ANNOTATION).as_deref() == Some("2")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_edge_pod_has_its_devices_reported_offline_by_the_workers() {
    let w = World::start().await;
    w.device("tp-token", "dev-k", "K001", Value::Null);
    let mut watcher = Watcher::subscribe(&w.broker, &["devices/status/dev-k"]).await;
    let kube = FakeKube::start("tcpc").await;
    kube.add_pod("edge-a", EDGE_LABELS);
    kube.add_pod("edge-b", EDGE_LABELS);
    let worker = WorkerProcess::spawn_with_env(
        &w.nats,
        &w.redis,
        &w.broker,
        &w.platform,
        "worker-a",
        &["--edge-pod-watch", "on", "--pod-namespace", "tcpc"],
        &[kube.env()],
    )
    .await;
    wait_for_partitions(&[&worker]).await;
    let mut edge_a = w.edge_process("edge-a").await;
    let _edge_b = w.edge_process("edge-b").await;
    let _device = TpDevice::online(edge_a.official, "tp-token").await;
    assert_eq!(&watcher.next().await.payload[..], b"1");

    // The worker has listed the pods (it watches after its first list): it knows edge-a
    // ran, and a pod it never saw running is never purged.
    wait_until("the worker to watch the edge pods", || async { kube.watches() > 0 }).await;

    // Its node is gone: the pod died without a word, and Kubernetes removed it.
    edge_a.kill();
    kube.delete_pod("edge-a");
    assert_eq!(&watcher.next().await.payload[..], b"0", "reported offline");
    wait_until("the purge to be counted", || async {
        worker.metric("worker_edge_pods_purged_total").await == 1.0
    })
    .await;
    let alive: bool = redis::AsyncCommands::exists(
        &mut w.redis.connection().await,
        tcpc_proto::names::pod_liveness_key("edge-a"),
    )
    .await
    .unwrap();
    assert!(!alive, "the removed pod's liveness key is gone before its expiry");
    // A pod never removed keeps its routes' owner alive.
    assert_eq!(worker.metric("worker_edge_pods_purged_total").await, 1.0, "edge-b untouched");
}
