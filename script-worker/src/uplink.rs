//! The uplink mapping: what an edge envelope becomes on the platform.
//!
//! - Session events become `devices/status/{id}`: `1` when a device authenticated,
//!   `0` when its connection ended — but only when that connection still owned the
//!   device's route (a device that moved to another pod is never reported offline by
//!   the old one; when the edge could not tell, the route is checked here).
//! - Official (TP) frames map by CMD: 0x1 → telemetry (or attributes, per device
//!   config), 0x2 → event named after its envelope, 0x3 → telemetry, 0x4 / 0x5 →
//!   command / attribute-set responses echoing the frame's message_id.
//! - Custom messages go through the device's uplink script (`decode`), or to the
//!   platform as they are when it has none.
//! - Gateway data, in the v1.x form or the 0.x form keyed by address, goes out as
//!   gateway telemetry.
//!
//! A message that cannot be mapped (unknown device, not JSON, a failing script, a
//! message id that cannot be a topic level) is reported (log and
//! `worker_uplink_errors_total{reason}`) and handed back as a [`MapError`]: permanent
//! ones are dead-lettered by the pipeline, transient ones (a lookup that could not be
//! made) retried.

use std::sync::Arc;
use tcpc_observe::Chain;

use serde_json::{Map, Value as Json};
use tcpc_proto::v1::{SessionEvent, SessionState, Uplink, UplinkEnvelope, UplinkKind, uplink_envelope};
use tracing::{debug, warn};

use crate::devices::{Cmd1Mapping, Device, DeviceKind};
use crate::metrics::Metrics;
use crate::platform::topics;
use crate::routes::{RouteLookup, RouteLookupError};
use crate::scripts::{Call, CallContext, Output, ScriptError, Scripts};
use crate::sink::PlatformMessage;
use crate::source::{DeviceSource, SourceError};

/// Why an uplink was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("not a device the platform knows")]
    UnknownDevice,
    #[error("device lookup")]
    Device(#[source] SourceError),
    #[error("route lookup")]
    Route(#[source] RouteLookupError),
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("response without a message_id")]
    NoMessageId,
    #[error("message_id unusable in a topic")]
    BadMessageId,
    #[error("uplink script: {0}")]
    Script(#[from] ScriptError),
    #[error("unknown envelope")]
    Unknown,
}

impl MapError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            MapError::UnknownDevice => "unknown_device",
            MapError::Device(_) | MapError::Route(_) => "lookup",
            MapError::NotJson(_) => "not_json",
            MapError::NoMessageId => "no_message_id",
            MapError::BadMessageId => "bad_message_id",
            MapError::Script(ScriptError::Timeout) => "script_timeout",
            MapError::Script(ScriptError::OutOfMemory) => "script_memory",
            MapError::Script(ScriptError::Quarantined) => "script_quarantined",
            MapError::Script(ScriptError::Busy) => "script_busy",
            MapError::Script(_) => "script_error",
            MapError::Unknown => "unknown_envelope",
        }
    }

    /// Whether the same envelope may map once the cause is gone (the platform or the
    /// route store answers again, the script engines catch up); every other error would
    /// repeat.
    pub fn is_transient(&self) -> bool {
        matches!(self, MapError::Device(_) | MapError::Route(_) | MapError::Script(ScriptError::Busy))
    }
}

/// Maps envelopes to platform messages.
pub struct Mapper {
    pub devices: Arc<dyn DeviceSource>,
    pub routes: Arc<dyn RouteLookup>,
    pub scripts: Arc<Scripts>,
    pub metrics: Arc<Metrics>,
    /// Told when a device comes online (its queued downlinks go out).
    pub downlinks: Arc<crate::downlink::Downlinks>,
}

impl Mapper {
    /// What `envelope` becomes.
    ///
    /// # Errors
    /// It cannot be mapped (reported here: log and metric).
    pub async fn map(&self, envelope: &UplinkEnvelope) -> Result<Vec<PlatformMessage>, MapError> {
        let (device_id, result) = match &envelope.body {
            Some(uplink_envelope::Body::Session(event)) => (&event.device_id, self.session(event).await),
            Some(uplink_envelope::Body::Uplink(uplink)) => (&uplink.device_id, self.uplink(uplink).await),
            None => (&String::new(), Err(MapError::Unknown)),
        };
        if let Err(error) = &result {
            self.metrics
                .uplink_errors
                .get_or_create(&crate::metrics::ReasonLabel { reason: error.label() })
                .inc();
            warn!(device_id = %device_id, error = %Chain(error), "uplink not mapped to the platform");
        }
        result
    }

