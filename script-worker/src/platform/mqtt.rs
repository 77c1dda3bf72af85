//! The platform broker connection: publishes at QoS 1, each acknowledged only when the
//! broker's PUBACK for its packet id arrives.
//!
//! rumqttc's `publish()` returns when the request is queued, not delivered. So one task
//! owns the event loop: publishes are handed to the client in order, each
//! `Outgoing::Publish(pkid)` event (emitted in the same order) names the packet id of
//! the oldest unnamed publish, and `Incoming::PubAck(pkid)` completes it. When the
//! connection breaks, every unacknowledged publish fails (the caller does not ack its
//! source, which redelivers) and a fresh client is built, so that no stale request of
//! the old one can be confused with a new one.
//!
//! The event loop never awaits anyone downstream: a downlink goes to the dispatcher
//! with `try_send`, and when the dispatcher's queue is full it is refused at once (the
//! subscription's [`Refusal`] makes the "busy" answer, which the loop publishes
//! itself). Awaiting the dispatcher there deadlocked: the dispatcher waits for room in
//! this loop's request queue to publish its answers, while the loop waited for room in
//! the dispatcher's. A loop that stops turning while work waits for it is reported by
//! [`MqttSink::is_ready`].
//!
//! The downlink subscription counts only once the broker granted it: a SUBACK that
//! refuses it (an ACL, a broker policy) leaves the worker deaf to downlinks, so it is
//! counted, logged, makes the sink not ready and is asked again with back-off.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use secrecy::{ExposeSecret, SecretString};
use tcpc_proto::backoff::Backoff;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::sink::{Delivered, Epoch, PlatformMessage, PlatformSink, SinkError};

/// Publishes handed to the client and not yet acknowledged, at most. Below rumqttc's
/// request channel capacity, so that handing one over never waits.
const IN_FLIGHT: usize = 512;
/// The largest MQTT packet either way (the platform broker's default limit is larger).
pub const MAX_PACKET: usize = 1 << 20;
/// Fixed header, topic length and packet id of a PUBLISH, at most.
const PUBLISH_OVERHEAD: usize = 5 + 2 + 2;

/// Why the broker would refuse `message`, found before it is sent: a refused topic or
/// an over-size packet closes the connection (mosquitto disconnects the client;
/// rumqttc fails its event loop), which looked like an outage and was retried forever.
///
/// # Errors
/// [`SinkError::Refused`] with the reason.
pub fn check(message: &PlatformMessage) -> Result<(), SinkError> {
    let topic = &message.topic;
    if topic.is_empty() || topic.len() > usize::from(u16::MAX) {
        return Err(SinkError::Refused("topic empty or over 65535 bytes"));
    }
    // Wildcards are for subscriptions; NUL is not allowed in MQTT strings.
    if topic.contains(['+', '#', '\0']) {
        return Err(SinkError::Refused("topic with a wildcard or NUL"));
    }
    if topic.len() + message.payload.len() + PUBLISH_OVERHEAD > MAX_PACKET {
        return Err(SinkError::Refused("message over the MQTT packet limit"));
    }
    Ok(())
}

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: String,
    /// Shown as `[REDACTED]` by Debug.
    pub password: SecretString,
}

impl MqttConfig {
    /// Reads `mqtt://host:port` (the port defaults to 1883; `tcp://` is accepted too).
    ///
    /// # Errors
    /// Not a URL, another scheme, or no host.
    pub fn from_url(
        url: &str,
        client_id: &str,
        username: &str,
        password: SecretString,
    ) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("MQTT URL {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "mqtt" | "tcp") {
            return Err(format!(
                "MQTT URL {url:?}: use mqtt://host:port (TLS is not supported; the platform broker is local)"
            ));
        }
        let host = parsed.host_str().filter(|host| !host.is_empty());
        let host = host.ok_or_else(|| format!("MQTT URL {url:?}: no host"))?;
        Ok(MqttConfig {
            // `[::1]` as a URL host, `::1` as a socket address.
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: parsed.port().unwrap_or(1883),
            client_id: client_id.to_owned(),
            username: username.to_owned(),
            password,
        })
    }

    fn options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(&self.client_id, &self.host, self.port);
        options
            .set_credentials(&self.username, self.password.expose_secret())
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(IN_FLIGHT as u16)
            .set_request_channel_capacity(IN_FLIGHT * 2)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        options
    }
}

/// How long a shutdown waits for the DISCONNECT to be written.
pub const DISCONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// How long the event loop may go without a turn while requests wait for it before
/// the sink stops counting as ready.
const STALL: Duration = Duration::from_secs(5);

