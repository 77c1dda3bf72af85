//! Dead letters: envelopes that can never be delivered (a topic the broker refuses, an
//! output over the MQTT packet limit, a script that fails on them, a message id that
//! cannot be a topic level). They go, with their reason, to the JetStream stream
//! [`names::DEAD_LETTER_STREAM`] and are then acknowledged on the uplink stream: one bad
//! frame must never stall its partition (DESIGN.md, failure rules), nor be lost
//! silently. The all-in-one without NATS has nowhere durable to keep them: it logs them.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::future::BoxFuture;
use tcpc_proto::names;
use tcpc_proto::stream::{StreamCheck, StreamError};
use tokio::sync::OnceCell;
use tracing::error;

/// Deadline of the dead-letter publish and its acknowledgement.
const DEADLINE: Duration = Duration::from_secs(5);

/// A dead letter was not kept; the envelope stays unacknowledged and is retried.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("create the dead-letter stream: {0}")]
    Stream(#[source] StreamError),
    #[error("publish the dead letter: {0}")]
    Publish(#[source] jetstream::context::PublishError),
    #[error("no acknowledgement of the dead letter within {DEADLINE:?}")]
    Timeout,
}

/// Where envelopes that can never be delivered go.
pub trait DeadLetters: Send + Sync + 'static {
    /// Keeps `envelope` (as the edge published it) with `reason`; resolves once kept.
    fn keep(&self, envelope: Bytes, reason: String) -> BoxFuture<'_, Result<(), DeadLetterError>>;
}

/// Dead letters in JetStream.
pub struct JetStreamDeadLetters {
    jetstream: jetstream::Context,
    check: StreamCheck,
    /// Created (or checked) on the first dead letter: most deployments never have one.
    stream: OnceCell<()>,
}

impl JetStreamDeadLetters {
    /// Dead letters on `nats`, their stream created with `replicas` copies unless it
    /// exists.
    pub fn new(nats: async_nats::Client, replicas: usize) -> Self {
        JetStreamDeadLetters {
            jetstream: jetstream::new(nats),
            check: StreamCheck::new(tcpc_proto::stream::dead_letter_stream_config(replicas)),
            stream: OnceCell::new(),
        }
    }

    async fn ensure_stream(&self) -> Result<(), DeadLetterError> {
        let create =
            || async { self.check.ensure(&self.jetstream).await.map(drop).map_err(DeadLetterError::Stream) };
        self.stream.get_or_try_init(create).await.map(drop)
    }
}

impl DeadLetters for JetStreamDeadLetters {
    fn keep(&self, envelope: Bytes, reason: String) -> BoxFuture<'_, Result<(), DeadLetterError>> {
        Box::pin(async move {
            let kept = async {
                self.ensure_stream().await?;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(names::DEAD_LETTER_REASON_HEADER, reason.as_str());
                let ack = self
                    .jetstream
                    .publish_with_headers(names::DEAD_LETTER_SUBJECT, headers, envelope)
                    .await
                    .map_err(DeadLetterError::Publish)?;
                ack.await.map(drop).map_err(DeadLetterError::Publish)
            };
            tokio::time::timeout(DEADLINE, kept).await.map_err(|_| DeadLetterError::Timeout)?
        })
    }
}

/// Dead letters logged (the all-in-one on its in-process bus): the reason and the size,
/// never the content (device data).
pub struct LoggedDeadLetters;

impl DeadLetters for LoggedDeadLetters {
    fn keep(&self, envelope: Bytes, reason: String) -> BoxFuture<'_, Result<(), DeadLetterError>> {
        error!(%reason, bytes = envelope.len(), "uplink dropped: it can never be delivered");
        Box::pin(async { Ok(()) })
    }
}
