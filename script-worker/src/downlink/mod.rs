//! Downlinks: from the platform's MQTT topics to the socket that holds the device.
//!
//! - [`topics::parse_downlink`] reads the four downlink topics under the plugin's prefix; the
//!   `{device}` segment is a device number (backend ≥ v1.1.10) or id (older): both are
//!   resolved, sub-devices to their gateway and address.
//! - [`Downlinks::handle`] encodes (a TP frame with CMD 0x10–0x13 and the message_id in
//!   the JSON for official devices; the downlink script's bytes for custom ones; a
//!   payload that is not JSON goes as it is), finds the route, and calls `Deliver` on
//!   the edge pod that holds the connection. A device that is not connected, a dead pod
//!   or a failed write gets `{"result":1,"message":"…"}` on the response topic at once.
//! - Optionally, downlinks for a device that is away are queued (bounded in count and
//!   age) and delivered in order when it comes back. While a device has a queue, every
//!   new downlink for it joins the queue's end (and a flush starts if none runs), so
//!   that a flush and new downlinks keep one order.
//!
//! One worker handles a device's downlinks one at a time, in the order the broker
//! delivered them: per-device order end to end; different devices' at the same time
//! ([`lanes`]).
//!
//! Every downlink is answered within [`ANSWER_WITHIN`] of its arrival, whatever the edge
//! pod, the route store or the device source does: the steps before the delivery are
//! cut off at that bound, and the delivery is given what is left of it (at most
//! [`DELIVER_TIMEOUT`]), which the edge is told so that it skips a write its caller no
//! longer waits for. One that cannot be queued at all is refused by the broker
//! connection with [`busy_refusal`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tcpc_observe::Chain;

use bytes::Bytes;
use serde_json::{Map, Value as Json};
use tcpc_proto::names;
use tcpc_proto::route::Route;
use tcpc_proto::v1::DeliverStatus;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, warn};

use crate::devices::ProtocolChoice;
use crate::metrics::{Metrics, ReasonLabel};
use crate::platform::mqtt::{Downlink, Refusal};
use crate::platform::topics::{self, DownlinkKind, DownlinkTopic};
use crate::routes::{ClaimAndRoute, EdgeClients, RouteLookup, RouteLookupError};
use crate::scripts::{Call, CallContext, Output, Scripts};
use crate::sink::{PlatformMessage, PlatformSink};
use crate::source::{DeviceSource, Target};

pub mod lanes;

/// The longest one Deliver call may take (sent to the edge as `timeout_ms`).
pub const DELIVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Every downlink is answered within this long of its arrival: one Deliver and a
/// margin for the wait in the queue, the device resolution and the route lookup.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(4);
/// A Deliver with less time than this left is not attempted: the edge could not write
/// before its caller gives up.
const MIN_DELIVER: Duration = Duration::from_millis(100);

/// The answer to a downlink the worker has no room to queue: `{"result":1,…}` on its
/// response topic (commands and attribute sets; the others have none). The device is
/// named as the platform did (number or id): resolving it would wait on the very
/// lookups that are backed up.
pub fn busy_refusal(prefix: String, metrics: Arc<Metrics>) -> Refusal {
    Arc::new(move |topic: &str| {
        let parsed = topics::parse_downlink(&prefix, topic)?;
        metrics.downlinks.get_or_create(&ReasonLabel { reason: "busy" }).inc();
        answer_message(&parsed, &parsed.device, &Undelivered::Busy)
    })
}

/// The `{"result":1,"message":…}` answer on a downlink's response topic, if it has one.
fn answer_message(parsed: &DownlinkTopic, device_id: &str, why: &Undelivered) -> Option<PlatformMessage> {
    let topic = parsed.message_id.as_deref().and_then(|id| parsed.kind.response_topic(id))?;
    let values = serde_json::json!({ "result": 1, "message": why.to_string() });
    Some(topics::envelope(topic, device_id, values.to_string().as_bytes()))
}

/// The platform payload as the device gets it: sub-device downlinks wrapped for their
/// gateway (`{"sub_device_data":{"<addr>":…}}`) unless the platform already did.
fn shape_for_target(payload: Json, target: &Target) -> Json {
    let Some(address) = &target.sub_address else { return payload };
    if payload.get("sub_device_data").is_some() {
        return payload;
    }
    let mut inner = Map::new();
    inner.insert(address.clone(), payload);
    let mut outer = Map::new();
    outer.insert("sub_device_data".to_owned(), Json::Object(inner));
    Json::Object(outer)
}

