//! Reads the uplink envelopes the edges stored in JetStream, from the start.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use prost::Message;
use tcpc_proto::names;
use tcpc_proto::v1::{SessionEvent, Uplink, UplinkEnvelope, uplink_envelope};

use crate::{DEADLINE, wait_until};

/// An ephemeral consumer over the whole uplink stream.
pub struct UplinkReader {
    messages: consumer::pull::Stream,
}

impl UplinkReader {
    /// Waits for the stream (edges create it) and reads it from its first message.
    pub async fn open(client: async_nats::Client) -> Self {
        let jetstream = jetstream::new(client);
        wait_until("the uplink stream to exist", || {
            let jetstream = jetstream.clone();
            async move { jetstream.get_stream(names::UPLINK_STREAM).await.is_ok() }
        })
        .await;
        let stream = jetstream.get_stream(names::UPLINK_STREAM).await.expect("uplink stream");
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("ephemeral consumer");
        UplinkReader { messages: consumer.messages().await.expect("message stream") }
    }

    /// The next envelope, with its JetStream message id.
    pub async fn next(&mut self) -> (UplinkEnvelope, String) {
        let message = tokio::time::timeout(DEADLINE, self.messages.next())
            .await
            .expect("an uplink envelope within the deadline")
            .expect("stream open")
            .expect("a message");
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        (UplinkEnvelope::decode(message.payload.clone()).expect("an UplinkEnvelope"), id)
    }

    /// The next envelope, which must be an uplink message.
    pub async fn uplink(&mut self) -> Uplink {
        match self.next().await.0.body {
            Some(uplink_envelope::Body::Uplink(uplink)) => uplink,
            other => panic!("expected an uplink, got {other:?}"),
        }
    }

    /// The next envelope, which must be a session event.
    pub async fn session(&mut self) -> SessionEvent {
        match self.next().await.0.body {
            Some(uplink_envelope::Body::Session(event)) => event,
            other => panic!("expected a session event, got {other:?}"),
        }
    }
}
