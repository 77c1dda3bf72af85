//! Calls to ThingsPanel's plugin HTTP API (device config, the heartbeat loop, device list).
//!
//! Every reply is HTTP 200 with `{"code","message","data"}`: success is `code == 200`,
//! so the code is checked, not only the HTTP status.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::devices::{Device, DeviceKind, DeviceSettings, SubDevice};

/// `code` of a successful reply.
const OK: i64 = 200;
/// `code` of "record not found" (an unknown voucher or device).
const NOT_FOUND: i64 = 101001;
/// `code` of the per-voucher rate limit (one call per 3 s).
const RATE_LIMITED: i64 = 201003;

/// A platform call failed.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("platform unreachable: {0}")]
    Unreachable(String),
    #[error("platform rate limit for this voucher (201003)")]
    RateLimited,
    #[error("platform answered code {code}: {message}")]
    Refused { code: i64, message: String },
    #[error("platform reply not understood: {0}")]
    BadReply(String),
}

#[derive(Deserialize)]
struct Reply {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    data: Value,
}

/// What `device/config` is asked by.
#[derive(Clone, Copy)]
pub enum ConfigQuery<'a> {
    Voucher(&'a str),
    DeviceId(&'a str),
    DeviceNumber(&'a str),
}

/// A [`ConfigQuery`] that outlives its caller (a refresh behind it).
pub enum OwnedQuery {
    Voucher(String),
    DeviceId(String),
    DeviceNumber(String),
}

impl ConfigQuery<'_> {
    pub fn to_owned(self) -> OwnedQuery {
        match self {
            ConfigQuery::Voucher(voucher) => OwnedQuery::Voucher(voucher.to_owned()),
            ConfigQuery::DeviceId(id) => OwnedQuery::DeviceId(id.to_owned()),
            ConfigQuery::DeviceNumber(number) => OwnedQuery::DeviceNumber(number.to_owned()),
        }
    }
}

impl OwnedQuery {
    pub fn as_query(&self) -> ConfigQuery<'_> {
        match self {
            OwnedQuery::Voucher(voucher) => ConfigQuery::Voucher(voucher),
            OwnedQuery::DeviceId(id) => ConfigQuery::DeviceId(id),
            OwnedQuery::DeviceNumber(number) => ConfigQuery::DeviceNumber(number),
        }
    }
}

/// A client of one ThingsPanel backend.
#[derive(Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    base: String,
}

impl PlatformClient {
    /// `base` is the backend's HTTP root, e.g. `http://thingspanel:9999`.
    pub fn new(base: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .expect("a plain HTTP client always builds");
        PlatformClient { http, base: base.trim_end_matches('/').to_owned() }
    }

    async fn post(&self, path: &str, body: Value) -> Result<Reply, PlatformError> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| PlatformError::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_server_error() {
            // A gateway or proxy in front of the platform answering for it: down.
            return Err(PlatformError::Unreachable(format!("HTTP {status}")));
        }
        let bytes = response.bytes().await.map_err(|e| PlatformError::Unreachable(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            PlatformError::BadReply(format!("HTTP {status}, body is not the platform's envelope: {e}"))
        })
    }

    /// The device a voucher or id names; None if the platform does not know it.
    ///
    /// # Errors
    /// Unreachable, rate-limited, another code, or a reply we cannot read.
    pub async fn device_config(&self, query: ConfigQuery<'_>) -> Result<Option<Device>, PlatformError> {
        let body = match query {
            ConfigQuery::Voucher(voucher) => json!({ "voucher": voucher }),
            ConfigQuery::DeviceId(id) => json!({ "device_id": id }),
            ConfigQuery::DeviceNumber(number) => json!({ "device_number": number }),
        };
        let reply = self.post("/api/v1/plugin/device/config", body).await?;
        match reply.code {
            OK => parse_device(&reply.data).map(Some),
            NOT_FOUND => Ok(None),
            RATE_LIMITED => Err(PlatformError::RateLimited),
            code => Err(PlatformError::Refused { code, message: reply.message }),
        }
    }

    /// Tells the platform this plugin is alive.
    ///
    /// # Errors
    /// Unreachable or refused.
    pub async fn heartbeat(&self, service_identifier: &str) -> Result<(), PlatformError> {
        let reply = self
            .post("/api/v1/plugin/heartbeat", json!({ "service_identifier": service_identifier }))
            .await?;
        match reply.code {
            OK => Ok(()),
            code => Err(PlatformError::Refused { code, message: reply.message }),
        }
    }

    /// Sends the plugin heartbeat every `every` until `stop` (the platform shows a plugin
    /// inactive after 60 s without one); a refused one is logged and the next one tried.
    pub async fn keep_heartbeat(self, service_identifier: String, every: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = self.heartbeat(&service_identifier).await {
                        warn!(%error, "plugin heartbeat not accepted");
                    }
                }
            }
        }
    }
}