/// The JSON of a TP downlink frame: the payload with the message_id added when the
/// platform gave one (objects only; other JSON values go as they are).
fn with_message_id(payload: Json, message_id: Option<&str>) -> Json {
    match (payload, message_id) {
        (Json::Object(object), Some(id)) => {
            let mut with_id = Map::with_capacity(object.len() + 1);
            with_id.insert("message_id".to_owned(), Json::String(id.to_owned()));
            with_id.extend(object);
            Json::Object(with_id)
        }
        (payload, _) => payload,
    }
}

/// Offline queue settings.
#[derive(Clone, Debug)]
pub struct QueuePolicy {
    pub kinds: HashSet<DownlinkKind>,
    pub max: usize,
    pub ttl: Duration,
}

struct Queued {
    topic: String,
    payload: Bytes,
    /// When it arrived: a kind that does not queue (it waits only for its turn) is
    /// still answered within [`ANSWER_WITHIN`] of it.
    received: Instant,
    expires: Instant,
}

/// A device's queue, and whether a flush is delivering it.
#[derive(Default)]
struct DeviceQueue {
    items: VecDeque<Queued>,
    flushing: bool,
}

/// Why a downlink did not reach its device.
#[derive(Debug, thiserror::Error)]
enum Undelivered {
    #[error("device offline")]
    Offline,
    #[error("device offline: {0}")]
    OfflineBecause(String),
    #[error("delivery failed: {0}")]
    Failed(String),
    #[error("downlink script: {0}")]
    Script(String),
    #[error("unknown device")]
    UnknownDevice,
    #[error("worker busy, not delivered")]
    Busy,
    #[error("not delivered in time")]
    Late,
}

/// The downlink side of a worker.
pub struct Downlinks {
    pub prefix: String,
    pub devices: Arc<dyn DeviceSource>,
    pub routes: Arc<dyn RouteLookup>,
    pub edges: Arc<EdgeClients>,
    pub scripts: Arc<Scripts>,
    pub sink: Arc<dyn PlatformSink>,
    pub metrics: Arc<Metrics>,
    /// Whether this worker handles a device's downlinks (ownership of its partition
    /// when every worker sees every downlink; always, with a shared subscription).
    pub handles: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    pub queue_policy: Option<QueuePolicy>,
    /// By carrier id.
    queue: Mutex<HashMap<String, DeviceQueue>>,
    /// Queue flushes and answers awaiting the broker's acknowledgement, awaited on
    /// shutdown with the worker's other tasks.
    tasks: TaskTracker,
    /// Downlinks another worker owned, by carrier id, oldest first (see
    /// [`Downlinks::replay_hand_over`]).
    hand_over: Mutex<VecDeque<(Target, Downlink, String)>>,
    /// How many downlinks without a message id this worker has seen, by content, within
    /// a claim's lifetime (see [`Downlinks::claim_of`]).
    repeats: moka::sync::Cache<String, u32>,
}

/// How long a downlink another worker owns is kept for a hand-over: past a lease's
/// expiry (a crashed owner's partitions are taken 6–8 s after the crash).
const HAND_OVER_WINDOW: Duration = Duration::from_secs(15);
/// Downlinks kept for a hand-over, at most.
const HAND_OVER_KEPT: usize = 10_000;

/// Contents of downlinks without a message id remembered for their repeats, at most.
const REPEATS_KEPT: u64 = 1_000_000;

/// What a downlink's claim is keyed by: its topic (with the message id) and payload.
fn claim_digest(topic: &str, payload: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest =
        Sha256::new().chain_update(topic.as_bytes()).chain_update([0]).chain_update(payload).finalize();
    crate::hex(&digest[..16])
}

/// A route read as a delivery sees it: no route is a device offline.
fn route_or_why(read: Result<Option<Route>, RouteLookupError>) -> Result<Route, Undelivered> {
    match read {
        Ok(Some(route)) => Ok(route),
        Ok(None) => Err(Undelivered::Offline),
        Err(error) => {
            Err(Undelivered::OfflineBecause(format!("route store unavailable ({})", Chain(&error))))
        }
    }
}

