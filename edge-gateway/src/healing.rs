//! Routes heal by themselves: every pod re-asserts its sessions' routes, and reaps the
//! routes of dead pods.
//!
//! - **Re-assert.** Every `--route-reassert` (jittered, so that pods and rounds spread),
//!   every session's route is written again in pipelines of a thousand, fenced by its
//!   epoch. A route lost in Redis (failover to a lagging replica, eviction, a restart
//!   without persistence) or never written (Redis was down at auth) comes back within
//!   one period; a session whose device has a newer connection elsewhere learns it is
//!   stale and closes.
//! - **Reap.** Every live edge pod looks, every few seconds, for edge pods with routes and
//!   no liveness key (it expires 15 s after the pod's last refresh); one of them claims
//!   each dead pod and, for each route that still names it, publishes the device's
//!   offline event and removes the route (compare-and-delete on its connection). A
//!   round that fails half-way is tried again at the claimer's next round (its claim
//!   holds for it; another pod takes over once the claim expires). A
//!   device that reconnected elsewhere has a route naming another pod: no offline. The
//!   event says `owned_route=false`, so the worker checks the route itself before
//!   reporting the device offline, which also covers a reconnect racing the reaper. A
//!   kill -9'd pod's devices are reported offline 15–20 s after the kill.
//!   At start, a pod also reaps routes that name its own pod name but a connection of
//!   an earlier process (a VM restarting the service under the same host name).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tcpc_proto::names;
use tcpc_proto::v1::{SessionEvent, SessionState, UplinkEnvelope, uplink_envelope};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Shared;
use crate::metrics::ReasonLabel;
use crate::registry::CloseOrder;
use crate::routes::{Claim, Reasserted, Route};

/// How often a pod looks for dead pods.
const REAP_PERIOD: Duration = Duration::from_secs(5);
/// Offline events of one reap published before awaiting their acknowledgements.
const REAP_WINDOW: usize = 256;

/// Re-asserts every session's route each jittered `period` until `stop`.
pub(crate) async fn reassert_routes(shared: Arc<Shared>, period: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tcpc_proto::backoff::jitter(period)) => {}
        }
        reassert_once(&shared).await;
    }
}

/// One re-assert round over the pod's sessions.
pub(crate) async fn reassert_once(shared: &Shared) {
    let sessions = shared.registry.all();
    let claims: Vec<Claim> = sessions
        .iter()
        .map(|handle| Claim {
            route: Route {
                device_id: handle.device_id.to_string(),
                connection_id: handle.connection_id.to_string(),
                pod: shared.pod.clone(),
                grpc_addr: shared.grpc_addr.clone(),
            },
            epoch: handle.route_epoch(),
        })
        .collect();
    if claims.is_empty() {
        return;
    }
    let outcomes = match shared.routes.reassert(&claims).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            shared.metrics.reassert_rounds.get_or_create(&ReasonLabel { reason: "failed" }).inc();
            warn!(%error, sessions = claims.len(), "routes not re-asserted; next round retries");
            return;
        }
    };
    shared.metrics.reassert_rounds.get_or_create(&ReasonLabel { reason: "ok" }).inc();
    let mut restored = 0;
    for (handle, outcome) in sessions.iter().zip(outcomes) {
        match outcome {
            Reasserted::Held => {}
            Reasserted::Restored => restored += 1,
            Reasserted::Superseded => {
                shared.metrics.routes_superseded.inc();
                handle.close(CloseOrder::Superseded);
            }
        }
    }
    shared.metrics.routes_restored.inc_by(restored);
    if restored > 0 {
        info!(restored, "routes missing from the route store written again");
    }
}