fn str_field<'a>(data: &'a Value, key: &str) -> &'a str {
    data.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Reads `data` of `device/config`: our settings come from `protocol_config_template`
/// (the per-device-config form) with the device's own `config` form values on top.
pub fn parse_device(data: &Value) -> Result<Device, PlatformError> {
    let id = str_field(data, "id");
    if id.is_empty() {
        return Err(PlatformError::BadReply("device config without an id".to_owned()));
    }
    let mut form = Map::new();
    for key in ["protocol_config_template", "config"] {
        if let Some(values) = data.get(key).and_then(Value::as_object) {
            form.extend(values.clone());
        }
    }
    let settings = DeviceSettings::from_form(&form).map_err(|e| PlatformError::BadReply(e.to_string()))?;
    let kind = DeviceKind::parse(str_field(data, "device_type")).unwrap_or_default();
    let sub_devices = data
        .get("sub_devices")
        .and_then(Value::as_array)
        .map(|subs| {
            subs.iter()
                .map(|sub| SubDevice {
                    id: str_field(sub, "device_id").to_owned(),
                    number: str_field(sub, "device_number").to_owned(),
                    address: str_field(sub, "sub_device_addr").to_owned(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Device {
        id: id.to_owned(),
        number: str_field(data, "device_number").to_owned(),
        voucher_digest: match str_field(data, "voucher") {
            "" => String::new(),
            voucher => super::voucher::digest(voucher),
        },
        kind,
        sub_devices,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/../tests/fixtures/thingspanel/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn direct_device_fixture() {
        let device = parse_device(&fixture("device_config_direct.json")["data"]).unwrap();
        assert_eq!(device.id, "6b1f0c9e-2f3a-4d7e-9a51-3c0d2e7b8a10");
        assert_eq!(device.number, "D001");
        assert_eq!(device.kind, DeviceKind::Direct);
        assert!(device.sub_devices.is_empty());
        assert_eq!(device.settings, DeviceSettings::default());
    }

    #[test]
    fn gateway_fixture_with_sub_devices() {
        let device = parse_device(&fixture("device_config_gateway.json")["data"]).unwrap();
        assert_eq!(device.kind, DeviceKind::Gateway);
        assert_eq!(device.sub_devices.len(), 2);
        let sub = device.sub_device("3c20c6207").unwrap();
        assert_eq!((sub.id.as_str(), sub.number.as_str()), ("b4f6d8ca-2e3a-4f7b-9c1d-0e9f8a7b6c52", "S002"));
    }

    #[test]
    fn settings_from_template_with_device_config_on_top() {
        let data = json!({
            "id": "d", "device_type": "1",
            "protocol_config_template": {"framing": "delimiter", "delimiter": "\\n", "uplink_script": "lib:a"},
            "config": {"uplink_script": "lib:b"}
        });
        let device = parse_device(&data).unwrap();
        assert_eq!(device.settings.uplink_script.as_deref(), Some("lib:b"));
        assert_eq!(device.settings.framing, crate::devices::Framing::Delimiter { delimiter: b"\n".to_vec() });
    }
}
