//! The platform's topics: the uplink ones and the message envelope we build, the
//! downlink ones we read (THINGSPANEL.md, MQTT).

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

/// The four downlinks and their TP CMD.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, clap::ValueEnum)]
pub enum DownlinkKind {
    TelemetryControl,
    AttributeSet,
    AttributeGet,
    Command,
}

impl DownlinkKind {
    pub fn tp_cmd(self) -> u32 {
        match self {
            DownlinkKind::TelemetryControl => 0x10,
            DownlinkKind::AttributeSet => 0x11,
            DownlinkKind::Command => 0x12,
            DownlinkKind::AttributeGet => 0x13,
        }
    }

    /// The name scripts see as `ctx.kind`.
    pub fn name(self) -> &'static str {
        match self {
            DownlinkKind::TelemetryControl => "telemetry_control",
            DownlinkKind::AttributeSet => "attribute_set",
            DownlinkKind::AttributeGet => "attribute_get",
            DownlinkKind::Command => "command",
        }
    }

    /// Where the platform waits for the answer, if it does.
    pub fn response_topic(self, message_id: &str) -> Option<String> {
        match self {
            DownlinkKind::Command => Some(command_response(message_id)),
            DownlinkKind::AttributeSet => Some(attribute_set_response(message_id)),
            _ => None,
        }
    }
}

/// A downlink topic, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownlinkTopic {
    pub kind: DownlinkKind,
    /// Device number or id, as the platform wrote it.
    pub device: String,
    pub message_id: Option<String>,
}

/// Reads a downlink topic under `prefix` (which ends with `/`).
pub fn parse_downlink(prefix: &str, topic: &str) -> Option<DownlinkTopic> {
    let rest = topic.strip_prefix(prefix)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (kind, device, message_id) = match parts.as_slice() {
        ["devices", "telemetry", "control", device] => (DownlinkKind::TelemetryControl, device, None),
        ["devices", "attributes", "set", device, id] => (DownlinkKind::AttributeSet, device, Some(id)),
        ["devices", "attributes", "get", device] => (DownlinkKind::AttributeGet, device, None),
        ["devices", "command", device, id] => (DownlinkKind::Command, device, Some(id)),
        _ => return None,
    };
    if device.is_empty() {
        return None;
    }
    Some(DownlinkTopic {
        kind,
        device: (*device).to_owned(),
        message_id: message_id.map(|id| (*id).to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_both_backend_generations() {
        let parse = |t: &str| parse_downlink("plugin/TCP/", t);
        assert_eq!(
            parse("plugin/TCP/devices/command/D001/4d5e6f70"),
            Some(DownlinkTopic {
                kind: DownlinkKind::Command,
                device: "D001".into(),
                message_id: Some("4d5e6f70".into())
            })
        );
        assert_eq!(
            parse("plugin/TCP/devices/telemetry/control/6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10")
                .unwrap()
                .device,
            "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10"
        );
        assert_eq!(
            parse("plugin/TCP/devices/attributes/set/G001/2b3c").unwrap().kind,
            DownlinkKind::AttributeSet
        );
        assert_eq!(parse("plugin/TCP/devices/attributes/get/D001").unwrap().message_id, None);
        assert_eq!(parse("plugin/TCP/devices/command/D001"), None);
        assert_eq!(parse("other/devices/command/D001/1"), None);
    }

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
