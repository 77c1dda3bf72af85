//! The platform's uplink topics and the message envelope (THINGSPANEL.md, MQTT).

use base64::Engine as _;
use bytes::Bytes;

use crate::sink::PlatformMessage;

pub fn telemetry(gateway: bool) -> String {
    if gateway { "gateway/telemetry" } else { "devices/telemetry" }.to_owned()
}

pub fn attributes(gateway: bool, message_id: &str) -> String {
    format!("{}/attributes/{message_id}", if gateway { "gateway" } else { "devices" })
}

pub fn event(gateway: bool, message_id: &str) -> String {
    format!("{}/event/{message_id}", if gateway { "gateway" } else { "devices" })
}

pub fn command_response(message_id: &str) -> String {
    format!("devices/command/response/{message_id}")
}

pub fn attribute_set_response(message_id: &str) -> String {
    format!("devices/attributes/set/response/{message_id}")
}

/// `{"device_id":"…","values":"<base64 of values>"}` on `topic`.
pub fn envelope(topic: String, device_id: &str, values: &[u8]) -> PlatformMessage {
    let values = base64::engine::general_purpose::STANDARD.encode(values);
    let payload = serde_json::json!({ "device_id": device_id, "values": values }).to_string();
    PlatformMessage { topic, payload: payload.into() }
}

/// `devices/status/{id}` with the bare `1` or `0` (not wrapped, not JSON).
pub fn status(device_id: &str, online: bool) -> PlatformMessage {
    PlatformMessage {
        topic: format!("devices/status/{device_id}"),
        payload: Bytes::from_static(if online { b"1" } else { b"0" }),
    }
}

/// The longest message id a device may echo into a topic. The platform's are short
/// (hex or UUIDs); a longer one is a device's garbage, not an answer.
pub const MAX_MESSAGE_ID: usize = 128;

/// Whether a device-supplied message id can be a topic level: not empty, at most
/// [`MAX_MESSAGE_ID`] bytes, no `/` (THINGSPANEL.md), no wildcard, no control character
/// (NUL is not allowed in MQTT strings at all).
pub fn valid_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID
        && !id.contains(['/', '+', '#'])
        && !id.contains(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_envelope() {
        let message = envelope(
            telemetry(false),
            "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10",
            br#"{"temperature":36.5,"humidity":52}"#,
        );
        assert_eq!(message.topic, "devices/telemetry");
        assert_eq!(
            &message.payload[..],
            br#"{"device_id":"6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10","values":"eyJ0ZW1wZXJhdHVyZSI6MzYuNSwiaHVtaWRpdHkiOjUyfQ=="}"#
        );
        assert_eq!(
            status("d", false),
            PlatformMessage { topic: "devices/status/d".into(), payload: Bytes::from_static(b"0") }
        );
        assert_eq!(event(true, "m1"), "gateway/event/m1");
        // Events and attributes are named after their envelope's JetStream message id.
        assert!(valid_message_id(&tcpc_proto::names::uplink_message_id(
            "d72dbd02a17409270000000000000000",
            1
        )));
    }

    #[test]
    fn message_ids_that_cannot_be_a_topic_level() {
        assert!(valid_message_id("4d5e6f70") && valid_message_id(&"a".repeat(MAX_MESSAGE_ID)));
        for id in ["", "#", "+", "a/b", "a\0b", "a\nb", &"a".repeat(MAX_MESSAGE_ID + 1)] {
            assert!(!valid_message_id(id), "{id:?}");
        }
    }
}