    async fn session(&self, event: &SessionEvent) -> Result<Vec<PlatformMessage>, MapError> {
        let online = event.state() == SessionState::Online;
        if online {
            self.downlinks.device_online(&event.device_id);
        }
        if online || event.owned_route {
            return Ok(vec![topics::status(&event.device_id, online)]);
        }
        // The edge could not ask the route store: ask it now.
        match self.routes.route(&event.device_id).await {
            Ok(Some(route)) if route.connection_id != event.connection_id => {
                debug!(device_id = %event.device_id, "device moved to another connection; no offline");
                Ok(Vec::new())
            }
            Ok(_) => Ok(vec![topics::status(&event.device_id, false)]),
            Err(error) => Err(MapError::Route(error)),
        }
    }

    async fn uplink(&self, uplink: &Uplink) -> Result<Vec<PlatformMessage>, MapError> {
        let device = self
            .devices
            .by_id(&uplink.device_id)
            .await
            .map_err(MapError::Device)?
            .ok_or(MapError::UnknownDevice)?;
        if uplink.kind() == UplinkKind::Raw {
            return self.custom(&device, uplink).await;
        }
        official(&device, uplink.kind(), &uplink.payload, &message_id(uplink)).map(|message| vec![message])
    }

    async fn custom(&self, device: &Device, uplink: &Uplink) -> Result<Vec<PlatformMessage>, MapError> {
        let gateway = device.kind == DeviceKind::Gateway;
        let Some(script) = &device.settings.uplink_script else {
            // No script: the bytes go as they are (the platform may run its own script).
            return Ok(vec![topics::envelope(topics::telemetry(gateway), &device.id, &uplink.payload)]);
        };
        let context = CallContext {
            device_id: device.id.clone(),
            device_number: device.number.clone(),
            kind: "uplink".to_owned(),
            topic: topics::telemetry(gateway),
        };
        let output =
            self.scripts.run(script, Call::Decode { bytes: uplink.payload.to_vec(), context }).await?;
        let Output::Json(value) = output else { return Err(MapError::Unknown) };
        if value.is_null() {
            // The script chose to drop this message.
            return Ok(Vec::new());
        }
        script_result(device, value, &message_id(uplink)).map(|message| vec![message])
    }
}

/// The message id of the event or attributes an uplink becomes: the envelope's
/// JetStream message id, so that a publish retried (a redelivered envelope, a batch
/// retried after a reconnect) carries the same id and the platform can tell it is one
/// message, not two.
fn message_id(uplink: &Uplink) -> String {
    tcpc_proto::names::uplink_message_id(&uplink.connection_id, uplink.sequence)
}

/// What a custom device's uplink script returned, on the platform. A result with one
/// of these keys alone is that kind of message (how a script answers a downlink):
/// `{"command_response": {"message_id": …, "result": 0, …}}`,
/// `{"attribute_set_response": {"message_id": …, …}}`, `{"event": {"method", "params"}}`,
/// `{"attributes": {…}}`; anything else is telemetry.
/// `message_id` names an event or attributes (see [`message_id`]).
pub fn script_result(device: &Device, value: Json, message_id: &str) -> Result<PlatformMessage, MapError> {
    let gateway = device.kind == DeviceKind::Gateway;
    let marked = value.as_object().filter(|object| object.len() == 1).and_then(|object| object.iter().next());
    match marked {
        Some((key, inner)) if key == "command_response" => {
            response(device, inner.clone(), topics::command_response)
        }
        Some((key, inner)) if key == "attribute_set_response" => {
            response(device, inner.clone(), topics::attribute_set_response)
        }
        Some((key, inner)) if key == "event" => {
            Ok(topics::envelope(topics::event(gateway, message_id), &device.id, &bytes(inner)))
        }
        Some((key, inner)) if key == "attributes" => {
            Ok(topics::envelope(topics::attributes(gateway, message_id), &device.id, &bytes(inner)))
        }
        _ => Ok(telemetry(device, value)),
    }
}

