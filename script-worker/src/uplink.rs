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
use tracing::{Instrument as _, debug, warn};

use crate::devices::{Cmd1Mapping, Device, DeviceKind};
use crate::metrics::Metrics;
use crate::platform::topics;
use crate::routes::{RouteLookup, RouteLookupError};
use crate::scripts::{Call, CallContext, Output, ScriptCall, ScriptError, Scripts};
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

/// How far an envelope's mapping got before its device's script runs.
enum Step {
    /// Mapped, or failed, without a script.
    Done(Result<Vec<PlatformMessage>, MapError>),
    /// The device's uplink script decides (the call is taken when the scripts run).
    Script { device: Arc<Device>, call: Option<Call>, message_id: String, span: tracing::Span },
}

impl Mapper {
    /// What each envelope becomes, in order, each under its span. The scripts of all of
    /// them run together (one hop per engine thread, not one per message). Ends after
    /// the first transient failure: the envelopes after it are mapped again when it is
    /// retried. Failures are reported here (log and metric).
    pub async fn map_all(
        &self,
        envelopes: &[(&UplinkEnvelope, tracing::Span)],
    ) -> Vec<Result<Vec<PlatformMessage>, MapError>> {
        let mut steps = Vec::with_capacity(envelopes.len());
        for (envelope, span) in envelopes {
            let step = self.step(envelope, span).instrument(span.clone()).await;
            let transient = matches!(&step, Step::Done(Err(error)) if error.is_transient());
            steps.push(step);
            if transient {
                break;
            }
        }
        let calls = steps
            .iter_mut()
            .filter_map(|step| match step {
                Step::Script { device, call, span, .. } => {
                    let call = call.take().expect("a call is taken once");
                    let reference =
                        device.settings.uplink_script.as_deref().expect("a step waits on a script it has");
                    Some(ScriptCall { span: Scripts::span(&call, span), reference, call })
                }
                Step::Done(_) => None,
            })
            .collect();
        let mut outputs = self.scripts.run_all(calls).await.into_iter();
        let mut mapped = Vec::with_capacity(steps.len());
        for (step, (envelope, span)) in steps.into_iter().zip(envelopes) {
            let _in_span = span.enter();
            let result = match step {
                Step::Done(result) => result,
                Step::Script { device, message_id, .. } => {
                    let output = outputs.next().expect("one output per script call");
                    decoded(&device, output, &message_id)
                }
            };
            if let Err(error) = &result {
                self.report(envelope, error);
            }
            let transient = result.as_ref().is_err_and(MapError::is_transient);
            mapped.push(result);
            if transient {
                break;
            }
        }
        mapped
    }

    fn report(&self, envelope: &UplinkEnvelope, error: &MapError) {
        self.metrics
            .uplink_errors
            .get_or_create(&crate::metrics::ReasonLabel { reason: error.label() })
            .inc();
        let device_id = match &envelope.body {
            Some(uplink_envelope::Body::Session(event)) => event.device_id.as_str(),
            Some(uplink_envelope::Body::Uplink(uplink)) => uplink.device_id.as_str(),
            None => "",
        };
        warn!(device_id = %device_id, error = %Chain(error), "uplink not mapped to the platform");
    }