impl Downlinks {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        prefix: String,
        devices: Arc<dyn DeviceSource>,
        routes: Arc<dyn RouteLookup>,
        edges: Arc<EdgeClients>,
        scripts: Arc<Scripts>,
        sink: Arc<dyn PlatformSink>,
        metrics: Arc<Metrics>,
        handles: Arc<dyn Fn(&str) -> bool + Send + Sync>,
        queue_policy: Option<QueuePolicy>,
        tasks: TaskTracker,
    ) -> Self {
        Downlinks {
            prefix,
            devices,
            routes,
            edges,
            scripts,
            sink,
            metrics,
            handles,
            queue_policy,
            queue: Mutex::default(),
            tasks,
            hand_over: Mutex::default(),
            repeats: moka::sync::Cache::builder()
                .max_capacity(REPEATS_KEPT)
                // As long as a claim of one may be taken: a replay claims up to the
                // hand-over window and an answer's bound after the arrival.
                .time_to_idle(names::DOWNLINK_CLAIM_TTL + HAND_OVER_WINDOW + ANSWER_WITHIN)
                .build(),
        }
    }

    /// The claim a downlink is handled under, the same on every worker. A downlink with
    /// a message id (a command, an attribute set) is claimed by its content: a repeat is
    /// the same request again (a replay, a broker's redelivery) and is handled once.
    /// One without (a telemetry control, an attribute get) is claimed by its content and
    /// how many times it came before within a claim's lifetime: `{"switch":1}` sent
    /// twice within a minute is two requests, which a claim of the content alone would
    /// make one (the second silently passed by, as if another worker had it). Every
    /// worker sees the downlinks of a topic in the broker's order, so each numbers a
    /// given one alike. One that started in between (or missed one) numbers
    /// differently: so that this never costs a loss, the owner delivers one without a
    /// message id whatever its claim says, and only a hand-over's replay passes by one
    /// claimed (at worst a duplicate).
    fn claim_of(&self, parsed: &DownlinkTopic, downlink: &Downlink) -> String {
        let digest = claim_digest(&downlink.topic, &downlink.payload);
        if parsed.message_id.is_some() {
            return digest;
        }
        let before = self.repeats.get(&digest).unwrap_or(0);
        self.repeats.insert(digest.clone(), before + 1);
        // The first keeps the content's own claim, as before the count.
        if before == 0 { digest } else { format!("{digest}-{before}") }
    }

    /// Handles one downlink message from the broker, answering it within
    /// [`ANSWER_WITHIN`] of its arrival.
    pub async fn handle(self: &Arc<Self>, parsed: DownlinkTopic, downlink: Downlink) {
        // Its receive span is current (its lane runs this in it).
        let due = downlink.received + ANSWER_WITHIN;
        // Numbered on arrival, before anything waits: a topic's downlinks share a lane,
        // so they are numbered in the broker's order.
        let claim = self.claim_of(&parsed, &downlink);
        let Some(target) = self.resolve(&parsed, due).await else { return };
        let Some((target, downlink, claim)) = self.keep_unless_owned(target, downlink, claim) else {
            return;
        };
        self.handle_owned(parsed, target, downlink, &claim, false).await;
    }

    /// Handles a resolved downlink of this worker's.
    async fn handle_owned(
        self: &Arc<Self>,
        parsed: DownlinkTopic,
        target: Target,
        downlink: Downlink,
        claim: &str,
        replay: bool,
    ) {
        let Downlink { topic, payload, received, .. } = downlink;
        let due = received + ANSWER_WITHIN;
        // Claimed first: a successor replaying a hand-over must not handle it again. Not
        // cut off at `due` (the store bounds its own wait): one answered late here must
        // still hold its claim, or the old owner, thawed, would deliver it after all.
        let route = match self.routes.claim_and_route(claim, &target.carrier.id).await {
            ClaimAndRoute { claim: Ok(false), .. } if replay || parsed.message_id.is_some() => {
                self.count("claimed_elsewhere");
                return;
            }
            ClaimAndRoute { claim, route } => {
                // Without the store a duplicate is possible, a loss is not.
                if let Err(error) = claim {
                    debug!(error = %Chain(&error), "downlink not claimed; handling it anyway");
                }
                route_or_why(route)
            }
        };
        if self.join_queue(&target.carrier.id, &topic, &payload, received) {
            return;
        }
        let delivered = self.deliver(&parsed, &target, &payload, route, due).await;
        self.metrics.downlink_duration.observe(received.elapsed().as_secs_f64());
        match delivered {
            Ok(()) => self.count("delivered"),
            Err((Undelivered::Offline, _)) if self.queues(parsed.kind) => {
                self.enqueue(&target, &topic, payload)
            }
            Err((error, unreachable)) => self.undelivered(&parsed, &target, error, unreachable).await,
        }
    }

    /// The device a downlink is for; None when there is nothing more to do with it
    /// (answered, if this worker is the one to answer).
    async fn resolve(&self, parsed: &DownlinkTopic, due: Instant) -> Option<Target> {
        let resolved = tokio::time::timeout_at(due, self.devices.resolve(&parsed.device)).await;
        match resolved {
            Err(_) if (self.handles)(&parsed.device) => {
                self.answer(parsed, &parsed.device, Undelivered::Late).await;
                None
            }
            Err(_) => None,
            Ok(Ok(Some(target))) => Some(target),
            // Every worker may see the downlink; only one answers for a device no one
            // can resolve: the one that would own the reference as a device id.
            Ok(Ok(None)) if (self.handles)(&parsed.device) => {
                self.answer(parsed, &parsed.device, Undelivered::UnknownDevice).await;
                None
            }
            Ok(Err(error)) if (self.handles)(&parsed.device) => {
                self.answer(parsed, &parsed.device, Undelivered::OfflineBecause(Chain(&error).to_string()))
                    .await;
                None
            }
            Ok(Ok(None) | Err(_)) => None,
        }
    }

    /// Gives a downlink back if this worker handles its device; else keeps it for
    /// [`HAND_OVER_WINDOW`] (at most [`HAND_OVER_KEPT`] of them) in case the worker that
    /// owns the device's partition is gone and this one takes the partition over.
    ///
    /// Ownership is checked under the hand-over lock, which [`Downlinks::replay_hand_over`]
    /// takes once the partition is marked owned: either the check sees it owned, or the
    /// downlink is kept before the replay looks. Checked before the lock, a partition
    /// taken in between would be replayed without this downlink, which would then be
    /// kept, unhandled and unanswered, by the very worker that owns it.
    fn keep_unless_owned(
        &self,
        target: Target,
        mut downlink: Downlink,
        claim: String,
    ) -> Option<(Target, Downlink, String)> {
        let receive_span = {
            let mut kept = self.hand_over.lock().unwrap_or_else(|e| e.into_inner());
            if (self.handles)(&target.carrier.id) {
                return Some((target, downlink, claim));
            }
            let receive_span = std::mem::replace(&mut downlink.span, tracing::Span::none());
            let now = Instant::now();
            while kept.front().is_some_and(|(_, old, _)| now.duration_since(old.received) > HAND_OVER_WINDOW)
                || kept.len() >= HAND_OVER_KEPT
            {
                kept.pop_front();
            }
            kept.push_back((target, downlink, claim));
            receive_span
        };
        // Its receive span ends now, as another worker's: a replay is a trace of its own.
        // Counted so that an operator sees every worker takes every downlink.
        receive_span.record("tcpc.outcome", "not_owner");
        self.count("not_owner");
        None
    }

    /// This worker took partitions: the downlinks of their devices that arrived while
    /// another worker owned them are handled again here, each once across workers (by
    /// its claim), so that none is left unanswered when the owner died. Those past
    /// their answer's due time are answered "busy" at once. Called after the
    /// partitions are marked owned, so that a downlink being kept meanwhile is either
    /// found here or not kept at all (see [`Downlinks::keep_unless_owned`]).
    pub fn replay_hand_over(self: &Arc<Self>) {
        let mine: VecDeque<(Target, Downlink, String)> = {
            let mut kept = self.hand_over.lock().unwrap_or_else(|e| e.into_inner());
            let (mine, others) = std::mem::take(&mut *kept)
                .into_iter()
                .partition(|(target, _, _): &(Target, Downlink, String)| (self.handles)(&target.carrier.id));
            *kept = others;
            mine
        };
        if mine.is_empty() {
            return;
        }
        info!(downlinks = mine.len(), "replaying the downlinks of partitions taken over");
        let this = self.clone();
        self.tasks.spawn(async move {
            // Resolved when they arrived: their due time may be past, their device not.
            for (target, downlink, claim) in mine {
                if let Some(parsed) = topics::parse_downlink(&this.prefix, &downlink.topic) {
                    this.handle_owned(parsed, target, downlink, &claim, true).await;
                }
            }
        });
    }

    /// Answers a downlink that did not reach its device; then, if its edge pod could
    /// not be reached, purges the route of a dead pod (after the answer, which must not
    /// wait for the liveness check).
    async fn undelivered(
        &self,
        parsed: &DownlinkTopic,
        target: &Target,
        why: Undelivered,
        unreachable: Option<Route>,
    ) {
        self.answer(parsed, &target.device_id, why).await;
        if let Some(route) = unreachable {
            self.purge_if_dead(&route).await;
        }
    }

    fn count(&self, reason: &'static str) {
        self.metrics.downlinks.get_or_create(&ReasonLabel { reason }).inc();
    }

    fn queues(&self, kind: DownlinkKind) -> bool {
        self.queue_policy.as_ref().is_some_and(|policy| policy.kinds.contains(&kind))
    }

    /// The bytes the carrier's connection gets, and the TP CMD to frame them with.
    async fn encode(
        &self,
        parsed: &DownlinkTopic,
        target: &Target,
        payload: &[u8],
    ) -> Result<(Bytes, u32), Undelivered> {
        let device = &target.carrier;
        let json: Option<Json> = serde_json::from_slice(payload).ok();
        let custom = device.settings.protocol == Some(ProtocolChoice::Custom)
            || (device.settings.protocol.is_none() && device.settings.downlink_script.is_some());
        if custom {
            let (Some(script), Some(json)) = (&device.settings.downlink_script, json) else {
                // No script, or not JSON (the platform ran its own encode): as it is.
                return Ok((Bytes::copy_from_slice(payload), 0));
            };
            let mut message = shape_for_target(json, target);
            if let (Some(id), Json::Object(object)) = (&parsed.message_id, &mut message) {
                object.entry("message_id").or_insert_with(|| Json::String(id.clone()));
            }
            let context = CallContext {
                device_id: target.device_id.clone(),
                device_number: device.number.clone(),
                kind: parsed.kind.name().to_owned(),
                topic: format!("{}{}", self.prefix, parsed.kind.name()),
            };
            return match self.scripts.run(script, Call::Encode { message, context }).await {
                Ok(Output::Bytes(bytes)) => Ok((bytes.into(), 0)),
                Ok(Output::Json(_)) => Err(Undelivered::Script("encode returned no bytes".to_owned())),
                Err(error) => Err(Undelivered::Script(error.to_string())),
            };
        }
        let bytes = match json {
            Some(json) => {
                let json = with_message_id(shape_for_target(json, target), parsed.message_id.as_deref());
                Bytes::from(serde_json::to_vec(&json).expect("a JSON value always serializes"))
            }
            None => Bytes::copy_from_slice(payload),
        };
        Ok((bytes, parsed.kind.tp_cmd()))
    }

    /// Encodes and delivers along `route` (or says why there is none) by `due`; why
    /// not, and the route when its edge pod could not be reached.
    async fn deliver(
        &self,
        parsed: &DownlinkTopic,
        target: &Target,
        payload: &[u8],
        route: Result<Route, Undelivered>,
        due: Instant,
    ) -> Result<(), (Undelivered, Option<Route>)> {
        let span = tracing::debug_span!(
            "encode",
            "tcpc.downlink.kind" = parsed.kind.name(),
            "tcpc.device.id" = target.device_id.as_str(),
        );
        let encoded =
            tokio::time::timeout_at(due, self.encode(parsed, target, payload).instrument(span)).await;
        let (bytes, tp_cmd) = match encoded {
            Ok(Ok(encoded)) => encoded,
            Ok(Err(why)) => return Err((why, None)),
            Err(_) => return Err((Undelivered::Late, None)),
        };
        let route = route.map_err(|why| (why, None))?;
        let timeout = due.saturating_duration_since(Instant::now()).min(DELIVER_TIMEOUT);
        if timeout < MIN_DELIVER {
            return Err((Undelivered::Late, None));
        }
        match self.edges.deliver(&route, bytes, tp_cmd, timeout).await {
            Ok((DeliverStatus::Delivered, _)) => Ok(()),
            Ok((DeliverStatus::Offline, _)) => Err((Undelivered::Offline, None)),
            Ok((_, message)) => Err((Undelivered::Failed(message), None)),
            Err(error) => {
                let why =
                    Undelivered::OfflineBecause(format!("edge pod {} unreachable ({error})", route.pod));
                Err((why, Some(route)))
            }
        }
    }

    /// A route whose pod is gone counts as offline and is removed (compare-and-delete,
    /// so a newer route of the device is never touched).
    async fn purge_if_dead(&self, route: &Route) {
        if matches!(self.routes.pod_alive(&route.pod).await, Ok(false)) {
            // Its channel too: pod IPs are reused, and a dead pod's channel would only
            // hold its reconnect loop (and memory) for an address that is someone else's.
            self.edges.forget(&route.grpc_addr);
            match self.routes.purge(route).await {
                Ok(()) => info!(device_id = %route.device_id, pod = %route.pod, "route of a dead pod purged"),
                Err(error) => {
                    warn!(device_id = %route.device_id, error = %Chain(&error), "dead route not purged")
                }
            }
        }
    }

    /// Tells the platform at once that a downlink did not arrive (when it waits for an
    /// answer: commands and attribute sets).
    async fn answer(&self, parsed: &DownlinkTopic, device_id: &str, why: Undelivered) {
        self.count(match why {
            Undelivered::Offline | Undelivered::OfflineBecause(_) => "offline",
            Undelivered::UnknownDevice => "unknown_device",
            Undelivered::Busy | Undelivered::Late => "busy",
            Undelivered::Failed(_) | Undelivered::Script(_) => "failed",
        });
        info!(device = %parsed.device, kind = parsed.kind.name(), reason = %why, "downlink not delivered");
        let Some(message) = answer_message(parsed, device_id, &why) else { return };
        // Not awaited: the acknowledgement needs the broker connection, which may be
        // waiting for this very dispatcher to take the next downlink.
        if let Ok(delivered) = self.sink.publish(message, self.sink.epoch()).await {
            self.tasks.spawn(async move {
                if let Err(error) = delivered.await {
                    warn!(%error, "failure answer not acknowledged by the broker");
                }
            });
        }
    }

    fn enqueue(&self, target: &Target, topic: &str, payload: Bytes) {
        let mut queues = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queues.entry(target.carrier.id.clone()).or_default();
        self.push(queue, topic, payload, Instant::now());
    }

    /// Adds to a device's queue, within the policy's bounds.
    fn push(&self, queue: &mut DeviceQueue, topic: &str, payload: Bytes, received: Instant) {
        let Some(policy) = &self.queue_policy else { return };
        let before = queue.items.len();
        queue.items.retain(|queued| queued.expires > Instant::now());
        for _ in queue.items.len()..before {
            self.count("queue_expired");
        }
        if queue.items.len() >= policy.max {
            // Bounded: the oldest goes, as the newest matters most for state.
            queue.items.pop_front();
            self.count("queue_dropped");
        }
        let expires = Instant::now() + policy.ttl;
        queue.items.push_back(Queued { topic: topic.to_owned(), payload, received, expires });
        self.count("queued");
    }

    /// Whether the downlink joined its device's queue: it does whenever the device has
    /// one, so that it never overtakes what waits there (a flush is started if none
    /// runs; while the device is away it stops at the first downlink it cannot deliver).
    fn join_queue(self: &Arc<Self>, carrier: &str, topic: &str, payload: &Bytes, received: Instant) -> bool {
        let mut queues = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = queues.get_mut(carrier) else { return false };
        self.push(queue, topic, payload.clone(), received);
        if !std::mem::replace(&mut queue.flushing, true) {
            self.tasks.spawn(self.clone().flush(carrier.to_owned()));
        }
        true
    }

    /// A device came back: what was queued for it is delivered, in order.
    pub fn device_online(self: &Arc<Self>, device_id: &str) {
        let mut queues = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = queues.get_mut(device_id)
            && !std::mem::replace(&mut queue.flushing, true)
        {
            self.tasks.spawn(self.clone().flush(device_id.to_owned()));
        }
    }

    /// Delivers a device's queue front to back until it is empty (then the queue goes,
    /// and new downlinks are delivered directly again) or the device is away again (the
    /// rest waits for its return); expired ones are dropped. Only one flush per device
    /// runs at a time.
    async fn flush(self: Arc<Self>, carrier: String) {
        loop {
            let item = {
                let mut queues = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&carrier) else { return };
                match queue.items.pop_front() {
                    Some(item) => item,
                    None => {
                        queues.remove(&carrier);
                        return;
                    }
                }
            };
            let Some(parsed) = topics::parse_downlink(&self.prefix, &item.topic) else { continue };
            let queues_kind = self.queues(parsed.kind);
            if queues_kind && item.expires <= Instant::now() {
                self.count("queue_expired");
                continue;
            }
            // A queued kind has waited as long as its policy allows and gets a fresh
            // bound; another only waited for its turn and keeps its own.
            let due = if queues_kind { Instant::now() } else { item.received } + ANSWER_WITHIN;
            let Some(target) = self.resolve(&parsed, due).await else { continue };
            // Claimed when it arrived: the route alone.
            let route = tokio::time::timeout_at(due, self.routes.route(&target.carrier.id)).await;
            let route = route.map_or(Err(Undelivered::Late), route_or_why);
            let delivered = self.deliver(&parsed, &target, &item.payload, route, due).await;
            self.metrics.downlink_duration.observe(item.received.elapsed().as_secs_f64());
            match delivered {
                Ok(()) => self.count("delivered"),
                Err((Undelivered::Offline, _)) if queues_kind => {
                    let mut queues = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                    let queue = queues.entry(carrier).or_default();
                    queue.items.push_front(item);
                    queue.flushing = false;
                    return;
                }
                Err((error, unreachable)) => self.undelivered(&parsed, &target, error, unreachable).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use base64::Engine as _;
    use futures::future::BoxFuture;
    use serde_json::json;

    use crate::devices::{Device, DeviceKind};
    use crate::scripts::{EngineKind, Library, Limits};
    use crate::sink::{Delivered, Epoch, SinkError};
    use crate::source::FileDevices;

    /// A route store whose claims end as `claim` (None: the store failed), each after a
    /// round trip, and whose one route is `route`.
    struct Store {
        claim: Option<bool>,
        route: Option<Route>,
        /// Whether a claim was answered.
        claimed: AtomicBool,
    }

    impl Store {
        fn new(claim: Option<bool>, route: Option<Route>) -> Self {
            Store { claim, route, claimed: AtomicBool::new(false) }
        }
    }

    impl RouteLookup for Store {
        fn route<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<Route>, RouteLookupError>> {
            Box::pin(async { Ok(self.route.clone()) })
        }
        fn pod_alive<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<bool, RouteLookupError>> {
            Box::pin(async { Ok(true) })
        }
        fn purge<'a>(&'a self, _: &'a Route) -> BoxFuture<'a, Result<(), RouteLookupError>> {
            Box::pin(async { Ok(()) })
        }
        fn claim_and_route<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, ClaimAndRoute> {
            Box::pin(async {
                tokio::task::yield_now().await;
                self.claimed.store(true, Ordering::Relaxed);
                ClaimAndRoute {
                    claim: self.claim.ok_or(RouteLookupError::Timeout),
                    route: Ok(self.route.clone()),
                }
            })
        }
    }

    /// The platform's side: the answers' messages.
    #[derive(Default)]
    struct Answers(Mutex<Vec<String>>);

    impl PlatformSink for Answers {
        fn publish(&self, message: PlatformMessage, _: Epoch) -> BoxFuture<'_, Result<Delivered, SinkError>> {
            let envelope: Json = serde_json::from_slice(&message.payload).unwrap();
            let values = base64::engine::general_purpose::STANDARD
                .decode(envelope["values"].as_str().unwrap())
                .unwrap();
            let values: Json = serde_json::from_slice(&values).unwrap();
            self.0.lock().unwrap().push(values["message"].as_str().unwrap().to_owned());
            Box::pin(async {
                let acknowledged: Delivered = Box::pin(async { Ok(()) });
                Ok(acknowledged)
            })
        }
        fn epoch(&self) -> Epoch {
            0
        }
    }

    /// A worker's downlinks, for the one device d1, on `store`, handled by `handles`:
    /// with the answers it gives and its metrics.
    fn downlinks_on(
        store: Arc<Store>,
        handles: Arc<dyn Fn(&str) -> bool + Send + Sync>,
        tasks: TaskTracker,
    ) -> (Arc<Downlinks>, Arc<Answers>, Arc<Metrics>) {
        let devices = FileDevices::parse("[[device]]\ntoken = 't'\nid = 'd1'\nnumber = 'D1'\n").unwrap();
        let scripts = Scripts::start(EngineKind::Quickjs, Limits::default(), Library::new(None), 1).unwrap();
        let answers = Arc::new(Answers::default());
        let metrics = Arc::new(Metrics::new(&mut Default::default()));
        let downlinks = Arc::new(Downlinks::new(
            "plugin/TCP/".to_owned(),
            Arc::new(devices),
            store,
            Arc::default(),
            Arc::new(scripts),
            answers.clone(),
            metrics.clone(),
            handles,
            None,
            tasks,
        ));
        (downlinks, answers, metrics)
    }

    /// A command for the device d1, arrived `ago`.
    fn command(downlinks: &Downlinks, ago: Duration) -> (DownlinkTopic, Downlink) {
        let topic = "plugin/TCP/devices/command/D1/m1";
        let parsed = topics::parse_downlink(&downlinks.prefix, topic).unwrap();
        let mut downlink = Downlink::arrived(topic.to_owned(), Bytes::from_static(br#"{"method":"reboot"}"#));
        downlink.received -= ago;
        (parsed, downlink)
    }

    /// The reasons counted among `reasons`.
    fn counted(metrics: &Metrics, reasons: &[&'static str]) -> Vec<(&'static str, u64)> {
        reasons
            .iter()
            .map(|&reason| (reason, metrics.downlinks.get_or_create(&ReasonLabel { reason }).get()))
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// Handles one command for the device d1 on `store`, arrived `ago`: the answers, and
    /// the reasons counted.
    async fn command_on(store: Arc<Store>, ago: Duration) -> (Vec<String>, Vec<(&'static str, u64)>) {
        let (downlinks, answers, metrics) = downlinks_on(store, Arc::new(|_| true), TaskTracker::new());
        let (parsed, downlink) = command(&downlinks, ago);
        downlinks.handle(parsed, downlink).await;
        let counted = counted(&metrics, &["claimed_elsewhere", "offline", "busy", "delivered"]);
        let answered = std::mem::take(&mut *answers.0.lock().unwrap());
        (answered, counted)
    }

    #[tokio::test]
    async fn a_partition_taken_while_a_downlink_is_checked_replays_it() {
        // The lease loop marks the partition owned and replays its hand-over right
        // after the downlink's ownership check said "not owned" and before the downlink
        // is kept: the replay runs at once if the hand-over lock is free then, else
        // (the check is made under it) once the check and the keeping are done.
        let replay_waits = Arc::new(AtomicBool::new(false));
        let worker: Arc<std::sync::OnceLock<std::sync::Weak<Downlinks>>> = Arc::default();
        let owned = Arc::new(AtomicBool::new(false));
        let handles = {
            let (replay_waits, worker, owned) = (replay_waits.clone(), worker.clone(), owned.clone());
            Arc::new(move |_: &str| {
                let was_owned = owned.swap(true, Ordering::SeqCst);
                if !was_owned {
                    let downlinks = worker.get().and_then(std::sync::Weak::upgrade).expect("the worker");
                    match downlinks.hand_over.try_lock() {
                        Ok(free) => {
                            drop(free);
                            downlinks.replay_hand_over();
                        }
                        Err(_) => replay_waits.store(true, Ordering::SeqCst),
                    }
                }
                was_owned
            })
        };
        let tasks = TaskTracker::new();
        let store = Arc::new(Store::new(Some(true), None));
        let (downlinks, answers, metrics) = downlinks_on(store, handles, tasks.clone());
        worker.set(Arc::downgrade(&downlinks)).unwrap();
        let (parsed, downlink) = command(&downlinks, Duration::ZERO);
        downlinks.handle(parsed, downlink).await;
        if replay_waits.load(Ordering::SeqCst) {
            downlinks.replay_hand_over();
        }
        tasks.close();
        tasks.wait().await;
        // Handled here, by the replay: not left kept (the platform would wait for an
        // answer until the command aged out of the hand-over).
        assert_eq!(*answers.0.lock().unwrap(), ["device offline"]);
        assert_eq!(counted(&metrics, &["not_owner", "offline"]), [("not_owner", 1), ("offline", 1)]);
        assert!(downlinks.hand_over.lock().unwrap().is_empty(), "nothing left kept");
    }

    #[tokio::test]
    async fn a_delivery_follows_the_claim_taken_with_its_route() {
        // An edge pod this worker cannot reach: a delivery attempted answers so.
        let route = Route {
            device_id: "d1".into(),
            connection_id: "c1".into(),
            pod: "edge-x".into(),
            grpc_addr: "not an address".into(),
        };
        let unreachable = "device offline: edge pod edge-x unreachable";

        // Another worker's claim: not handled here, not answered.
        let store = Arc::new(Store::new(Some(false), Some(route.clone())));
        let (answered, counted) = command_on(store, Duration::ZERO).await;
        assert_eq!((answered, counted), (vec![], vec![("claimed_elsewhere", 1)]));

        // The claim failed (the store, or its node on a cluster): delivered anyway.
        let store = Arc::new(Store::new(None, Some(route.clone())));
        let (answered, counted) = command_on(store, Duration::ZERO).await;
        assert!(answered.len() == 1 && answered[0].starts_with(unreachable), "{answered:?}");
        assert_eq!(counted, [("offline", 1)]);

        // Claimed, and no route: offline at once.
        let store = Arc::new(Store::new(Some(true), None));
        let (answered, counted) = command_on(store, Duration::ZERO).await;
        assert_eq!((answered, counted), (vec!["device offline".to_owned()], vec![("offline", 1)]));

        // Past its answer's due time (a hand-over's replay): answered late, and claimed
        // all the same, so that the worker it was handed over from never delivers it.
        let store = Arc::new(Store::new(Some(true), Some(route)));
        let (answered, counted) = command_on(store.clone(), ANSWER_WITHIN * 2).await;
        assert_eq!((answered, counted), (vec!["not delivered in time".to_owned()], vec![("busy", 1)]));
        assert!(store.claimed.load(Ordering::Relaxed), "the claim was taken");
    }

    #[test]
    fn payloads_for_the_device() {
        let sub = Target {
            carrier: Arc::new(Device {
                id: "gw".into(),
                number: "G001".into(),
                voucher_digest: String::new(),
                kind: DeviceKind::Gateway,
                sub_devices: vec![],
                settings: Default::default(),
            }),
            device_id: "sub".into(),
            sub_address: Some("3c20c6206".into()),
        };
        assert_eq!(
            shape_for_target(json!({"interval": 30}), &sub),
            json!({"sub_device_data": {"3c20c6206": {"interval": 30}}})
        );
        let wrapped = json!({"sub_device_data": {"3c20c6206": {"interval": 30}}});
        assert_eq!(shape_for_target(wrapped.clone(), &sub), wrapped);
        let framed = with_message_id(json!({"method": "reboot", "params": {"delay": 5}}), Some("4d5e"));
        assert_eq!(
            serde_json::to_string(&framed).unwrap(),
            r#"{"message_id":"4d5e","method":"reboot","params":{"delay":5}}"#
        );
        assert_eq!(with_message_id(json!([1, 2]), Some("x")), json!([1, 2]));
    }
}
