//! One envelope through the worker: decode, map ([`crate::uplink`]), hand every
//! resulting message to the platform sink in order, and resolve once the platform
//! side acknowledged them all — the moment the source (JetStream, or the all-in-one's
//! edge) may be acknowledged.
//!
//! Failures are told apart: one that the same envelope would meet again (undecodable,
//! unmappable, a message the sink refuses) is permanent, and the envelope goes to the
//! [`DeadLetters`] with its reason and then counts as handled; one that goes away with
//! its cause (the broker connection, a lookup the platform or Redis could not answer)
//! is transient, and fails the envelope so that the source retries it, holding the ack.

use std::sync::Arc;
use tcpc_observe::Chain;

use bytes::Bytes;
use futures::future::{BoxFuture, join_all};
use prost::Message as _;
use tcpc_proto::v1::UplinkEnvelope;
use tracing::{Instrument as _, Span, warn};

use crate::dead_letter::{DeadLetterError, DeadLetters};
use crate::metrics::{Metrics, ReasonLabel};
use crate::sink::{Epoch, PlatformMessage, PlatformSink, SinkError};
use crate::uplink::{MapError, Mapper};

/// Resolves when every message of an envelope was acknowledged (or the envelope was
/// dead-lettered).
pub type Handled = BoxFuture<'static, Result<(), HandleError>>;

/// An envelope was not handled; the source keeps it and retries.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("map the envelope: {0}")]
    Map(#[source] MapError),
    #[error("queue a platform message: {0}")]
    Queue(#[source] SinkError),
    #[error("platform acknowledgement: {0}")]
    Acknowledge(#[source] SinkError),
    #[error("dead-letter the envelope: {0}")]
    DeadLetter(#[source] DeadLetterError),
}

/// Mapper, sink and dead letters.
pub struct Pipeline {
    pub mapper: Mapper,
    pub sink: Arc<dyn PlatformSink>,
    pub dead_letters: Arc<dyn DeadLetters>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Maps an encoded envelope and queues its messages for the sink's connection of
    /// `epoch` (see [`PlatformSink::publish`]); returns once they are queued
    /// (so that the next envelope's messages queue after them), with a future of their
    /// acknowledgement.
    ///
    /// # Errors
    /// A transient failure: the lookups behind the mapping could not be made, or the
    /// sink cannot take messages (stopped).
    pub async fn handle(&self, encoded: Bytes, epoch: Epoch) -> Result<Handled, HandleError> {
        let mut handled = self.handle_all(vec![(encoded, Span::current())], epoch, &|| true).await;
        handled.pop().expect("one result per envelope")
    }

    /// [`Pipeline::handle`] for envelopes in order, each under its span, mapped together
    /// (their scripts run in one go). Ends at the first failure: the envelopes after it
    /// are not queued (they are handed again with it when it is retried). Asks
    /// `may_queue` before it queues each envelope's messages (a partition's lease can
    /// lapse while the batch is mapped), and ends where it says no.
    pub async fn handle_all(
        &self,
        envelopes: Vec<(Bytes, Span)>,
        epoch: Epoch,
        may_queue: &(dyn Fn() -> bool + Sync),
    ) -> Vec<Result<Handled, HandleError>> {
        let decoded: Vec<_> =
            envelopes.iter().map(|(encoded, _)| UplinkEnvelope::decode(&encoded[..])).collect();
        let to_map: Vec<_> = decoded
            .iter()
            .zip(&envelopes)
            .filter_map(|(envelope, (_, span))| Some((envelope.as_ref().ok()?, span.clone())))
            .collect();
        let mut mapped = self.mapper.map_all(&to_map).await.into_iter();
        let mut handled = Vec::with_capacity(envelopes.len());
        for ((encoded, span), envelope) in envelopes.into_iter().zip(decoded) {
            if !may_queue() {
                break;
            }
            let result = match envelope {
                Err(error) => {
                    let _in_span = span.enter();
                    self.metrics.uplink_errors.get_or_create(&ReasonLabel { reason: "undecodable" }).inc();
                    warn!(%error, "undecodable envelope");
                    Ok(self.dead_letter(encoded, format!("undecodable envelope: {error}"), "undecodable"))
                }
                Ok(_) => match mapped.next() {
                    // The mapping ended at a transient failure before this envelope.
                    None => break,
                    Some(Ok(messages)) => self.queue(encoded, messages, epoch).instrument(span).await,
                    Some(Err(error)) if error.is_transient() => Err(HandleError::Map(error)),
                    Some(Err(error)) => {
                        Ok(self.dead_letter(encoded, Chain(&error).to_string(), error.label()))
                    }
                },
            };
            let failed = result.is_err();
            handled.push(result);
            if failed {
                break;
            }
        }
        // Those after a failure are counted when they are handed again.
        self.metrics.envelopes.inc_by(handled.len() as u64);
        handled
    }

    /// Queues an envelope's messages in order, with the future of their acknowledgement.
    async fn queue(
        &self,
        encoded: Bytes,
        messages: Vec<PlatformMessage>,
        epoch: Epoch,
    ) -> Result<Handled, HandleError> {
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            deliveries.push(self.sink.publish(message, epoch).await.map_err(HandleError::Queue)?);
        }
        let (letters, metrics) = (self.dead_letters.clone(), self.metrics.clone());
        Ok(Box::pin(async move {
            let mut permanent = None;
            for delivered in join_all(deliveries).await {
                match delivered {
                    Ok(()) => drop(metrics.published.inc()),
                    Err(error) if error.is_permanent() => permanent = Some(error),
                    Err(error) => return Err(HandleError::Acknowledge(error)),
                }
            }
            match permanent {
                None => Ok(()),
                Some(error) => keep(&*letters, &metrics, encoded, error.to_string(), "refused").await,
            }
        }))
    }

    /// The envelope as a dead letter with `reason`, counted under `label`.
    fn dead_letter(&self, encoded: Bytes, reason: String, label: &'static str) -> Handled {
        let (letters, metrics) = (self.dead_letters.clone(), self.metrics.clone());
        Box::pin(async move { keep(&*letters, &metrics, encoded, reason, label).await })
    }
}

async fn keep(
    letters: &dyn DeadLetters,
    metrics: &Metrics,
    envelope: Bytes,
    reason: String,
    label: &'static str,
) -> Result<(), HandleError> {
    letters.keep(envelope, reason).await.map_err(HandleError::DeadLetter)?;
    metrics.dead_letters.get_or_create(&ReasonLabel { reason: label }).inc();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::uplink::testing;

    #[tokio::test]
    async fn a_batch_ends_where_it_may_no_longer_queue() {
        let mapper = testing::mapper();
        let metrics = mapper.metrics.clone();
        let pipeline = Pipeline {
            mapper,
            sink: Arc::new(crate::sink::JsonLines),
            dead_letters: Arc::new(crate::dead_letter::LoggedDeadLetters),
            metrics,
        };
        let envelopes =
            (1..=3).map(|n| (Bytes::from(testing::raw("d", n).encode_to_vec()), Span::none())).collect();
        // The lease holds for the first envelope only.
        let asked = AtomicUsize::new(0);
        let handled = pipeline.handle_all(envelopes, 0, &|| asked.fetch_add(1, Ordering::Relaxed) == 0).await;
        assert_eq!(handled.len(), 1);
        assert!(handled.into_iter().next().unwrap().unwrap().await.is_ok());
        assert_eq!(pipeline.metrics.envelopes.get(), 1);
    }
}
