//! Where platform-bound messages go: the platform's MQTT broker
//! ([`crate::platform::mqtt::MqttSink`]), or JSON lines on stdout (the all-in-one
//! without a broker). One trait, so the pipelines do not care which.

use std::io::Write;

use bytes::Bytes;
use futures::future::BoxFuture;

/// One MQTT message for the platform: topic and the exact payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformMessage {
    pub topic: String,
    pub payload: Bytes,
}

/// Resolves when the platform side acknowledged the message (MQTT PUBACK).
pub type Delivered = BoxFuture<'static, Result<(), SinkError>>;

/// A publish was not acknowledged.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SinkError {
    #[error("platform broker connection lost before the acknowledgement")]
    ConnectionLost,
    #[error("platform sink stopped")]
    Stopped,
    #[error("write to stdout: {0}")]
    Stdout(String),
    /// The message can never be published as it is: retrying cannot help.
    #[error("refused by the platform sink: {0}")]
    Refused(&'static str),
}

impl SinkError {
    /// Whether retrying the same message cannot succeed (it is dead-lettered instead).
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Refused(_))
    }
}

/// Counts the sink's broker connections: a message is published only on the connection
/// of the epoch its batch started in.
pub type Epoch = u64;

/// Where platform-bound messages go.
pub trait PlatformSink: Send + Sync + 'static {
    /// Queues `message` (QoS 1, no retain) after every message queued before it;
    /// returns once queued, with a future that resolves on its acknowledgement. A
    /// message of an `epoch` whose connection was lost fails (`ConnectionLost`) instead
    /// of going out on the next connection ahead of its batch's retry, which would
    /// reorder a device's messages.
    fn publish(&self, message: PlatformMessage, epoch: Epoch) -> BoxFuture<'_, Result<Delivered, SinkError>>;

    /// The current epoch: a batch takes it before its first message.
    fn epoch(&self) -> Epoch;
}

/// Platform messages as JSON lines on stdout: `{"topic":…,"payload":…}`, the payload
/// as JSON when it is JSON (the envelopes, the status digits), else as a string.
#[derive(Default)]
pub struct JsonLines;

impl JsonLines {
    /// The line printed for a message.
    pub fn line(message: &PlatformMessage) -> String {
        let payload = serde_json::from_slice::<serde_json::Value>(&message.payload).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        serde_json::json!({ "topic": message.topic, "payload": payload }).to_string()
    }
}

impl PlatformSink for JsonLines {
    fn epoch(&self) -> Epoch {
        // Stdout has no connection to lose.
        0
    }

    fn publish(
        &self,
        message: PlatformMessage,
        _epoch: Epoch,
    ) -> BoxFuture<'_, Result<Delivered, SinkError>> {
        let line = Self::line(&message);
        Box::pin(async move {
            let mut stdout = std::io::stdout().lock();
            let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
            let result = written.map_err(|e| SinkError::Stdout(e.to_string()));
            let delivered: Delivered = Box::pin(async move { result });
            Ok(delivered)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_json_payloads_as_json() {
        let envelope = PlatformMessage {
            topic: "devices/telemetry".into(),
            payload: Bytes::from_static(br#"{"device_id":"d","values":"e30="}"#),
        };
        assert_eq!(
            JsonLines::line(&envelope),
            r#"{"topic":"devices/telemetry","payload":{"device_id":"d","values":"e30="}}"#
        );
        let status = PlatformMessage { topic: "devices/status/d".into(), payload: Bytes::from_static(b"1") };
        assert_eq!(JsonLines::line(&status), r#"{"topic":"devices/status/d","payload":1}"#);
    }
}