/// One downlink from the broker, and when it arrived (its answer is due within a bound
/// from then).
#[derive(Debug)]
pub struct Downlink {
    pub topic: String,
    pub payload: bytes::Bytes,
    pub received: Instant,
}

/// The answer to a downlink the dispatcher has no room for, if its topic wants one.
pub type Refusal = Arc<dyn Fn(&str) -> Option<PlatformMessage> + Send + Sync>;

/// Where downlinks from the broker go: the topic filter subscribed at QoS 1 (again on
/// every connection), the dispatcher's bounded queue, what to answer when it is full,
/// and where the broker's refusals of the subscription are counted.
pub struct Subscription {
    pub filter: String,
    pub deliveries: mpsc::Sender<Downlink>,
    pub refuse: Refusal,
    pub refusals: Refusals,
}

/// Where refusals of the subscription are counted (a metric of the worker's).
pub type Refusals = prometheus_client::metrics::counter::Counter;

/// How soon a refused (or unsent) subscription is asked again, first and at most.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(500);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(10);

struct Request {
    message: PlatformMessage,
    epoch: Epoch,
    done: oneshot::Sender<Result<(), SinkError>>,
}

/// The platform broker as a sink.
pub struct MqttSink {
    requests: mpsc::Sender<Request>,
    connected: Arc<AtomicBool>,
    /// With a subscription: whether the broker granted it on this connection.
    subscribed: Option<Arc<AtomicBool>>,
    /// Milliseconds from `started` to the event loop's last turn.
    last_turn: Arc<AtomicU64>,
    started: Instant,
    /// Raised on every lost connection.
    epoch: Arc<AtomicU64>,
}

impl MqttSink {
    /// Starts the connection task on `tasks`; it reconnects until `shutdown`, then
    /// sends DISCONNECT (within [`DISCONNECT_DEADLINE`]) and ends. With a subscription,
    /// downlinks flow to it; while its queue is full, they are refused.
    pub fn start(
        config: MqttConfig,
        subscription: Option<Subscription>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let (requests, queue) = mpsc::channel(IN_FLIGHT);
        let connected = Arc::new(AtomicBool::new(false));
        let (last_turn, started) = (Arc::new(AtomicU64::new(0)), Instant::now());
        let progress = Progress { last_turn: last_turn.clone(), started };
        let subscribed = subscription.as_ref().map(|_| Arc::new(AtomicBool::new(false)));
        let epoch = Arc::new(AtomicU64::new(0));
        let state = State {
            connected: connected.clone(),
            subscribed: subscribed.clone(),
            progress,
            epoch: epoch.clone(),
        };
        tasks.spawn(run(config, queue, subscription, state, shutdown));
        MqttSink { requests, connected, subscribed, last_turn, started, epoch }
    }

    /// Readiness: the broker connection is up, the downlink subscription (if any)
    /// granted, and the event loop makes progress (it turned lately, or nothing waits
    /// for it).
    pub fn is_ready(&self) -> bool {
        let idle = self.requests.capacity() == self.requests.max_capacity();
        let last_turn = Duration::from_millis(self.last_turn.load(Ordering::Relaxed));
        let turning = self.started.elapsed().saturating_sub(last_turn) < STALL;
        let subscribed = self.subscribed.as_ref().is_none_or(|subscribed| subscribed.load(Ordering::Relaxed));
        self.connected.load(Ordering::Relaxed) && subscribed && (idle || turning)
    }
}

/// What the connection task shares with [`MqttSink`].
struct State {
    connected: Arc<AtomicBool>,
    subscribed: Option<Arc<AtomicBool>>,
    progress: Progress,
    epoch: Arc<AtomicU64>,
}

impl State {
    fn set_subscribed(&self, granted: bool) {
        if let Some(subscribed) = &self.subscribed {
            subscribed.store(granted, Ordering::Relaxed);
        }
    }
}

/// Where the event loop records its turns.
struct Progress {
    last_turn: Arc<AtomicU64>,
    started: Instant,
}

