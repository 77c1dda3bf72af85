//! The uplink bus: where an edge publishes envelopes and asks who a device is.
//!
//! [`UplinkBus`] is the seam the all-in-one swaps (in-process bus instead of NATS);
//! [`NatsBus`] is JetStream for envelopes (durable, de-duplicated by message id) and
//! NATS request/reply to a worker queue group for authentication.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::future::BoxFuture;
use prost::Message as _;
use tcpc_proto::names;
use tcpc_proto::v1::{AuthReply, AuthRequest};

/// Resolves once the bus has stored the envelope durably.
pub type AckFuture = BoxFuture<'static, Result<(), BusError>>;

/// A bus step failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("publish uplink: {0}")]
    Publish(String),
    #[error("uplink not acknowledged: {0}")]
    Ack(String),
    #[error("authentication request: {0}")]
    Authenticate(String),
    #[error("authentication reply: {0}")]
    DecodeReply(#[from] prost::DecodeError),
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
    fn is_ready(&self) -> bool;
}

/// NATS: JetStream for envelopes, request/reply for auth.
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The stream exists (ensured once at start, retried until it does).
    stream_ready: AtomicBool,
    /// The last publish failed to be acknowledged; cleared by the next success.
    failing: Arc<AtomicBool>,
}

impl NatsBus {
    /// Connects in the background: the edge starts and stays up while NATS is down,
    /// refusing connections until it is back (see [`UplinkBus::is_ready`]).
    ///
    /// # Errors
    /// The URL is invalid.
    pub async fn connect(url: &str, publish_timeout: Duration) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("tcpc-edge-gateway")
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| BusError::Publish(format!("connect to {url}: {e}")))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(publish_timeout)
            // Every connection's in-flight window shares this budget; a full budget makes
            // publishes wait, which stops socket reads (back-pressure), never drops.
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(NatsBus {
            client,
            jetstream,
            stream_ready: AtomicBool::new(false),
            failing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Creates the uplink stream if it does not exist, retrying until it does or
    /// `shutdown` fires.
    pub async fn ensure_stream(&self, shutdown: &tokio_util::sync::CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            match tcpc_proto::stream::ensure_uplink_stream(&self.jetstream).await {
                Ok(_) => {
                    self.stream_ready.store(true, Ordering::Release);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "uplink stream not available yet; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
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
            tcpc_proto::trace::inject(&opentelemetry::Context::current(), |name, value| {
                message = std::mem::take(&mut message).header(name, value.as_str());
            });
            let ack = self
                .jetstream
                .send_publish(subject, message)
                .await
                .map_err(|e| BusError::Publish(e.to_string()))?;
            let failing = self.failing.clone();
            let ack: AckFuture = Box::pin(async move {
                let result = ack.await.map(drop).map_err(|e| BusError::Ack(e.to_string()));
                failing.store(result.is_err(), Ordering::Relaxed);
                result
            });
            Ok(ack)
        })
    }

    fn authenticate(
        &self,
        request: AuthRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<AuthReply, BusError>> {
        Box::pin(async move {
            let request =
                async_nats::Request::new().payload(request.encode_to_vec().into()).timeout(Some(timeout));
            let reply = self
                .client
                .send_request(names::AUTH_SUBJECT, request)
                .await
                .map_err(|e| BusError::Authenticate(e.to_string()))?;
            Ok(AuthReply::decode(reply.payload)?)
        })
    }

    fn is_ready(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && self.stream_ready.load(Ordering::Acquire)
            && !self.failing.load(Ordering::Relaxed)
    }
}