/// Looks for dead pods every few seconds (jittered) until `stop`, and reaps them; first
/// the routes an earlier process of this pod left.
pub(crate) async fn reap_dead_pods(shared: Arc<Shared>, stop: CancellationToken) {
    let own_prefix = shared.ids.process_prefix();
    let mut own_done = false;
    loop {
        if !own_done {
            own_done =
                reap(&shared, &shared.pod, |route| !route.connection_id.starts_with(&own_prefix)).await;
        }
        match shared.routes.claim_dead_pods(&shared.pod).await {
            Ok(dead) => {
                for pod in dead {
                    info!(%pod, "edge pod gone without a clean shutdown; reaping its routes");
                    reap(&shared, &pod, |_| true).await;
                }
            }
            Err(error) => debug!(%error, "dead pods not looked for"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tcpc_proto::backoff::jitter(REAP_PERIOD)) => {}
        }
    }
}

/// Reports offline and removes each route of `pod` that `stale` selects, and reports
/// offline the devices of its set left without any route; true when every one was
/// handled (else the next round tries again).
async fn reap(shared: &Shared, pod: &str, stale: impl Fn(&Route) -> bool) -> bool {
    let leftovers = match shared.routes.leftovers_of_pod(pod).await {
        Ok(leftovers) => leftovers,
        Err(error) => {
            warn!(%error, %pod, "routes of a dead pod not read");
            return false;
        }
    };
    let routes: Vec<Route> = leftovers.routes.into_iter().filter(stale).collect();
    // An orphan's route is gone: its event names no connection, and the worker reports
    // the device offline only if it has no route at all by then.
    let orphans: Vec<Route> = leftovers
        .orphans
        .iter()
        .map(|device| Route {
            device_id: device.clone(),
            connection_id: String::new(),
            pod: pod.to_owned(),
            grpc_addr: String::new(),
        })
        .collect();
    for batch in routes.chunks(REAP_WINDOW).chain(orphans.chunks(REAP_WINDOW)) {
        if !publish_offline(shared, batch).await {
            return false;
        }
    }
    if let Err(error) = shared.routes.clear_leftovers(pod, &routes, &leftovers.orphans).await {
        warn!(%error, %pod, "routes of a dead pod not removed");
        return false;
    }
    shared.metrics.routes_reaped.inc_by((routes.len() + orphans.len()) as u64);
    if pod != shared.pod
        && let Err(error) = shared.routes.reaped(pod).await
    {
        debug!(%error, %pod, "reaped pod not taken off the watch list");
    }
    true
}

/// Publishes the offline events of `routes` and waits for every acknowledgement.
async fn publish_offline(shared: &Shared, routes: &[Route]) -> bool {
    let mut acks = Vec::with_capacity(routes.len());
    for route in routes {
        let event = SessionEvent {
            device_id: route.device_id.clone(),
            connection_id: route.connection_id.clone(),
            state: SessionState::Offline.into(),
            pod: route.pod.clone(),
            at_ms: tcpc_proto::now_ms(),
            sequence: 0,
            reason: "pod_gone".to_owned(),
            // The worker checks the route: the device may have reconnected meanwhile.
            owned_route: false,
            protocol: 0,
        };
        let envelope: Bytes =
            UplinkEnvelope { body: Some(uplink_envelope::Body::Session(event)) }.encode_to_vec().into();
        let subject =
            names::uplink_subject(names::partition_of(&route.device_id, shared.config.uplink_partitions));
        // One id per connection (per device for an orphan): two reapers store it once.
        let id = if route.connection_id.is_empty() {
            names::reaped_message_id(&format!("{}-{}", route.pod, route.device_id))
        } else {
            names::reaped_message_id(&route.connection_id)
        };
        let publish = shared.bus.publish(subject, id, envelope);
        match tokio::time::timeout(shared.config.limits.publish_timeout, publish).await {
            Ok(Ok(ack)) => acks.push(ack),
            _ => return false,
        }
    }
    let acked =
        tokio::time::timeout(shared.config.limits.publish_timeout, futures::future::try_join_all(acks)).await;
    matches!(acked, Ok(Ok(_)))
}