impl Progress {
    fn turn(&self) {
        self.last_turn.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl PlatformSink for MqttSink {
    fn epoch(&self) -> Epoch {
        self.epoch.load(Ordering::Acquire)
    }

    fn publish(&self, message: PlatformMessage, epoch: Epoch) -> BoxFuture<'_, Result<Delivered, SinkError>> {
        Box::pin(async move {
            let (done, acked) = oneshot::channel();
            self.requests.send(Request { message, epoch, done }).await.map_err(|_| SinkError::Stopped)?;
            let delivered: Delivered =
                Box::pin(async move { acked.await.unwrap_or(Err(SinkError::ConnectionLost)) });
            Ok(delivered)
        })
    }
}

/// One connection's bookkeeping.
struct Connection {
    client: AsyncClient,
    events: EventLoop,
    /// Handed to the client, packet id not yet known; in hand-over order.
    unnamed: VecDeque<oneshot::Sender<Result<(), SinkError>>>,
    /// Waiting for PUBACK, by packet id.
    in_flight: HashMap<u16, oneshot::Sender<Result<(), SinkError>>>,
}

impl Connection {
    fn new(config: &MqttConfig) -> Self {
        let (client, mut events) = AsyncClient::new(config.options(), IN_FLIGHT * 2);
        // No Nagle: PUBACKs and downlinks are small and latency-bound.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        events.set_network_options(network);
        Connection { client, events, unnamed: VecDeque::new(), in_flight: HashMap::new() }
    }

    fn pending(&self) -> usize {
        self.unnamed.len() + self.in_flight.len()
    }

    /// Publishes the refusal of a downlink, when its topic wants an answer and the
    /// client has room (its request queue is twice [`IN_FLIGHT`], so a refusal never
    /// takes the room of an uplink). Nobody waits for its PUBACK, but it takes its
    /// place in `unnamed` so that packet ids still match.
    fn refuse(&mut self, refuse: &Refusal, topic: &str) {
        let Some(answer) = refuse(topic) else { return };
        if self.pending() >= IN_FLIGHT * 2 - 1 {
            warn!(%topic, "downlink refused with no room to answer it");
            return;
        }
        match self.client.try_publish(answer.topic, QoS::AtLeastOnce, false, answer.payload) {
            Ok(()) => self.unnamed.push_back(oneshot::channel().0),
            Err(error) => warn!(%error, "refusal of a downlink not sent"),
        }
    }

    /// Drives the event loop until the DISCONNECT queued after everything else was
    /// written (rumqttc reports it after the flush) or the connection ended; PUBACKs
    /// arriving meanwhile still complete their publishes.
    async fn until_disconnected(&mut self) {
        loop {
            match self.events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(event) => self.note(event),
            }
        }
    }

    /// Matches publishes to packet ids and PUBACKs to publishes.
    fn note(&mut self, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(done) = self.unnamed.pop_front() {
                    self.in_flight.insert(pkid, done);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(done) = self.in_flight.remove(&ack.pkid) {
                    let _ = done.send(Ok(()));
                }
            }
            _ => {}
        }
    }

    fn fail_all(&mut self) {
        for done in self.unnamed.drain(..).chain(self.in_flight.drain().map(|(_, done)| done)) {
            let _ = done.send(Err(SinkError::ConnectionLost));
        }
    }
}

/// Asks for the downlink subscription; when it could not even be sent, when to ask again.
fn subscribe(client: &AsyncClient, subscription: &Subscription, backoff: &mut Backoff) -> Option<Instant> {
    let error = client.try_subscribe(&subscription.filter, QoS::AtLeastOnce).err()?;
    let retry_in = backoff.next_delay();
    warn!(%error, filter = %subscription.filter, ?retry_in, "downlink subscription not sent");
    Some(Instant::now() + retry_in)
}

