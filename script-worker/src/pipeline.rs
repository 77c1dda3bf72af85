//! One envelope through the worker: decode, map ([`crate::uplink`]), hand every
//! resulting message to the platform sink in order, and resolve once the platform
//! side acknowledged them all — the moment the source (JetStream, or the all-in-one's
//! edge) may be acknowledged.

use std::sync::Arc;

use futures::future::{BoxFuture, try_join_all};
use prost::Message as _;
use tcpc_proto::v1::UplinkEnvelope;
use tracing::warn;

use crate::metrics::{Metrics, ReasonLabel};
use crate::sink::{PlatformSink, SinkError};
use crate::uplink::Mapper;

/// Resolves when every message of an envelope was acknowledged.
pub type Handled = BoxFuture<'static, Result<(), SinkError>>;

/// Mapper and sink.
pub struct Pipeline {
    pub mapper: Mapper,
    pub sink: Arc<dyn PlatformSink>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Maps an encoded envelope and queues its messages; returns once they are queued
    /// (so that the next envelope's messages queue after them), with a future of their
    /// acknowledgement. An undecodable envelope is reported and counts as handled.
    ///
    /// # Errors
    /// The sink cannot take messages (stopped).
    pub async fn handle(&self, encoded: &[u8]) -> Result<Handled, SinkError> {
        self.metrics.envelopes.inc();
        let envelope = match UplinkEnvelope::decode(encoded) {
            Ok(envelope) => envelope,
            Err(error) => {
                self.metrics.uplink_errors.get_or_create(&ReasonLabel { reason: "undecodable" }).inc();
                warn!(%error, "undecodable envelope skipped");
                return Ok(Box::pin(async { Ok(()) }));
            }
        };
        let messages = self.mapper.map(&envelope).await;
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            deliveries.push(self.sink.publish(message).await?);
        }
        let published = self.metrics.published.clone();
        Ok(Box::pin(async move {
            let count = deliveries.len() as u64;
            try_join_all(deliveries).await?;
            published.inc_by(count);
            Ok(())
        }))
    }
}