/// An official frame's message. The device's JSON goes to the platform byte for byte
/// (only checked to be JSON), wrapped only where the platform needs another shape.
/// `message_id` names an event or attributes (see [`message_id`]).
fn official(
    device: &Device,
    kind: UplinkKind,
    payload: &[u8],
    message_id: &str,
) -> Result<PlatformMessage, MapError> {
    let value: Json = serde_json::from_slice(payload).map_err(|e| MapError::NotJson(e.to_string()))?;
    let gateway = device.kind == DeviceKind::Gateway;
    let values = || if gateway { gateway_bytes(&value, payload) } else { payload.to_vec() };
    Ok(match kind {
        UplinkKind::Telemetry => topics::envelope(topics::telemetry(gateway), &device.id, &values()),
        UplinkKind::Attributes if device.settings.cmd1 == Cmd1Mapping::Telemetry => {
            topics::envelope(topics::telemetry(gateway), &device.id, &values())
        }
        UplinkKind::Attributes => {
            topics::envelope(topics::attributes(gateway, message_id), &device.id, &values())
        }
        UplinkKind::Events => topics::envelope(topics::event(gateway, message_id), &device.id, &values()),
        UplinkKind::CommandResponse => response(device, value, topics::command_response)?,
        UplinkKind::AttributeSetResponse => response(device, value, topics::attribute_set_response)?,
        UplinkKind::Raw | UplinkKind::Unspecified => return Err(MapError::Unknown),
    })
}

fn bytes(value: &Json) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value always serializes")
}

/// Telemetry of a device from a script's result: gateways in the v1.x gateway form.
fn telemetry(device: &Device, value: Json) -> PlatformMessage {
    let gateway = device.kind == DeviceKind::Gateway;
    let value = if gateway { gateway_form(value) } else { value };
    topics::envelope(topics::telemetry(gateway), &device.id, &bytes(&value))
}

fn is_gateway_v1(value: &Json) -> bool {
    value.as_object().is_some_and(|object| {
        ["gateway_data", "sub_device_data", "sub_gateway_data"].iter().any(|key| object.contains_key(*key))
    })
}

/// A gateway frame's bytes in the v1.x form: as they are, or the 0.x form wrapped as
/// sub-device data without re-serializing it.
fn gateway_bytes(value: &Json, payload: &[u8]) -> Vec<u8> {
    if is_gateway_v1(value) {
        return payload.to_vec();
    }
    [&b"{\"sub_device_data\":"[..], payload.trim_ascii(), b"}"].concat()
}

/// Gateway data in the v1.x form: as it is when it has `gateway_data`,
/// `sub_device_data` or `sub_gateway_data`; else the 0.x form `{"<addr>":{…}}`, which
/// is sub-device data.
pub fn gateway_form(value: Json) -> Json {
    if is_gateway_v1(&value) {
        return value;
    }
    let mut form = Map::new();
    form.insert("sub_device_data".to_owned(), value);
    Json::Object(form)
}