    async fn step(&self, envelope: &UplinkEnvelope, span: &tracing::Span) -> Step {
        match &envelope.body {
            Some(uplink_envelope::Body::Session(event)) => Step::Done(self.session(event).await),
            Some(uplink_envelope::Body::Uplink(uplink)) => match self.device(uplink).await {
                Ok(device) if uplink.kind() == UplinkKind::Raw && device.settings.uplink_script.is_some() => {
                    let call = script_call(&device, uplink);
                    Step::Script {
                        device,
                        call: Some(call),
                        message_id: message_id(uplink),
                        span: span.clone(),
                    }
                }
                Ok(device) => Step::Done(without_script(&device, uplink)),
                Err(error) => Step::Done(Err(error)),
            },
            None => Step::Done(Err(MapError::Unknown)),
        }
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

    async fn device(&self, uplink: &Uplink) -> Result<Arc<Device>, MapError> {
        self.devices.by_id(&uplink.device_id).await.map_err(MapError::Device)?.ok_or(MapError::UnknownDevice)
    }
}

/// An official frame's message, or a custom one's bytes as they are (the device has no
/// script: the platform may run its own).
fn without_script(device: &Device, uplink: &Uplink) -> Result<Vec<PlatformMessage>, MapError> {
    if uplink.kind() == UplinkKind::Raw {
        let gateway = device.kind == DeviceKind::Gateway;
        return Ok(vec![topics::envelope(topics::telemetry(gateway), &device.id, &uplink.payload)]);
    }
    official(device, uplink.kind(), &uplink.payload, &message_id(uplink)).map(|message| vec![message])
}

/// The `decode` call of a custom device's uplink script.
fn script_call(device: &Device, uplink: &Uplink) -> Call {
    let context = CallContext {
        device_id: device.id.clone(),
        device_number: device.number.clone(),
        kind: "uplink".to_owned(),
        topic: topics::telemetry(device.kind == DeviceKind::Gateway),
    };
    Call::Decode { bytes: uplink.payload.to_vec(), context }
}

/// What a custom device's uplink script made of its bytes, on the platform.
fn decoded(
    device: &Device,
    output: Result<Output, ScriptError>,
    message_id: &str,
) -> Result<Vec<PlatformMessage>, MapError> {
    let Output::Json(value) = output? else { return Err(MapError::Unknown) };
    if value.is_null() {
        // The script chose to drop this message.
        return Ok(Vec::new());
    }
    script_result(device, value, message_id).map(|message| vec![message])
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

/// Unit tests' mapper: the one device `d`, custom, whose script returns `{n: <first
/// byte>}` and throws on 0; the platform cannot be asked about the device `down`.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Devices from a file, but the platform cannot be asked about `down` (transient).
    struct Flaky(crate::source::FileDevices);

    impl DeviceSource for Flaky {
        fn by_token<'a>(
            &'a self,
            token: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<crate::source::Lookup, SourceError>> {
            self.0.by_token(token)
        }
        fn by_id<'a>(
            &'a self,
            device_id: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<Arc<Device>>, SourceError>> {
            if device_id == "down" {
                return Box::pin(async { Err(SourceError::BackingOff) });
            }
            self.0.by_id(device_id)
        }
        fn forget<'a>(&'a self, device_id: &'a str) -> futures::future::BoxFuture<'a, ()> {
            self.0.forget(device_id)
        }
        fn resolve<'a>(
            &'a self,
            reference: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<crate::source::Target>, SourceError>> {
            self.0.resolve(reference)
        }
    }

    pub(crate) fn raw(device_id: &str, byte: u8) -> UplinkEnvelope {
        let uplink = Uplink {
            device_id: device_id.to_owned(),
            connection_id: "c".to_owned(),
            kind: UplinkKind::Raw as i32,
            payload: vec![byte].into(),
            ..Default::default()
        };
        UplinkEnvelope { body: Some(uplink_envelope::Body::Uplink(uplink)) }
    }

    pub(crate) fn mapper() -> Mapper {
        let file = r#"
[[device]]
token = "t1"
id = "d"
protocol = "custom"
uplink_script = "function decode(b) { if (b[0] === 0) throw new Error('bad'); return {n: b[0]}; }"
"#;
        let devices: Arc<dyn DeviceSource> =
            Arc::new(Flaky(crate::source::FileDevices::parse(file).unwrap()));
        let routes: Arc<dyn RouteLookup> = Arc::new(crate::routes::NoRoutes);
        let scripts = Arc::new(
            Scripts::start(
                crate::scripts::EngineKind::Quickjs,
                Default::default(),
                crate::scripts::Library::new(None),
                2,
            )
            .unwrap(),
        );
        let metrics = Arc::new(Metrics::new(&mut Default::default()));
        let downlinks = Arc::new(crate::downlink::Downlinks::new(
            "plugin/TCP/".to_owned(),
            devices.clone(),
            routes.clone(),
            Arc::default(),
            scripts.clone(),
            Arc::new(crate::sink::JsonLines),
            metrics.clone(),
            Arc::new(|_| true),
            None,
            tokio_util::task::TaskTracker::new(),
        ));
        Mapper { devices, routes, scripts, metrics, downlinks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;
    use testing::raw;

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

    #[tokio::test]
    async fn envelopes_mapped_together_keep_their_order_and_end_at_a_transient_failure() {
        let mapper = testing::mapper();
        let envelopes =
            [raw("d", 1), raw("d", 0), raw("nobody", 2), raw("d", 3), raw("down", 4), raw("d", 5)];
        let batch: Vec<_> = envelopes.iter().map(|e| (e, tracing::Span::none())).collect();
        let mapped = mapper.map_all(&batch).await;
        let shown: Vec<String> = mapped
            .iter()
            .map(|result| match result {
                Ok(messages) => messages.iter().map(|m| values(m).to_string()).collect::<Vec<_>>().join(","),
                Err(error) => error.label().to_owned(),
            })
            .collect();
        assert_eq!(shown, [r#"{"n":1}"#, "script_error", "unknown_device", r#"{"n":3}"#, "lookup"]);
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
