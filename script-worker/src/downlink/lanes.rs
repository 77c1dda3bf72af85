//! Downlinks of different devices handled at the same time, each device's one at a time
//! in the order the broker delivered them.
//!
//! Handling a downlink awaits the device source, Redis (the claim and the route) and the
//! edge's answer to `Deliver`: about a millisecond on a quiet box, so one loop capped a
//! worker near 1,000 downlinks/s, and a device behind an edge pod that never answers
//! held up every other device for a Deliver deadline. The dispatcher hashes the device
//! that the topic names onto one of [`LANES`] lanes, each a task handling its downlinks
//! one after the other: one device's downlinks keep their order (one lane), different
//! devices' overlap (many lanes), and no state is kept per device. A lane held up holds
//! up only the devices hashed onto it.
//!
//! The downlinks waiting in all the lanes are bounded together (the worker's downlink
//! queue): with the bound reached the dispatcher waits, the broker connection's queue
//! fills behind it, and the connection refuses what comes next "busy". One device may
//! take the whole bound (a burst of a thousand commands to one device is delivered in
//! order, as before the lanes).
//!
//! The platform names a device by its number (backend ≥ v1.1.10) or its id (older): one
//! backend uses one form, so one device's downlinks take one lane. A gateway's
//! sub-devices are named each by its own: their downlinks take their own lanes, so the
//! order holds per sub-device, not across a gateway's sub-devices (as with devices).
//! Downlinks replayed after a partition hand-over (see [`Downlinks::replay_hand_over`])
//! do not go through the lanes: they are past, or near, their answer's bound by then.

use std::hash::{BuildHasher as _, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, error};

use super::{Downlinks, Undelivered};
use crate::platform::mqtt::Downlink;
use crate::platform::topics::{self, DownlinkTopic};

/// Downlinks under way at once, at most (one per lane): enough to keep the Redis and
/// gRPC round trips of thousands per second in flight, few enough that a burst does not
/// open as many calls to the device source.
pub const LANES: usize = 64;

/// The lane of the device named `device`: the same in every run (a fixed hasher), so
/// that tests can pick devices on different lanes.
pub fn lane_of(device: &str, lanes: usize) -> usize {
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(device) % lanes as u64) as usize
}

/// A downlink in its lane, holding its place in the bound.
type Queued = (DownlinkTopic, Downlink, OwnedSemaphorePermit);

/// Hands the broker's downlinks to their lanes, at most `waiting` of them in the lanes
/// at once, until `arrivals` closes or `stop`; then waits for the downlinks already in
/// the lanes to be handled (each within its answer's bound: a few seconds at most).
pub async fn dispatch(
    downlinks: Arc<Downlinks>,
    mut arrivals: mpsc::Receiver<Downlink>,
    lanes: usize,
    waiting: usize,
    stop: CancellationToken,
) {
    let tasks = TaskTracker::new();
    // Unbounded each: the bound is the permits, shared by every lane.
    let senders: Vec<mpsc::UnboundedSender<Queued>> = (0..lanes)
        .map(|_| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tasks.spawn(lane(downlinks.clone(), receiver));
            sender
        })
        .collect();
    tasks.close();
    let places = Arc::new(Semaphore::new(waiting));
    loop {
        let (downlink, place) = tokio::select! {
            _ = stop.cancelled() => break,
            arrival = next(&mut arrivals, &places) => match arrival {
                Some(arrival) => arrival,
                None => break,
            },
        };
        let Some(parsed) = topics::parse_downlink(&downlinks.prefix, &downlink.topic) else {
            debug!(topic = %downlink.topic, "not a downlink topic");
            continue;
        };
        let lane = lane_of(&parsed.device, lanes);
        // A lane ends only when its sender is dropped, below, or if it panicked: then
        // its devices are answered "busy" instead of left without an answer.
        if let Err(mpsc::error::SendError((parsed, downlink, _))) =
            senders[lane].send((parsed, downlink, place))
        {
            error!(lane, "downlink lane gone; answering busy");
            let span = downlink.span.clone();
            downlinks.answer(&parsed, &parsed.device, Undelivered::Busy).instrument(span).await;
        }
    }
    drop(senders);
    tasks.wait().await;
}

/// The next downlink, once there is a place for it in the lanes (waiting for one lets
/// the broker connection's queue fill, and it refuses more "busy").
async fn next(
    arrivals: &mut mpsc::Receiver<Downlink>,
    places: &Arc<Semaphore>,
) -> Option<(Downlink, OwnedSemaphorePermit)> {
    let place = places.clone().acquire_owned().await.ok()?;
    Some((arrivals.recv().await?, place))
}

/// Handles one lane's downlinks, one at a time, until its sender is gone: on a stop,
/// what is queued is still handled (and answered), each within its answer's bound.
async fn lane(downlinks: Arc<Downlinks>, mut queue: mpsc::UnboundedReceiver<Queued>) {
    while let Some((parsed, downlink, _place)) = queue.recv().await {
        let span = downlink.span.clone();
        downlinks.handle(parsed, downlink).instrument(span).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_spread_over_every_lane_and_each_keeps_its_own() {
        let lanes: Vec<usize> = (0..10_000).map(|n| lane_of(&format!("N{n}"), LANES)).collect();
        let mut per_lane = [0usize; LANES];
        for &lane in &lanes {
            per_lane[lane] += 1;
        }
        assert!(per_lane.iter().all(|&n| (100..220).contains(&n)), "{per_lane:?}");
        assert!((0..10_000).all(|n| lane_of(&format!("N{n}"), LANES) == lanes[n]), "stable");
    }
}
