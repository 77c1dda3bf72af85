//! The uplink bus: where an edge publishes envelopes and asks who a device is.
//!
//! [`UplinkBus`] is the seam the all-in-one swaps (in-process bus instead of NATS);
//! [`NatsBus`] is JetStream for envelopes (durable, de-duplicated by message id) and
//! NATS request/reply to a worker queue group for authentication.
//!
//! - [`linger`]: publishes handed to the NATS client in bursts.

mod linger;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::BoxFuture;
use linger::Linger;
use prost::Message as _;
use tcpc_proto::names;
use tcpc_proto::stream::StreamCheck;
use tcpc_proto::v1::{AuthReply, AuthRequest};
use tokio::time::Instant;

/// Resolves once the bus has stored the envelope durably.
pub type AckFuture = BoxFuture<'static, Result<(), BusError>>;

/// Any error of the bus's client library, kept as the source.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A bus step failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("NATS URL: {0}")]
    Url(#[source] tcpc_proto::connect::UrlError),
    #[error("connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error("publish uplink: {0}")]
    Publish(#[source] SourceError),
    #[error("uplink not acknowledged: {0}")]
    Ack(#[source] SourceError),
    #[error("authentication request: {0}")]
    Authenticate(#[source] SourceError),
    #[error("authentication reply: {0}")]
    DecodeReply(#[source] prost::DecodeError),
    #[error("flush before exit: {0}")]
    Flush(#[source] SourceError),
    #[error("the bus is closed")]
    Closed,
}

/// Where edges put uplink envelopes and ask for authentication.
pub trait UplinkBus: Send + Sync + 'static {
    /// Queues one envelope on `subject`; returns once it is on its way, with a future
    /// that resolves when the bus has stored it. Envelopes of one caller reach the bus
    /// in call order. Publishing the same `message_id` again stores it once.
    fn publish(
        &self,
        subject: String,
        message_id: String,
        envelope: Bytes,
    ) -> BoxFuture<'_, Result<AckFuture, BusError>>;

    /// Asks a worker whether an AccessToken is a device, waiting at most `timeout`.
    fn authenticate(
        &self,
        request: AuthRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<AuthReply, BusError>>;

    /// Whether publishes can succeed now; new connections are refused while not.
    /// Follows the live state of the bus, never one past failure: it must recover by
    /// itself when the bus does, whether or not anything is published.
    fn is_ready(&self) -> bool;

    /// Hands everything published so far to the bus before the process exits.
    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }
}

/// How often a ready bus checks that JetStream still has the uplink stream.
const STREAM_PROBE: Duration = Duration::from_secs(5);

/// When JetStream last acknowledged a publish of this pod's: proof that the stream is
/// there and taking envelopes, whatever a probe says meanwhile.
pub(super) struct LastAck {
    epoch: Instant,
    /// Milliseconds since `epoch`, plus one (0: never).
    at: AtomicU64,
}

impl LastAck {
    pub(super) fn new() -> Self {
        LastAck { epoch: Instant::now(), at: AtomicU64::new(0) }
    }

    pub(super) fn record(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.at.store(ms + 1, Ordering::Relaxed);
    }

    fn within(&self, window: Duration) -> bool {
        match self.at.load(Ordering::Relaxed) {
            0 => false,
            at => self.epoch + Duration::from_millis(at - 1) + window >= Instant::now(),
        }
    }
}

/// NATS: JetStream for envelopes, request/reply for auth.
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Where envelopes go: to `jetstream`, in bursts.
    linger: Linger,
    /// The uplink stream as this pod creates it.
    stream: StreamCheck,
    /// JetStream answered the last probe and has the uplink stream.
    stream_ready: AtomicBool,
    /// Deadline of one probe.
    probe_timeout: Duration,
    last_ack: Arc<LastAck>,
}

impl NatsBus {
    /// Connects in the background to `urls` (one server, or several of a cluster,
    /// comma-separated): the edge starts and stays up while NATS is down, refusing
    /// connections until it is back (see [`UplinkBus::is_ready`]). The uplink stream is
    /// created with `stream` unless it exists. Envelopes are held up to `linger` to go
    /// out in bursts (see [`linger`]).
    ///
    /// # Errors
    /// A URL is invalid.
    pub async fn connect(
        urls: &str,
        publish_timeout: Duration,
        linger: Duration,
        stream: tcpc_proto::stream::StreamSettings,
    ) -> Result<Self, BusError> {
        let servers = tcpc_proto::connect::nats_servers(urls).map_err(BusError::Url)?;
        let client = async_nats::ConnectOptions::new()
            .name("tcpc-edge-gateway")
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .map_err(BusError::Connect)?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(publish_timeout)
            // Every connection's in-flight window shares this budget; a full budget makes
            // publishes wait, which stops socket reads (back-pressure), never drops.
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let last_ack = Arc::new(LastAck::new());
        Ok(NatsBus {
            client,
            linger: Linger::spawn(jetstream.clone(), linger, last_ack.clone()),
            jetstream,
            stream: StreamCheck::new(tcpc_proto::stream::uplink_stream_config(stream)),
            stream_ready: AtomicBool::new(false),
            probe_timeout: publish_timeout,
            last_ack,
        })
    }

    /// Probes JetStream until `shutdown`: the uplink stream is created if it is missing
    /// (a NATS restarted without its storage), checked if not (one this edge cannot work
    /// with counts as unavailable), and readiness follows the answer. A
    /// probe every few seconds, backing off (jittered) while JetStream does not answer.
    ///
    /// A probe that times out or fails while JetStream acknowledged one of this pod's
    /// publishes within the last probe period leaves the bus ready: JetStream's API
    /// answers behind the publishes of a burst (a mass reconnect, each closing session's
    /// offline event), and refusing every device then would turn a slow answer into an
    /// outage. A stream this edge cannot work with is unavailable whatever the acks.
    pub async fn keep_stream(&self, shutdown: &tokio_util::sync::CancellationToken) {
        let mut backoff =
            tcpc_proto::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let probe = self.stream.ensure(&self.jetstream);
            let answer = match tokio::time::timeout(self.probe_timeout, probe).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error @ tcpc_proto::stream::StreamError::Incompatible { .. })) => {
                    Err(error.to_string())
                }
                _ if self.last_ack.within(STREAM_PROBE) => {
                    tracing::debug!("stream probe failed or timed out while publishes are acknowledged");
                    Ok(())
                }
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("timed out".to_owned()),
            };
            let delay = match answer {
                Ok(()) => {
                    if !self.stream_ready.swap(true, Ordering::AcqRel) {
                        tracing::info!("uplink stream available");
                    }
                    backoff.reset();
                    tcpc_proto::backoff::jitter(STREAM_PROBE)
                }
                Err(error) => {
                    if self.stream_ready.swap(false, Ordering::AcqRel) || backoff.is_reset() {
                        tracing::warn!(%error, "uplink stream not available; refusing new connections");
                    }
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl UplinkBus for NatsBus {
    fn publish(
        &self,
        subject: String,
        message_id: String,
        envelope: Bytes,
    ) -> BoxFuture<'_, Result<AckFuture, BusError>> {
        Box::pin(async move {
            let mut message = PublishMessage::build().payload(envelope).message_id(message_id);
            // The publish span's context (current: the caller instruments this call).
            tcpc_proto::trace::inject(&tcpc_proto::trace::current(), |name, value| {
                message = std::mem::take(&mut message).header(name, value.as_str());
            });
            self.linger.publish(subject, message).await
        })
    }

    fn authenticate(
        &self,
        request: AuthRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<AuthReply, BusError>> {
        Box::pin(async move {
            let mut request =
                async_nats::Request::new().payload(request.encode_to_vec().into()).timeout(Some(timeout));
            // The authentication span's context (the caller instruments this call).
            if let Some(headers) = tcpc_proto::trace::nats_headers() {
                request = request.headers(headers);
            }
            let reply = self
                .client
                .send_request(names::AUTH_SUBJECT, request)
                .await
                .map_err(|e| BusError::Authenticate(e.into()))?;
            AuthReply::decode(reply.payload).map_err(BusError::DecodeReply)
        })
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && self.stream_ready.load(Ordering::Acquire)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            self.linger.sent().await?;
            self.client.flush().await.map_err(|e| BusError::Flush(e.into()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_publish_acknowledged_within_the_window_is_proof_and_then_ages_out() {
        let last_ack = LastAck::new();
        assert!(!last_ack.within(STREAM_PROBE), "no ack yet");
        tokio::time::sleep(Duration::from_secs(60)).await;
        last_ack.record();
        assert!(last_ack.within(STREAM_PROBE));
        tokio::time::sleep(STREAM_PROBE).await;
        assert!(last_ack.within(STREAM_PROBE), "the window's edge counts");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!last_ack.within(STREAM_PROBE), "too old to vouch for the stream");
    }
}