async fn run(
    config: MqttConfig,
    mut queue: mpsc::Receiver<Request>,
    subscription: Option<Subscription>,
    state: State,
    shutdown: CancellationToken,
) {
    let State { connected, progress, .. } = &state;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut resubscribe_backoff = Backoff::new(RESUBSCRIBE_FIRST, RESUBSCRIBE_MAX);
    // When to ask again for a subscription the broker refused (or that was not sent).
    let mut resubscribe: Option<Instant> = None;
    let mut connection = Connection::new(&config);
    loop {
        progress.turn();
        let accepting = connection.pending() < IN_FLIGHT;
        tokio::select! {
            _ = shutdown.cancelled() => {
                // A clean end: the broker sees DISCONNECT, not a dropped socket (which
                // it would report as a failure, and answer with a will if one were set).
                if connected.swap(false, Ordering::Relaxed) && connection.client.try_disconnect().is_ok() {
                    let sent = tokio::time::timeout(DISCONNECT_DEADLINE, connection.until_disconnected()).await;
                    if sent.is_err() {
                        warn!("DISCONNECT not written within {DISCONNECT_DEADLINE:?}");
                    }
                }
                connection.fail_all();
                return;
            }
            request = queue.recv(), if accepting => {
                let Some(Request { message, epoch, done }) = request else { return };
                if epoch != state.epoch.load(Ordering::Acquire) {
                    // Queued for a connection that is gone: its batch is retried whole.
                    let _ = done.send(Err(SinkError::ConnectionLost));
                    continue;
                }
                if let Err(refused) = check(&message) {
                    let _ = done.send(Err(refused));
                    continue;
                }
                match connection.client.try_publish(message.topic, QoS::AtLeastOnce, false, message.payload) {
                    Ok(()) => connection.unnamed.push_back(done),
                    // Not a full queue (`accepting` keeps room) nor a topic (checked):
                    // the client's event loop is gone with its connection.
                    Err(_) => { let _ = done.send(Err(SinkError::ConnectionLost)); }
                }
            }
            _ = tokio::time::sleep_until(resubscribe.unwrap_or_else(Instant::now)), if resubscribe.is_some() => {
                resubscribe = subscription
                    .as_ref()
                    .and_then(|subscription| subscribe(&connection.client, subscription, &mut resubscribe_backoff));
            }
            event = connection.events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    connected.store(true, Ordering::Relaxed);
                    state.set_subscribed(false);
                    info!(broker = %format!("{}:{}", config.host, config.port), "connected to the platform broker");
                    resubscribe = subscription
                        .as_ref()
                        .and_then(|subscription| subscribe(&connection.client, subscription, &mut resubscribe_backoff));
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let Some(subscription) = &subscription else { continue };
                    if ack.return_codes.iter().all(|code| matches!(code, rumqttc::SubscribeReasonCode::Success(_))) {
                        resubscribe_backoff.reset();
                        state.set_subscribed(true);
                        info!(filter = %subscription.filter, "downlink subscription granted");
                    } else {
                        subscription.refusals.inc();
                        state.set_subscribed(false);
                        let retry_in = resubscribe_backoff.next_delay();
                        tracing::error!(filter = %subscription.filter, ?retry_in,
                            "downlink subscription refused by the broker; no downlinks until it is granted");
                        resubscribe = Some(Instant::now() + retry_in);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(subscription) = &subscription {
                        let downlink =
                            Downlink { topic: publish.topic, payload: publish.payload, received: Instant::now() };
                        // Never `send().await` here (see the module doc): a full queue refuses.
                        if let Err(error) = subscription.deliveries.try_send(downlink) {
                            connection.refuse(&subscription.refuse, &error.into_inner().topic);
                        }
                    }
                }
                Ok(event) => connection.note(event),
                Err(error) => {
                    connected.store(false, Ordering::Relaxed);
                    state.epoch.fetch_add(1, Ordering::AcqRel);
                    state.set_subscribed(false);
                    // Asked again on the next connection's CONNACK.
                    resubscribe = None;
                    let retry_in = backoff.next_delay();
                    warn!(%error, ?retry_in, "platform broker connection failed");
                    connection.fail_all();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                    connection = Connection::new(&config);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let config = MqttConfig::from_url("mqtt://broker:1884", "id", "plugin", "pw".into()).unwrap();
        assert_eq!((config.host.as_str(), config.port), ("broker", 1884));
        assert_eq!(MqttConfig::from_url("mqtt://broker", "id", "u", "p".into()).unwrap().port, 1883);
        assert!(MqttConfig::from_url("mqtts://broker", "id", "u", "p".into()).is_err());
        assert!(MqttConfig::from_url("mqtt://:1883", "id", "u", "p".into()).is_err());
        assert!(MqttConfig::from_url("broker:1883", "id", "u", "p".into()).is_err());
        let v6 = MqttConfig::from_url("tcp://[::1]:1885/", "id", "u", "p".into()).unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 1885));
        let shown = format!("{config:?}");
        assert!(!shown.contains("pw") && shown.contains("REDACTED"), "{shown}");
    }

    #[test]
    fn topics_and_sizes_the_broker_would_refuse() {
        let message = |topic: &str, size: usize| PlatformMessage {
            topic: topic.to_owned(),
            payload: bytes::Bytes::from(vec![b'x'; size]),
        };
        assert_eq!(check(&message("devices/command/response/m1", 10)), Ok(()));
        for topic in ["devices/command/response/#", "devices/event/+", "devices/event/a\0b", ""] {
            assert_eq!(
                check(&message(topic, 10)).map_err(|e| e.is_permanent()),
                Err(true),
                "{topic:?} refused"
            );
        }
        assert_eq!(
            check(&message(&"a".repeat(70_000), 0)),
            Err(SinkError::Refused("topic empty or over 65535 bytes"))
        );
        let topic = "devices/telemetry";
        let fits = MAX_PACKET - topic.len() - PUBLISH_OVERHEAD;
        assert_eq!(check(&message(topic, fits)), Ok(()));
        assert_eq!(
            check(&message(topic, fits + 1)),
            Err(SinkError::Refused("message over the MQTT packet limit"))
        );
    }
}