/// A response echoing the downlink's message_id, which is taken out of the values.
fn response(device: &Device, value: Json, topic: fn(&str) -> String) -> Result<PlatformMessage, MapError> {
    let Json::Object(mut values) = value else { return Err(MapError::NoMessageId) };
    let message_id = match values.remove("message_id") {
        Some(Json::String(id)) if topics::valid_message_id(&id) => id,
        Some(Json::String(id)) if !id.is_empty() => return Err(MapError::BadMessageId),
        _ => return Err(MapError::NoMessageId),
    };
    Ok(topics::envelope(topic(&message_id), &device.id, &bytes(&Json::Object(values))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn device(kind: DeviceKind) -> Device {
        Device {
            id: "d".into(),
            number: "D001".into(),
            voucher_digest: String::new(),
            kind,
            sub_devices: vec![],
            settings: Default::default(),
        }
    }

    fn values(message: &PlatformMessage) -> Json {
        let envelope: Json = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(envelope["device_id"], "d");
        let raw =
            base64::engine::general_purpose::STANDARD.decode(envelope["values"].as_str().unwrap()).unwrap();
        serde_json::from_slice(&raw).unwrap()
    }

    #[test]
    fn scripts_mark_responses_events_and_attributes() {
        let direct = device(DeviceKind::Direct);
        let answer =
            script_result(&direct, json!({"command_response": {"message_id": "m1", "result": 0}}), "m")
                .unwrap();
        assert_eq!(
            (answer.topic.as_str(), values(&answer)),
            ("devices/command/response/m1", json!({"result": 0}))
        );
        let set =
            script_result(&direct, json!({"attribute_set_response": {"message_id": "m2", "result": 1}}), "m")
                .unwrap();
        assert_eq!(set.topic, "devices/attributes/set/response/m2");
        let event = script_result(&direct, json!({"event": {"method": "alarm", "params": {}}}), "m").unwrap();
        assert!(event.topic.starts_with("devices/event/"));
        let attributes = script_result(&direct, json!({"attributes": {"fw": "1.2"}}), "m").unwrap();
        assert!(attributes.topic.starts_with("devices/attributes/"));
        let plain = script_result(&direct, json!({"temperature": 1, "event": 2}), "m").unwrap();
        assert_eq!(
            (plain.topic.as_str(), values(&plain)),
            ("devices/telemetry", json!({"temperature": 1, "event": 2}))
        );
    }

    #[test]
    fn official_json_goes_byte_for_byte() {
        let message = official(
            &device(DeviceKind::Direct),
            UplinkKind::Telemetry,
            br#"{"temperature":36.50,"a":1}"#,
            "m",
        )
        .unwrap();
        let envelope: Json = serde_json::from_slice(&message.payload).unwrap();
        let raw =
            base64::engine::general_purpose::STANDARD.decode(envelope["values"].as_str().unwrap()).unwrap();
        assert_eq!(raw, br#"{"temperature":36.50,"a":1}"#);
    }

    #[test]
    fn cmd1_is_telemetry_by_default_and_attributes_when_configured() {
        let direct = device(DeviceKind::Direct);
        let message = official(&direct, UplinkKind::Attributes, br#"{"t": 1}"#, "m").unwrap();
        assert_eq!((message.topic.as_str(), values(&message)), ("devices/telemetry", json!({"t": 1})));
        let mut attributes = direct.clone();
        attributes.settings.cmd1 = Cmd1Mapping::Attributes;
        let message = official(&attributes, UplinkKind::Attributes, br#"{"ip":"10.0.0.7"}"#, "m").unwrap();
        assert!(message.topic.starts_with("devices/attributes/"), "{}", message.topic);
    }

    #[test]
    fn events_get_a_message_id_and_responses_echo_theirs() {
        let direct = device(DeviceKind::Direct);
        let event = official(&direct, UplinkKind::Events, br#"{"method":"alarm","params":{"level":2}}"#, "m")
            .unwrap();
        assert!(event.topic.starts_with("devices/event/") && event.topic.len() > "devices/event/".len());
        let response = official(
            &direct,
            UplinkKind::CommandResponse,
            br#"{"message_id":"1a2b3c4d","result":0,"message":"success","method":"reboot"}"#,
            "m",
        )
        .unwrap();
        assert_eq!(response.topic, "devices/command/response/1a2b3c4d");
        assert_eq!(values(&response), json!({"result": 0, "message": "success", "method": "reboot"}));
        let set =
            official(&direct, UplinkKind::AttributeSetResponse, br#"{"message_id":"5e6f","result":1}"#, "m")
                .unwrap();
        assert_eq!(set.topic, "devices/attributes/set/response/5e6f");
        assert!(matches!(
            official(&direct, UplinkKind::CommandResponse, br#"{"result":0}"#, "m"),
            Err(MapError::NoMessageId)
        ));
        for poison in [r##""#""##, r#""+""#, r#""a\u0000b""#, r#""a/b""#, &format!("\"{}\"", "9".repeat(129))]
        {
            let frame = format!(r#"{{"message_id":{poison},"result":0}}"#);
            assert!(
                matches!(
                    official(&direct, UplinkKind::CommandResponse, frame.as_bytes(), "m"),
                    Err(MapError::BadMessageId)
                ),
                "{frame}"
            );
        }
    }

    #[test]
    fn gateway_data_in_both_forms_is_gateway_telemetry() {
        let gateway = device(DeviceKind::Gateway);
        let old = official(
            &gateway,
            UplinkKind::Attributes,
            br#"{"3c20c6206":{"temperature":36.5,"humidity":52}}"#,
            "m",
        )
        .unwrap();
        assert_eq!(old.topic, "gateway/telemetry");
        assert_eq!(
            values(&old),
            json!({"sub_device_data": {"3c20c6206": {"temperature": 36.5, "humidity": 52}}})
        );
        let v1 = br#"{"gateway_data":{"v":1},"sub_device_data":{"3c20c6207":{"t":2}}}"#;
        let message = official(&gateway, UplinkKind::Telemetry, v1, "m").unwrap();
        assert_eq!(values(&message), serde_json::from_slice::<Json>(v1).unwrap());
        assert!(matches!(
            official(&gateway, UplinkKind::Telemetry, b"not json", "m"),
            Err(MapError::NotJson(_))
        ));
    }
}
