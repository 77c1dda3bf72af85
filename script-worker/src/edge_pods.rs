//! Edge pods that Kubernetes says are gone: their routes purged without waiting for
//! their liveness keys to expire.
//!
//! A killed edge pod's routes are purged by the live edges' reaper once the pod's
//! liveness key has expired (15 s after its last refresh). Where Kubernetes runs the
//! edges, it knows sooner: a pod object is removed only after its containers stopped,
//! and a pod in phase `Failed` or `Succeeded` (evicted, OOM-killed for good) runs no
//! more. Workers watch the edge pods (a label selector) and, for a pod gone for
//! [`GRACE`] (against a lagging or re-listing API), delete its liveness key: downlinks
//! to its devices answer "offline" at once, and the reaper's next round (within 5 s)
//! publishes their offline events and removes the routes, fenced as always. Whichever
//! of the two rules notices first wins.
//!
//! Only pods this watch has seen alive are ever purged, so edges outside the selector
//! (another release on the same Redis, edges not run by Kubernetes) are left to the
//! liveness rule. A force-deleted pod whose process still runs re-creates its key at
//! its next refresh, and its routes come back with its next re-assert.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher::{self, Event};
use tcpc_proto::connect::RedisConnection;
use tcpc_proto::names;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How long a pod must stay gone before its routes are purged.
pub const GRACE: Duration = Duration::from_secs(5);
/// How often gone pods are checked against their grace.
const CHECK: Duration = Duration::from_secs(1);

/// What the watch has told about the edge pods.
#[derive(Debug, Default)]
pub struct EdgePods {
    running: HashSet<String>,
    /// Gone pods, and since when.
    gone: HashMap<String, Instant>,
    /// Pods listed in the re-list under way (`Init` … `InitDone`).
    relisted: Option<HashSet<String>>,
}

impl EdgePods {
    /// Takes one event of the watch at `now`.
    pub fn observe(&mut self, event: Event<Pod>, now: Instant) {
        match event {
            Event::Apply(pod) => self.saw(&pod, now),
            Event::Delete(pod) => self.went(pod.name_any(), now),
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(listed) = &mut self.relisted {
                    listed.insert(pod.name_any());
                }
                self.saw(&pod, now);
            }
            Event::InitDone => {
                // Pods running before the re-list and absent from it went while the
                // watch was down.
                let listed = self.relisted.take().unwrap_or_default();
                let missing: Vec<String> = self.running.difference(&listed).cloned().collect();
                for name in missing {
                    self.went(name, now);
                }
            }
        }
    }

    fn saw(&mut self, pod: &Pod, now: Instant) {
        let name = pod.name_any();
        let phase = pod.status.as_ref().and_then(|status| status.phase.as_deref());
        if matches!(phase, Some("Failed" | "Succeeded")) {
            self.went(name, now);
        } else {
            self.gone.remove(&name);
            self.running.insert(name);
        }
    }

    fn went(&mut self, name: String, now: Instant) {
        if self.running.remove(&name) {
            self.gone.entry(name).or_insert(now);
        }
    }

    /// The pods gone for [`GRACE`] by `now`, each returned once.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let due: Vec<String> = self
            .gone
            .iter()
            .filter(|(_, since)| now >= **since + GRACE)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &due {
            self.gone.remove(name);
        }
        due
    }
}

/// Watches the edge pods matching `selector` in `namespace` until `stop`, and purges the
/// routes of those gone.
pub async fn purge_gone_edge_pods(
    client: kube::Client,
    namespace: &str,
    selector: &str,
    redis: RedisConnection,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
    let events = watcher::watcher(pods, watcher::Config::default().labels(selector));
    info!(%namespace, %selector, "watching edge pods");
    follow(events, redis, metrics, stop).await;
}

/// Follows the watch's `events` (the watcher re-lists and backs off by itself).
async fn follow(
    events: impl Stream<Item = Result<Event<Pod>, watcher::Error>>,
    redis: RedisConnection,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    let mut pods = EdgePods::default();
    let mut check = tokio::time::interval(CHECK);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(event)) => {
                    failing = false;
                    pods.observe(event, Instant::now());
                }
                Some(Err(error)) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(%error, "edge pod watch failed (RBAC: list and watch on pods?); retrying");
                    }
                }
                None => return,
            },
            _ = check.tick() => {
                for pod in pods.due(Instant::now()) {
                    purge(&redis, &pod, &metrics).await;
                }
            }
        }
    }
}

/// Deletes a gone pod's liveness key: its routes now belong to a dead pod.
async fn purge(redis: &RedisConnection, pod: &str, metrics: &Metrics) {
    let deleted: redis::RedisResult<u32> =
        redis::AsyncCommands::del(&mut redis.clone(), names::pod_liveness_key(pod)).await;
    match deleted {
        Ok(_) => {
            metrics.edge_pods_purged.inc();
            info!(%pod, "edge pod gone from Kubernetes; its routes are left to the reaper");
        }
        // Its key expires by itself anyway.
        Err(error) => warn!(%pod, %error, "gone edge pod's liveness key not deleted"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodStatus;
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
            status: Some(PodStatus { phase: Some(phase.to_owned()), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn gone_pods_are_due_after_the_grace_once() {
        let start = Instant::now();
        let mut pods = EdgePods::default();
        pods.observe(Event::Apply(pod("edge-a", "Running")), start);
        pods.observe(Event::Apply(pod("edge-b", "Running")), start);
        pods.observe(Event::Delete(pod("edge-a", "Running")), start);
        pods.observe(Event::Delete(pod("never-seen", "Running")), start);
        assert!(pods.due(start + GRACE / 2).is_empty(), "within the grace");
        assert_eq!(pods.due(start + GRACE), ["edge-a"], "only a pod seen running");
        assert!(pods.due(start + GRACE * 2).is_empty(), "once");
    }

    #[test]
    fn a_pod_seen_again_within_the_grace_is_kept() {
        let start = Instant::now();
        let mut pods = EdgePods::default();
        pods.observe(Event::Apply(pod("edge-a", "Running")), start);
        pods.observe(Event::Delete(pod("edge-a", "Running")), start);
        pods.observe(Event::Apply(pod("edge-a", "Running")), start + GRACE / 2);
        assert!(pods.due(start + GRACE * 2).is_empty());
    }

    #[test]
    fn failed_pods_and_pods_missing_from_a_relist_are_gone() {
        let start = Instant::now();
        let mut pods = EdgePods::default();
        for name in ["edge-a", "edge-b", "edge-c"] {
            pods.observe(Event::Apply(pod(name, "Running")), start);
        }
        pods.observe(Event::Apply(pod("edge-a", "Failed")), start);
        // The watch broke; the re-list no longer has edge-b.
        pods.observe(Event::Init, start);
        pods.observe(Event::InitApply(pod("edge-c", "Running")), start);
        pods.observe(Event::InitDone, start);
        let mut due = pods.due(start + GRACE);
        due.sort();
        assert_eq!(due, ["edge-a", "edge-b"]);
    }
}
