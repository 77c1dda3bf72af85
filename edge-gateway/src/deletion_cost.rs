//! Keeps this pod's `controller.kubernetes.io/pod-deletion-cost` near its connection
//! count, so that a Deployment scale-down removes the emptiest edge pod first (the
//! ReplicaSet controller deletes the pods of lowest cost first) instead of one that holds
//! a large share of the fleet.
//!
//! The annotation is patched at most once per [`PERIOD`], and only when the count moved
//! by a tenth (or, for small counts, by one) since the last patch: with hundreds of edge
//! pods the API server sees a few patches a second, not one per connection.

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The annotation the ReplicaSet controller ranks pods by on scale-down.
pub const ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";
/// At most one patch per period.
pub const PERIOD: Duration = Duration::from_secs(10);

/// Writes the annotation.
pub trait CostWriter: Send + Sync {
    fn write(&self, cost: i32) -> BoxFuture<'_, Result<(), kube::Error>>;
}

/// This pod's annotation through the API server.
pub struct PodAnnotation {
    pods: Api<Pod>,
    name: String,
}

impl PodAnnotation {
    /// The pod `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        PodAnnotation { pods: Api::namespaced(client, namespace), name: name.to_owned() }
    }
}

impl CostWriter for PodAnnotation {
    fn write(&self, cost: i32) -> BoxFuture<'_, Result<(), kube::Error>> {
        Box::pin(async move {
            // A merge patch touches this one annotation and nothing else of the pod.
            let patch =
                serde_json::json!({ "metadata": { "annotations": { ANNOTATION: cost.to_string() } } });
            self.pods.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop)
        })
    }
}

/// Whether a count is worth a patch after `last` was written: the first one always,
/// then a change of a tenth, or of one for counts under ten.
pub fn worth_writing(last: Option<i32>, now: i32) -> bool {
    last.is_none_or(|last| now.abs_diff(last) >= (last.unsigned_abs() / 10).max(1))
}

/// Writes the connection count (`connections`) as the deletion cost every [`PERIOD`]
/// when [`worth_writing`], until `stop`. A failed write is retried at the next period.
pub async fn keep_deletion_cost(
    writer: &dyn CostWriter,
    connections: impl Fn() -> usize,
    stop: CancellationToken,
) {
    let mut last = None;
    let mut failing = false;
    let mut ticker = tokio::time::interval(PERIOD);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let cost = i32::try_from(connections()).unwrap_or(i32::MAX);
        if !worth_writing(last, cost) {
            continue;
        }
        match writer.write(cost).await {
            Ok(()) => {
                debug!(cost, "pod deletion cost written");
                last = Some(cost);
                failing = false;
            }
            // Logged once per outage: the next periods retry quietly.
            Err(error) if !failing => {
                warn!(%error, "pod deletion cost not written (RBAC: patch on pods?); retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn small_moves_are_not_worth_a_patch() {
        assert!(worth_writing(None, 0), "the first count is written");
        assert!(!worth_writing(Some(0), 0));
        assert!(worth_writing(Some(0), 1), "under ten, any change");
        assert!(worth_writing(Some(9), 8));
        assert!(!worth_writing(Some(1000), 1099), "under a tenth");
        assert!(worth_writing(Some(1000), 1100));
        assert!(worth_writing(Some(1000), 900));
        assert!(!worth_writing(Some(i32::MAX), i32::MAX));
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<i32>>);

    impl CostWriter for Recorded {
        fn write(&self, cost: i32) -> BoxFuture<'_, Result<(), kube::Error>> {
            self.0.lock().unwrap().push(cost);
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_one_patch_per_period_following_the_count() {
        let writer = Arc::new(Recorded::default());
        let connections = Arc::new(AtomicUsize::new(500));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (writer, connections, stop) = (writer.clone(), connections.clone(), stop.clone());
            async move { keep_deletion_cost(&*writer, || connections.load(Ordering::Relaxed), stop).await }
        });
        let written = || writer.0.lock().unwrap().clone();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(written(), [500], "written at start");
        // Many changes within a period: none written before it ends, then the latest.
        for count in [520, 700, 900, 1000] {
            connections.store(count, Ordering::Relaxed);
            tokio::time::sleep(PERIOD / 5).await;
        }
        assert_eq!(written(), [500]);
        tokio::time::sleep(PERIOD / 5).await;
        assert_eq!(written(), [500, 1000]);
        // A small move: never written.
        connections.store(1050, Ordering::Relaxed);
        tokio::time::sleep(PERIOD * 3).await;
        assert_eq!(written(), [500, 1000]);
        // The pod drains: followed down to zero.
        connections.store(0, Ordering::Relaxed);
        tokio::time::sleep(PERIOD).await;
        assert_eq!(written(), [500, 1000, 0]);
        stop.cancel();
        task.await.unwrap();
    }
}
